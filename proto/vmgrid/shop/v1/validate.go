package shopv1

import (
	"errors"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
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
	if r.Image != "" {
		if err := imagev1.ValidateName("image", r.Image); err != nil {
			return err
		}
	}
	if h := r.Hardware; h != nil && (h.Vcpus > 256 || h.MemoryMib > 4<<20) {
		return errors.New("hardware: at most 256 vCPUs and 4 TiB of memory")
	}
	return nil
}

// Validate checks a GetVM request.
func (r *GetVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a DestroyVM request.
func (r *DestroyVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a WatchVM request.
func (r *WatchVMRequest) Validate() error { return imagev1.ValidateName("vm_id", r.VmId) }

// Validate checks a task submission.
func (r *SubmitTaskRequest) Validate() error {
	if err := imagev1.ValidateName("request_id", r.RequestId); err != nil {
		return err
	}
	if r.Command == "" {
		return errors.New("command is required")
	}
	if len(r.Inputs) > 1024 {
		return errors.New("at most 1024 input files")
	}
	return nil
}

// Validate checks a task lookup.
func (r *GetTaskRequest) Validate() error { return imagev1.ValidateName("task_id", r.TaskId) }
