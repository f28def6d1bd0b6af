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
)

// DefaultWorkDir is where a data disk is mounted in the guest.
const DefaultWorkDir = "/root/work"

// dataClient connects to a data server acting for owner with the plant's
// service token.
func (p *Plant) dataClient(addr, owner string) (*dataclient.Client, func(), error) {
	if p.cfg.DataToken == "" {
		return nil, nil, fmt.Errorf("plant %s has no data server token (--data-token): %w", p.cfg.Name, errdefs.ErrFailedPrecondition)
	}
	cc, err := services.Dial(addr, p.cfg.DataTLS, grpc.WithPerRPCCredentials(auth.Credentials{Token: p.cfg.DataToken, ActAs: owner, Insecure: !p.cfg.DataTLS.Enabled()}))
	if err != nil {
		return nil, nil, err
	}
	return dataclient.NewClient(cc), func() { cc.Close() }, nil
}

// stageIn returns the stage_in runner of a VM: it builds the data disk
// from the owner's files, plugs it in and mounts it in the guest (Goiri et
// al.'s stage-in), and remembers the disk for StageOut.
func (p *Plant) stageIn(v *vm) func(context.Context, *runner, *computev1.StageInAction, *computev1.ActionResult) error {
	return func(ctx context.Context, r *runner, a *computev1.StageInAction, res *computev1.ActionResult) error {
		owner := v.ad.Owner
		if owner == "" {
			return fmt.Errorf("stage-in needs the VM's owner")
		}
		c, done, err := p.dataClient(a.Dataserver, owner)
		if err != nil {
			return err
		}
		defer done()
		disk := filepath.Join(v.dir, "data.raw")
		if err := datadisk.Build(ctx, c, a.Files, a.SizeMib, disk); err != nil {
			return fmt.Errorf("build the data disk: %w", err)
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
		v.dataDisk, v.dataMount, v.dataServer = disk, mnt, a.Dataserver
		v.mu.Unlock()
		res.Results["mount"] = mnt
		res.Results["files"] = fmt.Sprint(len(a.Files))
		return nil
	}
}

// StageOut copies a folder of the VM's data disk to the data server under
// the VM's owner. The disk is unmounted in the guest first so that its file
// system is complete on the host.
func (p *Plant) StageOut(ctx context.Context, id, folder, prefix string) ([]string, error) {
	v, err := p.lookup(id)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.StageOutTimeout)
	defer cancel()
	<-v.ready
	v.mu.Lock()
	disk, mnt, owner, ac, dataAddr := v.dataDisk, v.dataMount, v.ad.Owner, v.agent, v.dataServer
	v.mu.Unlock()
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
	c, done, err := p.dataClient(dataAddr, owner)
	if err != nil {
		return nil, err
	}
	defer done()
	return datadisk.StageOut(ctx, c, disk, folder, prefix)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
