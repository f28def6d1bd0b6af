package integration

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/internal/testutil"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The verbs that move a VM's state, through the shop of a real grid (two
// plants, tiny guests under QEMU, FUSE views, etcd, mutual TLS and tokens):
// a persistent VM suspended on one plant and resumed on the other keeps
// what it wrote; a running clone published as a
// golden image runs on, and a VM created from the image has its files and
// skips its actions; other owners, wrong states and bad names are refused.

// sh runs a shell script in a VM through the shop and returns its output.
func sh(t *testing.T, ctx context.Context, c shopv1.ShopServiceClient, vm, script string) string {
	t.Helper()
	out, errOut, exit, err := execResult(startExec(t, ctx, c, &computev1.ExecStart{VmId: vm, Argv: []string{"sh", "-c", script}}))
	if err == nil {
		err = exitErr(exit)
	}
	if err != nil {
		t.Fatalf("exec %q in %s: %v: %s", script, vm, err, errOut)
	}
	return strings.TrimSpace(out)
}

// loadAverage is the machine's load, beside a figure logged.
func loadAverage() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:min(3, len(strings.Fields(string(b))))], " ")
}

func resume(ctx context.Context, c shopv1.ShopServiceClient, req *shopv1.ResumeVMRequest) (*computev1.ClassAd, []string, error) {
	s, err := c.ResumeVM(ctx, req)
	if err != nil {
		return nil, nil, err
	}
	var stages []string
	for {
		p, err := s.Recv()
		if err != nil {
			return nil, stages, err
		}
		stages = append(stages, p.Stage)
		if p.Classad != nil {
			return p.Classad, stages, nil
		}
	}
}

// onPlant reports whether the plant named has the VM.
func (g *accessGrid) onPlant(name, vm string) bool {
	for _, p := range g.Plants {
		if p.Line.Offer().Name != name {
			continue
		}
		_, err := p.Line.GetVM(vm)
		return err == nil
	}
	return false
}

func (g *accessGrid) otherPlant(name string) string {
	for _, p := range g.Plants {
		if n := p.Line.Offer().Name; n != name {
			return n
		}
	}
	return ""
}

func TestStateMovingVerbs(t *testing.T) {
	g := startAccessGridOf(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	images := imagev1.NewImageServiceClient(asCaller(t, g.Images.Addr(), g.OperatorToken))
	ownerImages := imagev1.NewImageServiceClient(asCaller(t, g.Images.Addr(), g.Token))
	theirImages := imagev1.NewImageServiceClient(asCaller(t, g.Images.Addr(), malloryToken))

	home, err := testutil.CreateVM(ctx, g.mine, &shopv1.CreateVMRequest{RequestId: "home", Persistent: true})
	if err != nil {
		t.Fatal(err)
	}
	if home.PersistentDisk != home.VmId+"-root" {
		t.Fatalf("persistent VM's disk %q", home.PersistentDisk)
	}
	sh(t, ctx, g.mine, home.VmId, "echo written-before-suspend > /root/persist.txt && sync")

	t.Run("refusals", func(t *testing.T) {
		_, err := g.theirs.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: home.VmId, RequestId: "s1"})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")
		_, _, err = resume(ctx, g.theirs, &shopv1.ResumeVMRequest{VmId: home.VmId, RequestId: "r1"})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")
		_, err = g.theirs.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: home.VmId, RequestId: "p1", Name: "stolen"})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")
		_, _, err = resume(ctx, g.mine, &shopv1.ResumeVMRequest{VmId: home.VmId, RequestId: "r1"})
		wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "RUNNING", "suspend it first")
		_, err = g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: home.VmId, RequestId: "p1", Name: "../x"})
		wantCode(t, err, nil, codes.InvalidArgument, "name")
		_, err = g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: home.VmId, RequestId: "p1", Name: "tiny"})
		wantCode(t, err, errdefs.IsAlreadyExists, codes.AlreadyExists, "tiny")
		_, err = g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: home.VmId, RequestId: "p1", Name: "x", Labels: map[string]string{imagev1.OwnerLabel: "mallory"}})
		wantCode(t, err, nil, codes.InvalidArgument, "grid's")
	})

	// One suspend: under -race the image server's compression of a 60 MB
	// state takes a minute. Resuming by auction (the market CreateVM uses)
	// is tested with fake plants in shop/verbs_test.go.
	t.Run("suspend on one plant, resume on the other", func(t *testing.T) {
		first := home.Plant
		sus, err := g.mine.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: home.VmId, RequestId: "s1"})
		if err != nil {
			t.Fatal(err)
		}
		if sus.State != computev1.VMState_VM_STATE_SUSPENDED || sus.SuspendedImage == "" || sus.Plant != "" || sus.PersistentDisk != home.PersistentDisk {
			t.Fatalf("suspended classad: state %v image %q plant %q disk %q", sus.State, sus.SuspendedImage, sus.Plant, sus.PersistentDisk)
		}
		if g.onPlant(first, home.VmId) {
			t.Fatalf("plant %s still holds the suspended VM", first)
		}
		got, err := g.mine.GetVM(ctx, &shopv1.GetVMRequest{VmId: home.VmId})
		if err != nil || got.State != computev1.VMState_VM_STATE_SUSPENDED || got.SuspendedImage != sus.SuspendedImage {
			t.Fatalf("GetVM of the suspended VM: %v %v", got, err)
		}
		// A retry answers the same; a second suspend is refused.
		again, err := g.mine.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: home.VmId, RequestId: "s1"})
		if err != nil || again.SuspendedImage != sus.SuspendedImage {
			t.Fatalf("retried suspend: %v %v", again, err)
		}
		_, err = g.mine.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: home.VmId, RequestId: "s2"})
		wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "resume it first")
		// Its state is the owner's: others cannot read it at the image server.
		_, err = theirImages.GetImage(ctx, &imagev1.GetImageRequest{Name: sus.SuspendedImage})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")

		_, _, err = resume(ctx, g.mine, &shopv1.ResumeVMRequest{VmId: home.VmId, RequestId: "r0", Plant: "nope"})
		wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "not registered")
		second := g.otherPlant(first)
		back, stages, err := resume(ctx, g.mine, &shopv1.ResumeVMRequest{VmId: home.VmId, RequestId: "r1", Plant: second})
		if err != nil {
			t.Fatal(err)
		}
		if back.State != computev1.VMState_VM_STATE_RUNNING || back.Plant != second || !g.onPlant(second, home.VmId) || stages[len(stages)-1] != "ready" {
			t.Fatalf("resumed on %q (want %s), state %v, stages %v", back.Plant, second, back.State, stages)
		}
		if out := sh(t, ctx, g.mine, home.VmId, "cat /root/persist.txt"); out != "written-before-suspend" {
			t.Fatalf("after resume on %s: %q", second, out)
		}
		if again, _, err := resume(ctx, g.mine, &shopv1.ResumeVMRequest{VmId: home.VmId, RequestId: "r1"}); err != nil || again.Plant != second {
			t.Fatalf("retried resume: %v %v", again, err)
		}

		sh(t, ctx, g.mine, home.VmId, "echo second-write >> /root/persist.txt && sync")
		if out := sh(t, ctx, g.mine, home.VmId, "cat /root/persist.txt"); out != "written-before-suspend\nsecond-write" {
			t.Fatalf("writing after the resume: %q", out)
		}
	})

	t.Run("a clone cannot be suspended", func(t *testing.T) {
		clone := g.createVM(t, ctx, "clone")
		_, err := g.mine.SuspendVM(ctx, &shopv1.SuspendVMRequest{VmId: clone, RequestId: "s1"})
		wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "--persistent")
		if _, err := g.mine.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: clone}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("publish a running VM, create from the image", func(t *testing.T) {
		write := func(id, path, content string, after ...string) *computev1.Action {
			return &computev1.Action{Id: id, After: after, Kind: &computev1.Action_WriteFile{WriteFile: &computev1.WriteFileAction{Path: path, Content: []byte(content)}}}
		}
		base := []*computev1.Action{write("motd", "/etc/motd", "configured\n"), write("conf", "/root/app.conf", "port=80\n", "motd")}
		src, err := testutil.CreateVM(ctx, g.mine, &shopv1.CreateVMRequest{RequestId: "tmpl", Config: &computev1.ConfigDAG{Actions: base}})
		if err != nil {
			t.Fatal(err)
		}
		sh(t, ctx, g.mine, src.VmId, "echo by-hand > /root/hand.txt")
		pub, err := g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: src.VmId, RequestId: "p1", Name: "web-base", Labels: map[string]string{"role": "web"}})
		if err != nil {
			t.Fatal(err)
		}
		m := pub.Image
		t.Logf("published %s: guest paused %v, %d bytes uploaded (load %s)", m.Name, time.Duration(pub.PausedNanos), pub.PublishedBytes, loadAverage())
		l := m.GetAttributes().GetLabels()
		if l[imagev1.OwnerLabel] != "demo" || l["role"] != "web" || m.Attributes.Parent != "tiny" || len(m.Attributes.Actions) != 2 ||
			m.Attributes.Actions[0].Digest != src.Actions[0].Digest || m.Attributes.Actions[1].Digest != src.Actions[1].Digest {
			t.Fatalf("published image: labels %v parent %q actions %v", l, m.Attributes.Parent, m.Attributes.Actions)
		}
		var ram bool
		for _, f := range m.Files {
			ram = ram || f.Name == "mem.ram"
		}
		if !ram {
			t.Fatalf("the image of a lazy clone has no RAM file: %v", m.Files)
		}
		// The VM runs on, and a retry answers the same.
		if pub.Classad.State != computev1.VMState_VM_STATE_RUNNING || sh(t, ctx, g.mine, src.VmId, "cat /root/hand.txt") != "by-hand" {
			t.Fatalf("the VM after publishing: %v", pub.Classad.State)
		}
		if again, err := g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: src.VmId, RequestId: "p1", Name: "web-base"}); err != nil || again.Image.Name != "web-base" {
			t.Fatalf("retried publish: %v %v", again, err)
		}
		_, err = g.mine.PublishVM(ctx, &shopv1.PublishVMRequest{VmId: src.VmId, RequestId: "p2", Name: "web-base"})
		wantCode(t, err, errdefs.IsAlreadyExists, codes.AlreadyExists, "web-base")

		// The same DAG and one more action: the matcher picks the new image
		// and only the new action runs.
		more := append(base, &computev1.Action{Id: "check", After: []string{"conf"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{
			Argv: []string{"sh", "-c", `echo "hand=$(cat /root/hand.txt)" > "$VMGRID_RESULTS"`}}}})
		kid, err := testutil.CreateVM(ctx, g.mine, &shopv1.CreateVMRequest{RequestId: "kid", Config: &computev1.ConfigDAG{Actions: more}})
		if err != nil {
			t.Fatal(err)
		}
		if kid.Image != "web-base" || !kid.Actions[0].Skipped || !kid.Actions[1].Skipped || kid.Actions[2].Skipped || kid.Actions[2].Results["hand"] != "by-hand" {
			t.Fatalf("clone of the published image: image %q actions %v", kid.Image, kid.Actions)
		}
		if out := sh(t, ctx, g.mine, kid.VmId, "cat /etc/motd /root/app.conf /root/hand.txt"); out != "configured\nport=80\nby-hand" {
			t.Fatalf("the clone's files: %q", out)
		}

		// Another owner neither matches, nor pins, nor reads it.
		theirs, err := testutil.CreateVM(ctx, g.theirs, &shopv1.CreateVMRequest{RequestId: "kid", Config: &computev1.ConfigDAG{Actions: more}})
		if err != nil || theirs.Image != "tiny" {
			t.Fatalf("another owner's VM from the same DAG: %v %v", theirs, err)
		}
		_, err = testutil.CreateVM(ctx, g.theirs, &shopv1.CreateVMRequest{RequestId: "pin", Image: "web-base"})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "web-base")
		_, err = theirImages.GetImage(ctx, &imagev1.GetImageRequest{Name: "web-base"})
		wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "another owner")
		for name, c := range map[string]imagev1.ImageServiceClient{"demo": ownerImages, "mallory": theirImages} {
			list, err := c.ListImages(ctx, &imagev1.ListImagesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			var seen bool
			for _, m := range list.Images {
				seen = seen || m.Name == "web-base"
			}
			if seen != (name == "demo") {
				t.Fatalf("%s lists web-base: %v", name, seen)
			}
		}
		for _, c := range []struct {
			c  shopv1.ShopServiceClient
			id string
		}{{g.mine, src.VmId}, {g.mine, kid.VmId}, {g.theirs, theirs.VmId}} {
			if _, err := c.c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: c.id}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("destroy removes the persistent disk", func(t *testing.T) {
		if _, err := g.mine.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: home.VmId}); err != nil {
			t.Fatal(err)
		}
		if _, err := images.GetImage(ctx, &imagev1.GetImageRequest{Name: home.PersistentDisk}); !errdefs.IsNotFound(err) {
			t.Fatalf("the destroyed VM's disk %s: %v", home.PersistentDisk, err)
		}
		states, err := images.ListImages(ctx, &imagev1.ListImagesRequest{Labels: map[string]string{imagev1.SuspendedLabel: home.VmId}})
		if err != nil || len(states.Images) != 0 {
			t.Fatalf("the destroyed VM's states are left: %v %v", states, err)
		}
	})
}
