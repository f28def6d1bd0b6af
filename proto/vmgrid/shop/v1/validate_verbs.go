package shopv1

import (
	"fmt"
	"strings"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// validateVerb checks what every state-moving verb's request has.
func validateVerb(vmID, requestID string) error {
	if err := imagev1.ValidateName("vm_id", vmID); err != nil {
		return err
	}
	return imagev1.ValidateName("request_id", requestID)
}

// Validate checks a SuspendVM request.
func (r *SuspendVMRequest) Validate() error { return validateVerb(r.VmId, r.RequestId) }

// Validate checks a ResumeVM request.
func (r *ResumeVMRequest) Validate() error {
	if err := validateVerb(r.VmId, r.RequestId); err != nil {
		return err
	}
	if r.Plant != "" {
		return imagev1.ValidateName("plant", r.Plant)
	}
	return nil
}

// Validate checks a PublishVM request: the name is checked here, before
// the VM is looked at.
func (r *PublishVMRequest) Validate() error {
	if err := validateVerb(r.VmId, r.RequestId); err != nil {
		return err
	}
	if err := imagev1.ValidateName("name", r.Name); err != nil {
		return err
	}
	for k := range r.Labels {
		if strings.HasPrefix(k, imagev1.GridLabelPrefix) {
			return fmt.Errorf("label %q: keys starting with %q are the grid's", k, imagev1.GridLabelPrefix)
		}
	}
	// The image server's rules for labels: names as keys (a grid's
	// labels leave room for the user's within its limit).
	if len(r.Labels) > imagev1.MaxLabels-4 {
		return fmt.Errorf("%d labels; the limit is %d", len(r.Labels), imagev1.MaxLabels-4)
	}
	return (&imagev1.ImageAttributes{Labels: r.Labels}).Validate()
}

// Validate checks a DrainPlant request.
func (r *DrainPlantRequest) Validate() error { return imagev1.ValidateName("plant", r.Plant) }
