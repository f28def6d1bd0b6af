package shopv1

import (
	"errors"
	"fmt"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Limits. What the shop accepts it must be able to record, and the plant
// must accept (computev1's limits): a CreateVM request leaves room for
// what the shop adds before it asks a plant (VM id, owner, data
// credential).
const (
	MaxRequestBytes = computev1.MaxRequestBytes - computev1.MaxDataCredentialLen - 4<<10 // a whole CreateVM or SubmitTask request
	MaxLabels       = computev1.MaxLabels
	MaxLabelKey     = computev1.MaxLabelKey
	MaxLabelValue   = computev1.MaxLabelValue
	MaxLabelBytes   = computev1.MaxLabelBytes
	MaxCommandBytes = 64 << 10
	MaxTaskInputs   = 1024
	MaxTaskTimeout  = 7 * 24 * 3600 // seconds
)

// Validate checks a CreateVM request; the configuration DAG is checked by
// the shop (package dag), which names the node at fault.
func (r *CreateVMRequest) Validate() error {
	if err := imagev1.ValidateName("request_id", r.RequestId); err != nil {
		return err
	}
	if r.NetworkDomain != "" {
		if err := imagev1.ValidateName("network_domain", r.NetworkDomain); err != nil {
			return err
		}
	}
	if err := validateCommon(r.Image, r.Hardware); err != nil {
		return err
	}
	if err := computev1.ValidateLabels(r.Labels); err != nil {
		return err
	}
	return computev1.ValidateSize("request", r, MaxRequestBytes)
}

// validateCommon checks what VM and task requests share.
func validateCommon(image string, h *computev1.Hardware) error {
	if image != "" {
		if err := imagev1.ValidateName("image", image); err != nil {
			return err
		}
	}
	if h == nil {
		return nil
	}
	if h.Vcpus > 256 || h.MemoryMib > 4<<20 {
		return errors.New("hardware: at most 256 vCPUs and 4 TiB of memory")
	}
	if h.Arch != "" {
		return imagev1.ValidateName("hardware.arch", h.Arch)
	}
	return nil
}

// Validate checks a GetVM request.
func (r *GetVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a DestroyVM request.
func (r *DestroyVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a WatchVM request.
func (r *WatchVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a task submission, before any VM is made for it: inputs
// and the output prefix are data-server paths of the owner's.
func (r *SubmitTaskRequest) Validate() error {
	if err := imagev1.ValidateName("request_id", r.RequestId); err != nil {
		return err
	}
	switch {
	case r.Command == "":
		return errors.New("command is required")
	case len(r.Command) > MaxCommandBytes:
		return fmt.Errorf("command is %d bytes; the limit is %d", len(r.Command), MaxCommandBytes)
	case len(r.Inputs) > MaxTaskInputs:
		return fmt.Errorf("at most %d input files", MaxTaskInputs)
	case r.TimeoutSeconds > MaxTaskTimeout:
		return fmt.Errorf("timeout_seconds %d: at most %d (a week)", r.TimeoutSeconds, MaxTaskTimeout)
	}
	for i, in := range r.Inputs {
		if err := datav1.ValidatePath(fmt.Sprintf("inputs[%d]", i), in); err != nil {
			return err
		}
	}
	if r.OutputPrefix != "" {
		if err := datav1.ValidatePath("output_prefix", r.OutputPrefix); err != nil {
			return err
		}
	}
	if err := validateCommon(r.Image, r.Hardware); err != nil {
		return err
	}
	return computev1.ValidateSize("task", r, MaxRequestBytes)
}

// Validate checks a task lookup.
func (r *GetTaskRequest) Validate() error { return imagev1.ValidateName("task_id", r.TaskId) }

// Validate checks a MigrateVM request.
func (r *MigrateVMRequest) Validate() error {
	if err := imagev1.ValidateName("vm_id", r.VmId); err != nil {
		return err
	}
	if r.To != "" {
		return imagev1.ValidateName("to", r.To)
	}
	return nil
}
