package computev1

import (
	"errors"
	"fmt"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Validate checks a flush request.
func (r *FlushRequest) Validate() error {
	if r.Disk == "" {
		return nil
	}
	return imagev1.ValidateName("disk", r.Disk)
}

func validateHardware(h *Hardware) error {
	if h == nil {
		return nil
	}
	switch {
	case h.Vcpus > 256:
		return fmt.Errorf("hardware.vcpus %d: at most 256", h.Vcpus)
	case h.MemoryMib > 4<<20:
		return fmt.Errorf("hardware.memory_mib %d: at most 4 TiB", h.MemoryMib)
	case len(h.Arch) > 32:
		return errors.New("hardware.arch: at most 32 characters")
	}
	return nil
}

func validateVMID(id string, required bool) error {
	if id == "" && !required {
		return nil
	}
	return imagev1.ValidateName("vm_id", id)
}

// Validate checks a CreateVM request; the configuration DAG is checked by
// the plant (package dag), which names the node at fault.
func (r *CreateVMRequest) Validate() error {
	if err := validateVMID(r.VmId, false); err != nil {
		return err
	}
	if err := imagev1.ValidateName("image", r.Image); err != nil {
		return err
	}
	if r.Owner != "" {
		if err := imagev1.ValidateName("owner", r.Owner); err != nil {
			return err
		}
	}
	if r.PersistentDisk != "" {
		if err := imagev1.ValidateName("persistent_disk", r.PersistentDisk); err != nil {
			return err
		}
	}
	return validateHardware(r.Hardware)
}

// Validate checks a GetVM request.
func (r *GetVMRequest) Validate() error { return validateVMID(r.VmId, true) }

// Validate checks a DestroyVM request.
func (r *DestroyVMRequest) Validate() error { return validateVMID(r.VmId, true) }

// Validate checks a SuspendVM request.
func (r *SuspendVMRequest) Validate() error { return validateVMID(r.VmId, true) }

// Validate checks a ResumeVM request.
func (r *ResumeVMRequest) Validate() error {
	c := r.GetClassad()
	if c == nil {
		return errors.New("classad of the suspended VM is required")
	}
	if err := validateVMID(c.VmId, true); err != nil {
		return err
	}
	if err := imagev1.ValidateName("classad.suspended_image", c.SuspendedImage); err != nil {
		return err
	}
	return imagev1.ValidateName("classad.persistent_disk", c.PersistentDisk)
}

// Validate checks an ExecVM request.
func (r *ExecVMRequest) Validate() error {
	if err := validateVMID(r.VmId, true); err != nil {
		return err
	}
	if len(r.GetExec().GetArgv()) == 0 {
		return errors.New("exec.argv is required")
	}
	return nil
}

// Validate checks a StageOut request.
func (r *StageOutRequest) Validate() error { return validateVMID(r.VmId, true) }
