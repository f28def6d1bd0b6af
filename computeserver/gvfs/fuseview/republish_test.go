package fuseview_test

import (
	"bytes"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// TestRepublishedImage: an image deleted and published again under the same
// name shows its new files through the view once the proxy rechecks its
// manifest (the kernel's cached pages of the old files do not answer for
// them), and a deleted image disappears from the view.
func TestRepublishedImage(t *testing.T) {
	srv := testutil.StartServer(t, "")
	rng := rand.New(rand.NewPCG(9, 9))
	version := func() []gvfstest.GoldenFile {
		disk := make([]byte, 2<<20)
		for i := range disk {
			disk[i] = byte(rng.Uint32())
		}
		return []gvfstest.GoldenFile{
			{Name: "disk.raw", Kind: imagev1.FileKind_FILE_KIND_DISK, Data: disk},
			{Name: "mem.state", Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, Data: testutil.MemoryLike(rng, 3<<20, 0.2, 0.3)},
		}
	}
	ctx := gvfstest.Ctx(t)
	v1, v2 := version(), version()
	gvfstest.Publish(t, srv.Client, "img", v1...)
	p := gvfstest.NewProxy(t, srv.Srv.Addr(), "", func(c *gvfs.Config) { c.GoldenRecheck = 200 * time.Millisecond })
	mnt := gvfstest.Mount(t, p)
	for _, f := range v1 {
		got, err := os.ReadFile(filepath.Join(mnt, "img", f.Name))
		if err != nil {
			t.Fatal(err)
		}
		gvfstest.SameBytes(t, "v1 "+f.Name, got, f.Data)
	}

	if _, err := srv.Client.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "img"}); err != nil {
		t.Fatal(err)
	}
	gvfstest.Publish(t, srv.Client, "img", v2...)
	for _, f := range v2 {
		path := filepath.Join(mnt, "img", f.Name)
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err := os.ReadFile(path)
			if err == nil && bytes.Equal(got, f.Data) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still not the republished file after 10s (err %v; %s)", f.Name, err, gvfstest.FirstDiff(got, f.Data))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	if _, err := srv.Client.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "img"}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := os.Stat(filepath.Join(mnt, "img", "disk.raw"))
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a deleted image is still in the view after 10s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
