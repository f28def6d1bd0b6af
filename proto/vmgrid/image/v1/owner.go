package imagev1

// Labels the grid itself sets on images (keys starting with "vmgrid."; a
// request's own labels may not use the prefix).
const (
	// OwnerLabel names the owner of an image made from one owner's VM (a
	// published VM, a suspended VM's state, a persistent root disk): the
	// image server shows and serves it to that owner (and to services,
	// publishers and operators) only, and the shop matches it for that
	// owner's requests only. An image without it is the grid's: everyone
	// reads it.
	OwnerLabel = "vmgrid.owner"
	// VMLabel names the VM an image was made from (PublishVM) or for (a
	// persistent root disk).
	VMLabel = "vmgrid.vm"
	// RequestLabel is the request id of the PublishVM that made an image:
	// a retry of that request finds it.
	RequestLabel = "vmgrid.request"
	// SuspendedLabel marks a suspended VM's memory state (its VM id): no
	// golden image, only that VM resumes from it.
	SuspendedLabel = "suspended-vm"
	// GridLabelPrefix starts every key the grid sets.
	GridLabelPrefix = "vmgrid."
)

// OwnedBy reports whether an image with these attributes is owner's to
// see: it has no owner, or it is owner's.
func (a *ImageAttributes) OwnedBy(owner string) bool {
	o := a.GetLabels()[OwnerLabel]
	return o == "" || o == owner
}
