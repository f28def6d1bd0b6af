package computev1

import imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"

// Validate checks a PublishVM request.
func (r *PublishVMRequest) Validate() error {
	if err := validateVMID(r.VmId, true); err != nil {
		return err
	}
	if err := imagev1.ValidateName("name", r.Name); err != nil {
		return err
	}
	return (&imagev1.ImageAttributes{Labels: r.Labels}).Validate()
}
