package computev1

import imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"

// Validate checks a flush request.
func (r *FlushRequest) Validate() error {
	if r.Disk == "" {
		return nil
	}
	return imagev1.ValidateName("disk", r.Disk)
}
