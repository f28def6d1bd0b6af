package clonebench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
)

// localClone is a clone made outside vmgrid, directly with computeserver/vmm
// and computeserver/agent, from golden files in a local directory.
type localClone struct {
	m   vmm.Machine
	ac  *agent.Client
	dir string
}

// cloneLocal runs the production line on local files: read vm.json, make a
// redo log over backing (a path, or an nbd:// URL), restore the memory state
// in files, wait for the agent, set the clock and the hostname. It adds its
// phases to ph.
func cloneLocal(ctx context.Context, driver vmm.Driver, files, backing, vmDir, hostname string, ph Phases) (*localClone, error) {
	start := time.Now()
	b, err := os.ReadFile(filepath.Join(files, plant.ConfigFile))
	if err != nil {
		return nil, err
	}
	var cfg plant.VMConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", plant.ConfigFile, err)
	}
	if err := os.MkdirAll(vmDir, 0o755); err != nil {
		return nil, err
	}
	c := &localClone{dir: vmDir}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()
	redo := filepath.Join(vmDir, "redo.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", redo).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("qemu-img create over %s: %v: %s", backing, err, out)
	}
	start = ph.lap("overlay", start)

	spec := cfg.Spec
	spec.Name, spec.Dir = filepath.Base(vmDir), vmDir
	spec.Kernel = filepath.Join(files, cfg.Kernel)
	if cfg.Initrd != "" {
		spec.Initrd = filepath.Join(files, cfg.Initrd)
	}
	spec.Channels = []vmm.Channel{{Name: plant.AgentChannel, Socket: filepath.Join(vmDir, "agent.sock")}}
	disk := spec.Disks[0]
	disk.Path, disk.Format = redo, vmm.QCOW2
	spec.Disks = append([]vmm.Disk{disk}, spec.Disks[1:]...)
	in := vmm.Incoming{Path: filepath.Join(files, cfg.Memory)}
	if cfg.RAM != "" {
		// RAM as a file (plant/lazymem.go): mapped privately, as a lazy
		// clone does from its plant's view.
		spec.MemoryFile, in.IgnoreShared = &vmm.MemoryFile{Path: filepath.Join(files, cfg.RAM)}, true
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var dialErr error
	c.m, err = vmm.Restore(ctx, driver, spec, in, func(vmm.Machine) {
		c.ac, dialErr = agent.Dial(actx, spec.Channels[0].Socket) // before the guest runs, as a plant does
	})
	if err != nil {
		if c.ac != nil {
			c.ac.Close()
		}
		return nil, err
	}
	start = ph.lap("restore", start)
	if err = dialErr; err == nil {
		err = c.ac.WaitReady(actx)
	}
	if err != nil {
		return nil, fmt.Errorf("the agent of %s did not answer: %w", spec.Name, err)
	}
	start = ph.lap("agent", start)
	for _, req := range []agent.Request{
		{Op: agent.OpSetTime, UnixNano: time.Now().UnixNano()},
		{Op: agent.OpHostname, Hostname: hostname},
	} {
		resp, err := c.ac.Do(actx, req)
		if err == nil && resp.Error != "" {
			err = fmt.Errorf("%s", resp.Error)
		}
		if err != nil {
			return nil, fmt.Errorf("agent %s: %w", req.Op, err)
		}
	}
	ph.lap("configure", start)
	ok = true
	return c, nil
}

// Close stops the guest and removes its directory.
func (c *localClone) Close() {
	if c.ac != nil {
		c.ac.Close()
	}
	if c.m != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		c.m.Stop(ctx) //nolint:errcheck // Stop kills when quitting fails
		cancel()
	}
	os.RemoveAll(c.dir)
}

// dropPageCache makes the kernel forget the cached pages of files: they are
// synced first, as POSIX_FADV_DONTNEED leaves dirty pages alone.
func dropPageCache(paths ...string) error {
	for _, p := range paths {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		err = f.Sync()
		if err == nil {
			err = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		}
		f.Close()
		if err != nil {
			return fmt.Errorf("drop the page cache of %s: %w", p, err)
		}
	}
	return nil
}

// Phases records how long each step of one run took.
type Phases map[string]float64

// lap records the time since start under name and returns now.
func (ph Phases) lap(name string, start time.Time) time.Time {
	now := time.Now()
	if ph != nil {
		ph[name] += now.Sub(start).Seconds()
	}
	return now
}
