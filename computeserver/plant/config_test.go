package plant

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteResumeKernel(t *testing.T) {
	dir := t.TempDir()
	// A bzImage: 7 setup sectors after the boot sector, then the payload.
	kernel := make([]byte, 1<<20)
	for i := range kernel {
		kernel[i] = byte(i*7 + 1)
	}
	kernel[0x1f1] = 7
	copy(kernel[0x202:], "HdrS")
	in := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(in, kernel, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, ResumeKernelFile)
	if err := WriteResumeKernel(in, out); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := kernel[:8*512+4096]; !bytes.Equal(got, want) {
		t.Fatalf("resume kernel of %d bytes, want the %d of the setup sectors and a page", len(got), len(want))
	}

	// Not a bzImage: refused, nothing written.
	if err := os.WriteFile(in, bytes.Repeat([]byte{1}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(out)
	if err := WriteResumeKernel(in, out); err == nil || !strings.Contains(err.Error(), "not an x86 bzImage") {
		t.Fatalf("a file without a kernel header: %v", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatal("a resume kernel was written for a file that is no kernel")
	}
}
