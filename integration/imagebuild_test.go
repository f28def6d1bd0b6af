package integration

import (
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// TestImageBuildCommand: `vmgrid image build tiny` boots the recipe under
// QEMU, runs the --exec actions in the guest, suspends it and publishes an
// image with a kernel, a root disk, a memory state and the actions recorded;
// a second build under the same name is refused before any work.
func TestImageBuildCommand(t *testing.T) {
	testutil.NeedQEMU(t)
	is := startImageServer(t)
	out := run(t, "image", "build", "tiny", "--server", is.Addr, "--name", "app", "--agent", testutil.GuestAgent(t),
		"--exec", "echo configured > /etc/app.conf", "--log-level", "warn")
	if !strings.Contains(out, "built and published app") || !strings.Contains(out, "1 actions performed") {
		t.Fatalf("vmgrid image build: %s", out)
	}
	m, err := imageClient(t, is.Addr).API.GetImage(context.Background(), &imagev1.GetImageRequest{Name: "app"})
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[imagev1.FileKind]bool{}
	for _, f := range m.GetManifest().GetFiles() {
		kinds[f.GetKind()] = true
	}
	for _, k := range []imagev1.FileKind{imagev1.FileKind_FILE_KIND_CONFIG, imagev1.FileKind_FILE_KIND_KERNEL, imagev1.FileKind_FILE_KIND_DISK, imagev1.FileKind_FILE_KIND_MEMORY_STATE} {
		if !kinds[k] {
			t.Errorf("the image has no %v file", k)
		}
	}
	acts := m.GetManifest().GetAttributes().GetActions()
	if len(acts) != 1 || acts[0].GetKind() != "exec" || acts[0].GetDigest() == "" {
		t.Errorf("recorded actions: %v", acts)
	}

	again, err := exec.Command(vmgridBin(t), "image", "build", "tiny", "--server", is.Addr, "--name", "app", "--agent", testutil.GuestAgent(t)).CombinedOutput()
	if err == nil || !strings.Contains(string(again), `image "app" already exists`) {
		t.Fatalf("a second build of app: %v: %s", err, again)
	}
	if out, err := exec.Command(vmgridBin(t), "image", "build", "huge", "--server", is.Addr).CombinedOutput(); err == nil || !strings.Contains(string(out), "unknown recipe") {
		t.Fatalf("an unknown recipe: %v: %s", err, out)
	}
}
