package plant

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/plant/datadisk"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// DefaultWorkDir is where a data disk is mounted in the guest.
const DefaultWorkDir = "/root/work"

// dataClient connects to the plant's configured data server (never one a
// request names) presenting cred, a task credential the shop minted for the
// VM's owner and task: it reads that owner's files and writes the task's
// outputs, nothing else.
func (p *Plant) dataClient(cred string) (*dataclient.Client, func(), error) {
	if err := p.dataReady(cred); err != nil {
		return nil, nil, err
	}
	cc, err := services.Dial(p.cfg.DataServer, p.cfg.DataTLS, grpc.WithPerRPCCredentials(auth.Credentials{Token: cred, Insecure: !p.cfg.DataTLS.Enabled()}))
	if err != nil {
		return nil, nil, err
	}
	return dataclient.NewClient(cc), func() { cc.Close() }, nil
}

// dataReady says what is missing for staging with cred.
func (p *Plant) dataReady(cred string) error {
	switch {
	case p.cfg.DataServer == "":
		return fmt.Errorf("plant %s has no data server configured (--dataserver), so it cannot stage files: %w", p.cfg.Name, errdefs.ErrFailedPrecondition)
	case cred == "":
		return fmt.Errorf("the request brings no data_credential (a task credential from the shop), so plant %s cannot stage files: %w", p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// checkStaging refuses, before anything is created, a plan that stages in
// when the plant has no data server or the request no credential.
func (p *Plant) checkStaging(plan *dag.Plan, cred string) error {
	for _, s := range plan.Todo() {
		if stagesIn([]*computev1.Action{s.Action}) {
			if err := p.dataReady(cred); err != nil {
				return fmt.Errorf("action %q (stage_in): %w", s.Action.Id, err)
			}
		}
	}
	return nil
}

// stagesIn reports whether actions or their error handlers stage in.
func stagesIn(actions []*computev1.Action) bool {
	for _, a := range actions {
		if a.GetStageIn() != nil || stagesIn(a.GetOnError()) {
			return true
		}
	}
	return false
}

// stageIn returns the stage_in runner of a VM: it builds the data disk
// from the owner's files, plugs it in and mounts it in the guest (Goiri et
// al.'s stage-in), and remembers the disk for StageOut.
func (p *Plant) stageIn(v *vm) func(context.Context, *runner, *computev1.StageInAction, *computev1.ActionResult) error {
	return func(ctx context.Context, r *runner, a *computev1.StageInAction, res *computev1.ActionResult) error {
		disk, err := p.buildDataDisk(ctx, v, a)
		if err != nil {
			return err
		}
		if err := r.hotplug(ctx, "data", disk, res); err != nil {
			return err
		}
		mnt := a.MountPath
		if mnt == "" {
			mnt = DefaultWorkDir
		}
		resp, err := r.agent.Do(ctx, agent.Request{Op: agent.OpMount, Device: res.Results["device"], Path: mnt, FSType: "ext4"})
		if err != nil {
			return err
		}
		if resp.Error != "" {
			return fmt.Errorf("mount the data disk: %s", resp.Error)
		}
		v.mu.Lock()
		v.dataDisk, v.dataMount = disk, mnt
		v.mu.Unlock()
		res.Results["mount"] = mnt
		res.Results["files"] = fmt.Sprint(len(a.Files))
		return nil
	}
}

// buildDataDisk builds a VM's data disk from its owner's files on the
// plant's data server, with the credential its CreateVM brought.
// a.Dataserver is not read: where credentials go is not a request's choice.
func (p *Plant) buildDataDisk(ctx context.Context, v *vm, a *computev1.StageInAction) (string, error) {
	v.mu.Lock()
	owner, cred := v.ad.Owner, v.dataCred
	v.mu.Unlock()
	if owner == "" {
		return "", fmt.Errorf("stage-in needs the VM's owner")
	}
	c, done, err := p.dataClient(cred)
	if err != nil {
		return "", err
	}
	defer done()
	disk := filepath.Join(v.dir, "data.raw")
	if err := datadisk.Build(ctx, c, a.Files, a.SizeMib, disk); err != nil {
		return "", fmt.Errorf("build the data disk: %w", err)
	}
	return disk, nil
}

// StageOut copies a folder of the VM's data disk to the data server under
// the VM's owner, with the request's data credential (or, when it brings
// none, the one its CreateVM brought). The disk is unmounted in the guest
// first so that its file system is complete on the host.
func (p *Plant) StageOut(ctx context.Context, req *computev1.StageOutRequest) ([]string, error) {
	id, folder := req.VmId, req.Folder
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.StageOutTimeout)
	defer cancel()
	<-v.ready
	v.mu.Lock()
	disk, mnt, ac, cred := v.dataDisk, v.dataMount, v.agent, v.dataCred
	v.mu.Unlock()
	if req.DataCredential != "" {
		cred = req.DataCredential
	}
	if disk == "" {
		return nil, fmt.Errorf("vm %q has no data disk (no stage_in action): %w", id, errdefs.ErrFailedPrecondition)
	}
	if ac != nil {
		uctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		resp, err := ac.Do(uctx, agent.Request{Op: agent.OpExec, Argv: []string{"sh", "-c", "sync; umount " + shellQuote(mnt) + " || { sleep 1; umount -l " + shellQuote(mnt) + "; sync; }"}})
		cancel()
		if err != nil || resp.ExitCode != 0 {
			p.log.Warn("could not unmount the data disk before stage-out; reading it as it is")
		}
	}
	if folder == "" {
		folder = "out"
	}
	c, done, err := p.dataClient(cred)
	if err != nil {
		return nil, err
	}
	defer done()
	return datadisk.StageOut(ctx, c, disk, folder, req.RemotePrefix)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
