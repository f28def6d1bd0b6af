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
// the plant (package dag), which names the node at fault, after the action
// kinds are known here.
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
	if err := validateHardware(r.Hardware); err != nil {
		return err
	}
	if err := validateDataCredential(r.DataCredential); err != nil {
		return err
	}
	if err := validateNetwork(r.Network); err != nil {
		return err
	}
	if err := ValidateLabels(r.Labels); err != nil {
		return err
	}
	if err := validateActions(r.GetConfig().GetActions(), "config"); err != nil {
		return err
	}
	return ValidateSize("request", r, MaxRequestBytes)
}

// MaxDataCredentialLen bounds a request's data_credential: a task
// credential is a few hundred bytes.
const MaxDataCredentialLen = 4096

func validateDataCredential(c string) error {
	if len(c) > MaxDataCredentialLen {
		return fmt.Errorf("data_credential is %d bytes long; the limit is %d", len(c), MaxDataCredentialLen)
	}
	return nil
}

// ErrStageInDataserver is why a stage_in naming a data server is refused:
// a request must not choose where a plant sends credentials.
var ErrStageInDataserver = errors.New("stage_in.dataserver: the data server is grid configuration (the plant's --dataserver), not part of a request")

// validateActions rejects actions whose kind this build does not know (a
// newer client's oneof member arrives as an unknown field, and no kind) and
// stage_in actions that name a data server. The rest of the DAG is checked
// by package dag, which names the node.
func validateActions(actions []*Action, where string) error {
	for i, a := range actions {
		if a.GetKind() == nil {
			return fmt.Errorf("%s.actions[%d] (%q): no action kind this plant knows", where, i, a.GetId())
		}
		if a.GetStageIn().GetDataserver() != "" { //nolint:staticcheck // read only to refuse it
			return fmt.Errorf("%s.actions[%d] (%q): %w", where, i, a.GetId(), ErrStageInDataserver)
		}
		if err := validateActions(a.GetOnError(), fmt.Sprintf("%s.actions[%d].on_error", where, i)); err != nil {
			return err
		}
	}
	return nil
}

// validateEnum rejects a value the enum does not define.
func validateEnum[E ~int32](what string, v E, names map[int32]string) error {
	if _, ok := names[int32(v)]; !ok {
		return fmt.Errorf("%s %d: not a known value", what, v)
	}
	return nil
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
	if err := validateEnum("classad.state", c.State, VMState_name); err != nil {
		return err
	}
	if err := validateActions(r.GetConfig().GetActions(), "config"); err != nil {
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
func (r *StageOutRequest) Validate() error {
	if err := validateVMID(r.VmId, true); err != nil {
		return err
	}
	return validateDataCredential(r.DataCredential)
}
