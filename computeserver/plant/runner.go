package plant

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// runner runs configuration actions in one guest, for clones and golden
// builds alike: guest actions through the agent, host actions (attach_disk,
// stage_in) on the plant, next to the machine.
type runner struct {
	agent guestAgent
	m     vmm.Machine
	// dir holds the disk files of host actions.
	dir string
	// stageIn runs a stage_in action; nil where host actions are refused
	// (golden builds).
	stageIn func(ctx context.Context, r *runner, a *computev1.StageInAction, res *computev1.ActionResult) error

	hotplugged int // disks hot-plugged so far
}

// failure is an action that failed and that no error handler recovered.
type failure struct {
	step   dag.Step
	result *computev1.ActionResult
}

func (f *failure) Error() string {
	return fmt.Sprintf("action %q (%s) failed: %s%s", f.step.Action.Id, f.step.Kind, f.result.Error, outputTail(f.result))
}

// run runs a plan's steps the golden image has not performed, in order,
// each with its error handlers; a performed step is reported Skipped. It
// stops at the first failure no handler recovered.
func (r *runner) run(ctx context.Context, plan *dag.Plan, progress func(dag.Step)) ([]*computev1.ActionResult, *failure) {
	var results []*computev1.ActionResult
	for _, s := range plan.Steps {
		if s.Done {
			results = append(results, &computev1.ActionResult{Id: s.Action.Id, Digest: s.Digest, Skipped: true})
			continue
		}
		if progress != nil {
			progress(s)
		}
		res := r.action(ctx, s.Action)
		res.Digest = s.Digest
		if res.Error != "" && s.OnError != nil {
			handled, ok := r.recover(ctx, s)
			results = append(results, handled...)
			res.Recovered = ok
		}
		results = append(results, res)
		if res.Error != "" && !res.Recovered {
			return results, &failure{s, res}
		}
	}
	return results, nil
}

// recover runs a failed step's error handlers, in order, until one fails.
func (r *runner) recover(ctx context.Context, s dag.Step) ([]*computev1.ActionResult, bool) {
	var results []*computev1.ActionResult
	for _, h := range s.OnError.Steps {
		res := r.action(ctx, h.Action)
		res.Id = s.Action.Id + "/on_error/" + h.Action.Id
		results = append(results, res)
		if res.Error != "" {
			return results, false
		}
	}
	return results, true
}

// action runs one configuration action. A failure is reported in the
// result's Error.
func (r *runner) action(ctx context.Context, a *computev1.Action) *computev1.ActionResult {
	start := time.Now()
	res := &computev1.ActionResult{Id: a.Id}
	defer func() { res.TookNanos = int64(time.Since(start)) }()
	if dag.IsHost(a) {
		if err := r.host(ctx, a, res); err != nil {
			res.Error = err.Error()
		}
		return res
	}
	req, err := guestRequest(a)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	resp, err := r.agent.Do(ctx, req)
	if err != nil {
		res.Error = "guest agent: " + err.Error()
		return res
	}
	res.ExitCode, res.Stdout, res.Stderr, res.Results = int32(resp.ExitCode), resp.Stdout, resp.Stderr, resp.Results
	switch {
	case resp.Error != "":
		res.Error = resp.Error
	case resp.ExitCode != 0:
		res.Error = "exit status " + strconv.Itoa(resp.ExitCode)
	}
	return res
}

// guestRequest is the agent request of a guest action.
func guestRequest(a *computev1.Action) (agent.Request, error) {
	switch k := a.Kind.(type) {
	case *computev1.Action_Exec:
		return execRequest(k.Exec), nil
	case *computev1.Action_WriteFile:
		return agent.Request{Op: agent.OpWriteFile, Path: k.WriteFile.Path, Content: k.WriteFile.Content, Mode: k.WriteFile.Mode}, nil
	case *computev1.Action_SetHostname:
		return agent.Request{Op: agent.OpHostname, Hostname: k.SetHostname.Hostname}, nil
	case *computev1.Action_AddUser:
		return agent.Request{Op: agent.OpAddUser, User: k.AddUser.User, SSHKey: k.AddUser.SshKey}, nil
	case *computev1.Action_Mount:
		return agent.Request{Op: agent.OpMount, Device: k.Mount.Device, Path: k.Mount.Path, FSType: k.Mount.Fstype, Options: k.Mount.Options}, nil
	}
	return agent.Request{}, fmt.Errorf("unknown action kind %T", a.Kind)
}

// host runs a host action.
func (r *runner) host(ctx context.Context, a *computev1.Action, res *computev1.ActionResult) error {
	if r.stageIn == nil {
		return fmt.Errorf("host actions (%s) cannot run here", dag.Kind(a))
	}
	switch k := a.Kind.(type) {
	case *computev1.Action_AttachDisk:
		return r.attachDisk(ctx, k.AttachDisk, res)
	case *computev1.Action_StageIn:
		return r.stageIn(ctx, r, k.StageIn, res)
	}
	return fmt.Errorf("unknown host action kind %T", a.Kind)
}

// attachDisk creates an empty ext4 disk in the VM's directory and hot-plugs
// it as a virtio disk into a free PCIe root port. The guest finds it by its
// serial (the action's disk name); the result "device" names it.
func (r *runner) attachDisk(ctx context.Context, d *computev1.AttachDiskAction, res *computev1.ActionResult) error {
	path := filepath.Join(r.dir, "disk-"+d.Name+".raw")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(d.SizeMib) << 20)
	f.Close()
	if err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", d.Name, path).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, out)
	}
	return r.hotplug(ctx, d.Name, path, res)
}

// maxHotplug is the number of hot-plug ports every golden machine has
// (hotplugPorts).
const maxHotplug = 4

// hotplug adds a raw disk file to the running machine and reports the
// guest device in res.Results["device"].
func (r *runner) hotplug(ctx context.Context, name, path string, res *computev1.ActionResult) error {
	if r.hotplugged >= maxHotplug {
		return fmt.Errorf("no free hotplug port (a VM takes at most %d attached disks)", maxHotplug)
	}
	port := fmt.Sprintf("hp%d", r.hotplugged)
	r.hotplugged++
	node := "hd-" + name
	if err := r.m.QMP(ctx, "blockdev-add", map[string]any{
		"node-name": node, "driver": "raw",
		"file": map[string]any{"driver": "file", "filename": path},
	}, nil); err != nil {
		return fmt.Errorf("blockdev-add: %w", err)
	}
	if err := r.m.QMP(ctx, "device_add", map[string]any{
		"driver": "virtio-blk-pci", "id": "dev-" + name, "drive": node, "bus": port, "serial": name,
	}, nil); err != nil {
		return fmt.Errorf("device_add: %w", err)
	}
	dev, err := r.findDisk(ctx, name)
	if err != nil {
		return err
	}
	res.Results = map[string]string{"device": dev, "serial": name}
	return nil
}

// findDisk waits for the guest to see a hot-plugged disk and returns its
// device.
func (r *runner) findDisk(ctx context.Context, serial string) (string, error) {
	find := `for d in /sys/block/vd*; do [ -e "$d/serial" ] && [ "$(cat $d/serial)" = "$1" ] && echo /dev/${d##*/} && exit 0; done; exit 1`
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := r.agent.Do(ctx, agent.Request{Op: agent.OpExec, Argv: []string{"sh", "-c", find, "find", serial}, Timeout: agent.Duration(5 * time.Second)})
		if err != nil {
			return "", err
		}
		if resp.ExitCode == 0 {
			return strings.TrimSpace(string(resp.Stdout)), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("the guest did not see disk %s after hot-plug", serial)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// execRequest is the agent request of an exec action.
func execRequest(e *computev1.ExecAction) agent.Request {
	t := time.Duration(e.TimeoutSeconds) * time.Second
	if t == 0 {
		t = 5 * time.Minute
	}
	return agent.Request{Op: agent.OpExec, Argv: e.Argv, Env: e.Env, Dir: e.Dir, Timeout: agent.Duration(t)}
}

// outputTail is the end of a failed action's output, for its error.
func outputTail(r *computev1.ActionResult) string {
	out := strings.TrimSpace(string(r.Stderr))
	if out == "" {
		out = strings.TrimSpace(string(r.Stdout))
	}
	if out == "" {
		return ""
	}
	return ": " + tail(out, 500)
}
