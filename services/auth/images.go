package auth

import (
	"context"
	"fmt"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Images made from one owner's VM (imagev1.OwnerLabel: a published VM, a
// suspended VM's state, a persistent root disk) hold that owner's data:
// owners see, list and read only those that are theirs and the grid's
// (unlabelled) images; operators, publishers and services see all. The
// image server and the cache proxies apply it to every read.

// ImageVisible reports whether the caller of ctx may see an image with
// attributes a. A context without a caller (a server without tokens, an
// in-process call) sees every image.
func ImageVisible(ctx context.Context, a *imagev1.ImageAttributes) bool {
	c, err := CallerOf(ctx)
	if err != nil {
		return true
	}
	return c.Role != RoleOwner || a.OwnedBy(c.Name)
}

// CheckImage refuses (PermissionDenied) an image the caller may not see.
func CheckImage(ctx context.Context, m *imagev1.Manifest) error {
	if ImageVisible(ctx, m.GetAttributes()) {
		return nil
	}
	return fmt.Errorf("image %q belongs to another owner: %w", m.GetName(), errdefs.ErrPermissionDenied)
}

// VisibleImages keeps the images of a listing the caller may see.
func VisibleImages(ctx context.Context, ms []*imagev1.Manifest) []*imagev1.Manifest {
	out := ms[:0]
	for _, m := range ms {
		if ImageVisible(ctx, m.GetAttributes()) {
			out = append(out, m)
		}
	}
	return out
}
