package plant

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/dag"
)

// runAction runs one configuration action: guest actions through the agent,
// host actions on the plant. A failure is reported in the result's Error.
func (p *Plant) runAction(ctx context.Context, v *vm, a *computev1.Action) *computev1.ActionResult {
	start := time.Now()
	r := &computev1.ActionResult{Id: a.Id}
	defer func() { r.TookNanos = int64(time.Since(start)) }()
	if dag.IsHost(a) {
		var err error
		switch k := a.Kind.(type) {
		case *computev1.Action_AttachDisk:
			err = p.attachDisk(ctx, v, k.AttachDisk, r)
		case *computev1.Action_StageIn:
			err = p.stageIn(ctx, v, k.StageIn, r)
		}
		if err != nil {
			r.Error = err.Error()
		}
		return r
	}
	var req agent.Request
	switch k := a.Kind.(type) {
	case *computev1.Action_Exec:
		req = execRequest(k.Exec)
	case *computev1.Action_WriteFile:
		req = agent.Request{Op: agent.OpWriteFile, Path: k.WriteFile.Path, Content: k.WriteFile.Content, Mode: k.WriteFile.Mode}
	case *computev1.Action_SetHostname:
		req = agent.Request{Op: agent.OpHostname, Hostname: k.SetHostname.Hostname}
	case *computev1.Action_AddUser:
		req = agent.Request{Op: agent.OpAddUser, User: k.AddUser.User, SSHKey: k.AddUser.SshKey}
	case *computev1.Action_Mount:
		req = agent.Request{Op: agent.OpMount, Device: k.Mount.Device, Path: k.Mount.Path, FSType: k.Mount.Fstype, Options: k.Mount.Options}
	default:
		r.Error = fmt.Sprintf("unknown action kind %T", k)
		return r
	}
	resp, err := v.agent.Do(ctx, req)
	if err != nil {
		r.Error = "guest agent: " + err.Error()
		return r
	}
	r.ExitCode, r.Stdout, r.Stderr, r.Results = int32(resp.ExitCode), resp.Stdout, resp.Stderr, resp.Results
	switch {
	case resp.Error != "":
		r.Error = resp.Error
	case resp.ExitCode != 0:
		r.Error = "exit status " + strconv.Itoa(resp.ExitCode)
	}
	return r
}

// attachDisk creates an empty ext4 disk in the VM's directory and hot-plugs
// it as a virtio disk into a free PCIe root port. The guest finds it by its
// serial (the action's disk name); the result "device" names it.
func (p *Plant) attachDisk(ctx context.Context, v *vm, d *computev1.AttachDiskAction, r *computev1.ActionResult) error {
	path := filepath.Join(v.dir, "disk-"+d.Name+".raw")
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
		return fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	return p.hotplug(ctx, v, d.Name, path, r)
}

// hotplug adds a raw disk file to a running VM and reports the guest
// device in r.Results["device"].
func (p *Plant) hotplug(ctx context.Context, v *vm, name, path string, r *computev1.ActionResult) error {
	v.mu.Lock()
	m := v.m
	port := fmt.Sprintf("hp%d", v.hotplugged)
	v.hotplugged++
	v.mu.Unlock()
	if v.hotplugged > 4 {
		return fmt.Errorf("no free hotplug port (a VM takes at most 4 attached disks)")
	}
	node := "hd-" + name
	if err := m.QMP(ctx, "blockdev-add", map[string]any{
		"node-name": node, "driver": "raw",
		"file": map[string]any{"driver": "file", "filename": path},
	}, nil); err != nil {
		return fmt.Errorf("blockdev-add: %w", err)
	}
	if err := m.QMP(ctx, "device_add", map[string]any{
		"driver": "virtio-blk-pci", "id": "dev-" + name, "drive": node, "bus": port, "serial": name,
	}, nil); err != nil {
		return fmt.Errorf("device_add: %w", err)
	}
	// Wait for the guest to see it.
	find := `for d in /sys/block/vd*; do [ -e "$d/serial" ] && [ "$(cat $d/serial)" = "$1" ] && echo /dev/${d##*/} && exit 0; done; exit 1`
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := v.agent.Do(ctx, agent.Request{Op: agent.OpExec, Argv: []string{"sh", "-c", find, "find", name}, Timeout: agent.Duration(5 * time.Second)})
		if err != nil {
			return err
		}
		if resp.ExitCode == 0 {
			dev := strings.TrimSpace(string(resp.Stdout))
			r.Results = map[string]string{"device": dev, "serial": name}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest did not see disk %s after hot-plug", name)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// hostMemoryMiB is the machine's RAM.
func hostMemoryMiB() uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 1024
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "MemTotal:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			return kb / 1024
		}
	}
	return 1024
}
