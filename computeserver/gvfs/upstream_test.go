package gvfs_test

import (
	"context"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
)

// TestManifestCompressed: an upstream dialled with compress asks for FULL
// manifests gzipped (a mostly-zero RAM file's digests repeat), so far
// fewer bytes cross, and gets the same manifest as one that does not.
func TestManifestCompressed(t *testing.T) {
	srv := testutil.StartServer(t, "")
	ram := make([]byte, 64<<20)
	testutil.RandomData(rand.New(rand.NewPCG(3, 4)), ram[4<<20:5<<20])
	gvfstest.Publish(t, srv.Client, "img", gvfstest.GoldenFile{Name: "mem.ram", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE,
		Policy: imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS, BS: 64 << 10, Data: ram})
	ctx := context.Background()
	want, err := srv.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "img", View: imagev1.View_VIEW_FULL})
	if err != nil {
		t.Fatal(err)
	}
	received := map[bool]int64{}
	for _, compress := range []bool{false, true} {
		var n atomic.Int64
		counted := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			return countingConn{c, &n}, err
		})
		up, err := gvfs.DialUpstream(srv.Srv.Addr(), services.TLSFiles{}, compress, counted)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := up.List(ctx); err != nil { // connected, before counting
			t.Fatal(err)
		}
		before := n.Load()
		got, err := up.Manifest(ctx, "img")
		received[compress] = n.Load() - before
		up.Close()
		if err != nil {
			t.Fatalf("compress %v: %v", compress, err)
		}
		if !proto.Equal(got, want.Manifest) {
			t.Fatalf("compress %v: the manifest differs from the one asked for uncompressed", compress)
		}
	}
	t.Logf("manifest of a 64 MiB RAM file, 1 MiB of it not zero: %d bytes plain, %d gzipped (%d in the message)",
		received[false], received[true], proto.Size(want.Manifest))
	if received[true]*4 > received[false] {
		t.Fatalf("the manifest took %d bytes asked for gzipped, %d plain: want far fewer", received[true], received[false])
	}
}

// countingConn counts the bytes read from a connection.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}
