package imageserver

import (
	"testing"

	"github.com/spf13/pflag"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

func TestStoreConfigFlags(t *testing.T) {
	c := DefaultStoreConfig()
	fs := pflag.NewFlagSet("imageserver", pflag.ContinueOnError)
	c.AddFlags(fs)
	if c != DefaultStoreConfig() {
		t.Fatalf("after AddFlags: %+v, want the defaults %+v (flags show c's values)", c, DefaultStoreConfig())
	}
	dir := t.TempDir()
	if err := fs.Parse([]string{"--data-dir", dir, "--block-size", "16384"}); err != nil {
		t.Fatal(err)
	}
	s, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	if s.dir != dir || s.defaultBlockSize != 16384 {
		t.Fatalf("store in %s with block size %d", s.dir, s.defaultBlockSize)
	}
	c.BlockSize = 0
	if s, err = c.Open(); err != nil || s.defaultBlockSize != blockproto.DefaultBlockSize {
		t.Fatalf("block size 0: %v, %d", err, s.defaultBlockSize)
	}
	c.BlockSize = 5000
	if _, err := c.Open(); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("block size 5000: %v, want InvalidArgument", err)
	}
}
