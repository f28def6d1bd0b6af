package plant

import (
	"context"
	"fmt"
	"net"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// DialGuest: TEMPORARY placeholder until the networks branch (h-net) lands
// with the real one; removed at merge.
func (p *Plant) DialGuest(ctx context.Context, vmID string, port int) (net.Conn, error) {
	return nil, fmt.Errorf("vm %q has no network: %w", vmID, errdefs.ErrFailedPrecondition)
}
