package dataserver

import (
	"testing"

	"github.com/spf13/pflag"
)

func TestStoreConfigFlags(t *testing.T) {
	c := DefaultStoreConfig()
	fs := pflag.NewFlagSet("dataserver", pflag.ContinueOnError)
	c.AddFlags(fs)
	if c != DefaultStoreConfig() {
		t.Fatalf("after AddFlags: %+v, want the defaults %+v (flags show c's values)", c, DefaultStoreConfig())
	}
	dir := t.TempDir()
	if err := fs.Parse([]string{"--data-dir", dir, "--max-file-size", "100GiB"}); err != nil {
		t.Fatal(err)
	}
	s, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	if s.dir != dir || s.MaxFileSize != 100<<30 {
		t.Fatalf("store in %s with max file size %d", s.dir, s.MaxFileSize)
	}
	for v, want := range map[string]uint64{"0": 0, "4096": 4096, "64KiB": 64 << 10, "512 MiB": 512 << 20, "2T": 2 << 40} {
		if err := fs.Set("max-file-size", v); err != nil || c.MaxFileSize != want {
			t.Errorf("--max-file-size %s: %d, %v; want %d", v, c.MaxFileSize, err, want)
		}
	}
	for _, v := range []string{"", "x", "-1", "1.5GiB", "3PiB"} {
		if err := fs.Set("max-file-size", v); err == nil {
			t.Errorf("--max-file-size %q accepted", v)
		}
	}
}
