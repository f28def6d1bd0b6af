package plant

import (
	"fmt"
	"syscall"

	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// hostDiskMiB is what a plan's host actions take on the plant's disk: the
// attached disks, and the data disks whose size is given (a data disk
// sized from its inputs is checked when it is built).
func hostDiskMiB(plan *dag.Plan) uint64 {
	var need uint64
	for _, s := range plan.Todo() {
		switch {
		case s.Action.GetAttachDisk() != nil:
			need += s.Action.GetAttachDisk().SizeMib
		case s.Action.GetStageIn() != nil:
			need += s.Action.GetStageIn().SizeMib
		}
	}
	return need
}

// diskRoomLocked refuses need MiB of disks when they pass the plant's cap
// (Config.DiskMiB, counting its VMs' disks) or the free space of its
// directory, before anything is created. p.mu is held.
func (p *Plant) diskRoomLocked(need uint64) error {
	if need == 0 {
		return nil
	}
	if p.cfg.DiskMiB > 0 {
		var used uint64
		for _, v := range p.vms {
			used += v.diskMiB
		}
		if used+need > p.cfg.DiskMiB {
			return fmt.Errorf("the VM's disks take %d MiB; plant %s has %d MiB of its %d MiB for disks left: %w",
				need, p.cfg.Name, p.cfg.DiskMiB-min(used, p.cfg.DiskMiB), p.cfg.DiskMiB, errdefs.ErrResourceExhausted)
		}
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(p.cfg.Dir, &st); err != nil {
		return fmt.Errorf("free space of %s: %w", p.cfg.Dir, err)
	}
	// Disk files are sparse, but a guest may fill them: count them whole.
	if free := st.Bavail * uint64(st.Bsize) >> 20; need > free {
		return fmt.Errorf("the VM's disks take %d MiB; plant %s has %d MiB free: %w", need, p.cfg.Name, free, errdefs.ErrResourceExhausted)
	}
	return nil
}
