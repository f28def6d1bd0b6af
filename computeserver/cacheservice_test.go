package computeserver

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// TestFlushNames: `vmgrid cache flush --disk NAME` of a name that is no
// persistent disk is an error (it answered OK with nothing written back).
func TestFlushNames(t *testing.T) {
	is := testutil.StartServer(t, "")
	publishDisk(t, is.Client, make([]byte, 1<<20))
	pl := servePlant(t, Config{Upstream: is.Srv.Addr(), DataDir: t.TempDir(), Proxy: gvfs.Config{FlushIdle: -1}})
	cache := cacheClient(t, pl.Server.Addr())
	for _, c := range []struct {
		disk string
		want codes.Code
	}{
		{"nosuch", codes.NotFound},
		{"golden", codes.InvalidArgument},
		{"disk", codes.OK},
	} {
		_, err := cache.Flush(ctxT(t), &computev1.FlushRequest{Disk: c.disk})
		if got := status.Code(err); got != c.want {
			t.Errorf("flush --disk %s: %v, want %s", c.disk, err, c.want)
		}
	}
}
