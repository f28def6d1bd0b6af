package shop_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	"github.com/vmgrid/vmgrid/internal/testutil/goldens"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
)

const aliceKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjg1xS9a7b2QDVlLmLrbQxuw2zpd1XGWB4VL6HtWn5N alice@test"

// TestDebianThroughShop clones the Debian golden image (systemd, sshd, the
// agent as a service; built once per machine, see internal/testutil/goldens)
// through the shop, configured as a user would, and checks that clones of
// one image — Debian and tiny — are not twins.
func TestDebianThroughShop(t *testing.T) {
	deb := goldens.Debian(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	// Built before the grid starts: a build's busy minute on a loaded
	// machine can cost running plants their etcd lease.
	built := execA("built", nil, "echo built-in > /etc/built")
	tinyBuilt, err := plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: "tiny-built", WorkDir: testutil.ShortTempDir(t), Driver: &vmm.QEMU{},
		Recipe:  &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)}},
		Actions: []*computev1.Action{built},
	})
	if err != nil {
		t.Fatal(err)
	}
	g, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(t), Plants: 2, Golden: "tiny", AgentPath: testutil.GuestAgent(t), NoFsync: true, Insecure: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	cc, err := services.Dial(g.Images.Addr(), services.TLSFiles{}, services.WithToken(g.OperatorToken, services.TLSFiles{}))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	images := imageclient.NewClient(cc)
	start := time.Now()
	if err := deb.Publish(ctx, images, "debian"); err != nil {
		t.Fatal(err)
	}
	t.Logf("debian golden published in %s (built in %s, 0: from the cache)", time.Since(start).Round(time.Millisecond), deb.Built)
	alice := shopClient(t, g.Shop.Addr(), g.Token)
	in := func(ad *computev1.ClassAd, script string) string {
		t.Helper()
		for _, p := range g.Plants {
			if _, err := p.Line.GetVM(ad.VmId); err != nil {
				continue
			}
			resp, err := p.Line.Exec(ctx, ad.VmId, &computev1.ExecAction{Argv: []string{"sh", "-c", script}})
			if err != nil || resp.ExitCode != 0 || resp.Error != "" {
				t.Fatalf("exec %q in %s: %v %+v", script, ad.VmId, err, resp)
			}
			return strings.TrimSpace(string(resp.Stdout))
		}
		t.Fatalf("no plant %s", ad.Plant)
		return ""
	}

	t.Run("a debian clone configured through the shop", func(t *testing.T) {
		req := &shopv1.CreateVMRequest{RequestId: "deb1", Image: "debian", Config: &computev1.ConfigDAG{Actions: []*computev1.Action{
			{Id: "name", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: "web1"}}},
			{Id: "user", Kind: &computev1.Action_AddUser{AddUser: &computev1.AddUserAction{User: "alice", SshKey: aliceKey}}},
			execA("app", []string{"user"}, "echo configured > /etc/app.conf"),
		}}}
		start := time.Now()
		ad, err := createVM(ctx, alice, req)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("debian clone ready in %s (plant: %s; fetched %d bytes)", time.Since(start).Round(time.Millisecond),
			time.Duration(ad.ReadyNanos).Round(time.Millisecond), ad.FetchedBytes)
		if st := in(ad, "systemctl is-system-running || true"); st != "running" {
			t.Fatalf("systemd: %q (%s)", st, in(ad, "systemctl --failed --no-legend || true"))
		}
		if got := in(ad, "systemctl is-active multi-user.target"); got != "active" {
			t.Fatalf("multi-user.target: %s", got)
		}
		if got := in(ad, "hostname; cat /etc/app.conf; getent passwd alice | cut -d: -f1,6"); got != "web1\nconfigured\nalice:/home/alice" {
			t.Fatalf("configuration: %q", got)
		}
		if got := in(ad, "cat /home/alice/.ssh/authorized_keys; stat -c %U /home/alice/.ssh/authorized_keys"); got != aliceKey+"\nalice" {
			t.Fatalf("authorized_keys: %q", got)
		}
		// sshd was started after the clone made its host keys.
		waitFor(t, "sshd", func() bool { return in(ad, "systemctl is-active ssh.service || true") == "active" })
		if got := in(ad, "grep -h '^PasswordAuthentication' /etc/ssh/sshd_config.d/*.conf"); got != "PasswordAuthentication no" {
			t.Fatalf("password logins: %q", got)
		}
	})

	for _, image := range []string{"tiny", "debian"} {
		t.Run("two clones of "+image+" are not twins", func(t *testing.T) {
			var seen [2]struct{ random, machineID, keys, genID string }
			for i := range seen {
				ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: image + "-twin" + string(rune('a'+i)), Image: image})
				if err != nil {
					t.Fatal(err)
				}
				s := &seen[i]
				// Right after ready: nothing else ran in the guest in between.
				s.random = in(ad, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
				s.machineID = in(ad, "cat /etc/machine-id")
				id := identityOf(t, ctx, g, ad)
				s.keys, s.genID = strings.Join(id.HostKeys, ","), id.VMGenID
				if image == "debian" && len(id.HostKeys) == 0 {
					t.Fatalf("%s has no SSH host keys", ad.VmId)
				}
				if s.genID == "" || s.machineID == "" || len(s.random) != 64 {
					t.Fatalf("%s: identity %+v, machine-id %q, random %q", ad.VmId, id, s.machineID, s.random)
				}
				t.Logf("%s: machine-id %s vmgenid %s keys %s urandom %s…", ad.VmId, s.machineID, s.genID, s.keys, s.random[:16])
			}
			a, b := seen[0], seen[1]
			if a.random == b.random || a.machineID == b.machineID || a.genID == b.genID || (a.keys != "" && a.keys == b.keys) {
				t.Fatalf("twins:\n%+v\n%+v", a, b)
			}
		})
	}

	t.Run("a request naming an image accepts what the image performed", func(t *testing.T) {
		if _, err := images.Publish(ctx, imageclient.PublishSpec{Name: "tiny-built", Attributes: tinyBuilt.Attrs, Files: tinyBuilt.Files}, nil); err != nil {
			t.Fatal(err)
		}
		name := &computev1.Action{Id: "name", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: "named"}}}
		ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "named", Image: "tiny-built", Config: &computev1.ConfigDAG{Actions: []*computev1.Action{name}}})
		if err != nil {
			t.Fatal(err)
		}
		if ad.Image != "tiny-built" || in(ad, "cat /etc/built; hostname") != "built-in\nnamed" {
			t.Fatalf("image %s", ad.Image)
		}
		// Without --image the papers' matching holds: the image that did
		// more than asked is not chosen.
		for i := 0; i < 3; i++ {
			ad, err := createVM(ctx, alice, &shopv1.CreateVMRequest{RequestId: "unnamed" + string(rune('a'+i)), Config: &computev1.ConfigDAG{Actions: []*computev1.Action{name}}})
			if err != nil || ad.Image == "tiny-built" {
				t.Fatalf("unnamed request: image %s, %v", ad.GetImage(), err)
			}
			alice.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId})
		}
	})
}

func identityOf(t *testing.T, ctx context.Context, g *grid.Grid, ad *computev1.ClassAd) *agent.Identity {
	t.Helper()
	for _, p := range g.Plants {
		if _, err := p.Line.GetVM(ad.VmId); err == nil {
			id, err := p.Line.Identity(ctx, ad.VmId)
			if err != nil {
				t.Fatal(err)
			}
			return id
		}
	}
	t.Fatalf("no plant %s", ad.Plant)
	return nil
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for end := time.Now().Add(60 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("%s: not within 60 s", what)
}
