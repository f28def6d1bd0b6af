package shopv1

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Limits. What the shop accepts it must be able to record: a request's VM
// record (its classad with the request's labels and results) goes into one
// etcd write, and etcd refuses writes over 1.5 MiB by default, so a request
// is held well under that.
const (
	MaxRequestBytes = 256 << 10 // a whole CreateVM or SubmitTask request
	MaxLabels       = 64
	MaxLabelKey     = 128
	MaxLabelValue   = 1024
	MaxLabelBytes   = 16 << 10 // all labels together
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
	if err := validateLabels(r.Labels); err != nil {
		return err
	}
	return validateSize("request", r)
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

func validateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels; the limit is %d", len(labels), MaxLabels)
	}
	total := 0
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelKey || hasControl(k) {
			return fmt.Errorf("label key %.40q: 1 to %d printable bytes", k, MaxLabelKey)
		}
		if len(v) > MaxLabelValue {
			return fmt.Errorf("label %q: value is %d bytes; the limit is %d", k, len(v), MaxLabelValue)
		}
		total += len(k) + len(v)
	}
	if total > MaxLabelBytes {
		return fmt.Errorf("labels are %d bytes; the limit is %d", total, MaxLabelBytes)
	}
	return nil
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}

func validateSize(what string, m proto.Message) error {
	if n := proto.Size(m); n > MaxRequestBytes {
		return fmt.Errorf("%s is %d bytes; the limit is %d (it must fit in the VM's record)", what, n, MaxRequestBytes)
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
	return validateSize("task", r)
}

// Validate checks a task lookup.
func (r *GetTaskRequest) Validate() error { return imagev1.ValidateName("task_id", r.TaskId) }
