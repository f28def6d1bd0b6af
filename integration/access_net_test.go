package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/cmd/vmgrid/cli"
	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
	"github.com/vmgrid/vmgrid/internal/testutil"
	"github.com/vmgrid/vmgrid/internal/testutil/goldens"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// runCLIEnv makes this test binary the vmgrid CLI (see init): ssh runs
// `vmgrid vm tunnel` as its ProxyCommand, and the test's vmgrid is this
// binary.
const runCLIEnv = "VMGRID_TEST_RUN_CLI"

func init() {
	if os.Getenv(runCLIEnv) == "1" {
		os.Exit(cli.Main(os.Args[1:]))
	}
}

// forward opens a port-forward through the shop as owner and returns the
// guest's whole answer to req (sent, then half-closed).
func forward(ctx context.Context, c shopv1.ShopServiceClient, vm string, port uint32, req []byte) ([]byte, error) {
	s, err := c.PortForward(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.Send(&computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Start{Start: &computev1.PortForwardStart{VmId: vm, Port: port}}}); err != nil {
		return nil, err
	}
	first, err := s.Recv()
	if err != nil {
		return nil, err
	}
	if !first.Connected {
		return nil, errors.New("no connected message first")
	}
	for len(req) > 0 {
		n := min(len(req), 64<<10)
		if err := s.Send(&computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Data{Data: req[:n]}}); err != nil {
			return nil, err
		}
		req = req[n:]
	}
	if err := s.CloseSend(); err != nil {
		return nil, err
	}
	var got bytes.Buffer
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return got.Bytes(), nil
		}
		if err != nil {
			return got.Bytes(), err
		}
		got.Write(m.Data)
	}
}

// TestPortForwardThroughTheShop: a server in the guest answers through the
// shop's tunnel (bytes intact both ways); another owner, a VM without a
// network and a closed port are refused with their codes.
func TestPortForwardThroughTheShop(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx, "pf")
	eventually(t, "the plant registered", func() bool { return g.registered(ctx) == 1 })
	ad, err := g.create(ctx, "alice", "pf1", "pfnet")
	if err != nil {
		t.Fatal(err)
	}
	// A 4 MiB file served by busybox httpd, and an echo server.
	sum, _ := g.sh(ctx, ad, "mkdir -p /www && head -c 4194304 /dev/urandom > /www/blob && httpd -p 8080 -h /www && sha256sum /www/blob | cut -d' ' -f1")
	g.sh(ctx, ad, "nc -ll -p 7000 -e cat </dev/null >/dev/null 2>&1 &")
	eventually(t, "the guest listens", func() bool {
		out, _ := g.sh(ctx, ad, "netstat -ltn | grep -cE ':(8080|7000) '")
		return out == "2"
	})

	t.Run("bytes both ways", func(t *testing.T) {
		start := time.Now()
		resp, err := forward(ctx, g.clients["alice"], ad.VmId, 8080, []byte("GET /blob HTTP/1.0\r\n\r\n"))
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		_, body, ok := bytes.Cut(resp, []byte("\r\n\r\n"))
		got := sha256.Sum256(body)
		if !ok || hex.EncodeToString(got[:]) != sum {
			t.Fatalf("GET /blob through the tunnel: %d bytes, sha256 %x, want %s", len(body), got, sum)
		}
		t.Logf("port-forward: %d bytes from the guest in %s (%.1f MB/s)", len(body), took, float64(len(body))/took.Seconds()/1e6)
		up := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB up and back
		echo, err := forward(ctx, g.clients["alice"], ad.VmId, 7000, up)
		if err != nil || !bytes.Equal(echo, up) {
			t.Fatalf("echo through the tunnel: %v, %d of %d bytes back", err, len(echo), len(up))
		}
	})

	t.Run("refusals", func(t *testing.T) {
		if _, err := forward(ctx, g.clients["bob"], ad.VmId, 8080, nil); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("bob's port-forward to alice's VM: %v", err)
		}
		if _, err := forward(ctx, g.clients["alice"], ad.VmId, 9, nil); status.Code(err) != codes.Unavailable {
			t.Fatalf("a closed port: %v", err)
		}
		plain, err := g.create(ctx, "alice", "pf-nonet", "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := forward(ctx, g.clients["alice"], plain.VmId, 22, nil); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("port-forward to a VM without a network: %v", err)
		}
	})

	t.Run("the tunnel closes when the VM goes", func(t *testing.T) {
		s, err := g.clients["alice"].PortForward(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Send(&computev1.PortForwardRequest{Kind: &computev1.PortForwardRequest_Start{Start: &computev1.PortForwardStart{VmId: ad.VmId, Port: 7000}}})
		if m, err := s.Recv(); err != nil || !m.Connected {
			t.Fatalf("connect: %v %v", m, err)
		}
		ended := make(chan error, 1)
		go func() {
			for {
				if _, err := s.Recv(); err != nil {
					ended <- err
					return
				}
			}
		}()
		if _, err := g.clients["alice"].DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId}); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ended:
			if !errors.Is(err, io.EOF) {
				t.Fatalf("the tunnel ended with %v, want a clean end", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the tunnel outlived its VM")
		}
	})
}

// TestSSHIntoDebian: `vmgrid vm ssh` logs into a Debian clone as the user
// its create added, with the key given at create, through the shop.
func TestSSHIntoDebian(t *testing.T) {
	testutil.NeedQEMU(t)
	vnettest.NeedRoot(t)
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("no ssh client (deploy/packages.txt installs openssh-client)")
	}
	img := goldens.Debian(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	g := startNetGrid(t, ctx, "sp")
	if err := img.Publish(ctx, g.is.Client, "debian"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the plant registered", func() bool { return g.registered(ctx) == 1 })
	dir := t.TempDir()
	key := filepath.Join(dir, "id")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	pub, err := os.ReadFile(key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	stream, err := g.clients["alice"].CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: "ssh1", Image: "debian", NetworkDomain: "sshnet",
		Config: &computev1.ConfigDAG{Actions: []*computev1.Action{{Id: "u", Kind: &computev1.Action_AddUser{AddUser: &computev1.AddUserAction{User: "alice", SshKey: string(pub)}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	var ad *computev1.ClassAd
	for ad == nil {
		p, err := stream.Recv()
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		ad = p.Classad
	}
	if ad.LoginUser != "alice" {
		t.Fatalf("login_user %q", ad.LoginUser)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, self, "vm", "ssh", ad.VmId, "--", "-i", key, "-o", "BatchMode=yes",
		"-o", "UserKnownHostsFile="+filepath.Join(dir, "known_hosts"), "id -un; hostname")
	cmd.Env = append(os.Environ(), runCLIEnv+"=1", "VMGRID_SHOP="+g.shop.Addr(), "VMGRID_TOKEN="+testutil.OwnerToken,
		"VMGRID_CONFIG="+filepath.Join(dir, "config.yaml"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vmgrid vm ssh: %v\n%s", err, out)
	}
	if lines := strings.Fields(string(out)); len(lines) < 2 || lines[len(lines)-2] != "alice" {
		t.Fatalf("vmgrid vm ssh ran as %q", out)
	}
	// Host keys are remembered under the VM's alias (hashed, as Debian's
	// ssh_config has it: ask ssh-keygen).
	if out, err := exec.Command("ssh-keygen", "-F", "vmgrid-"+ad.VmId, "-f", filepath.Join(dir, "known_hosts")).CombinedOutput(); err != nil || len(out) == 0 {
		t.Fatalf("known_hosts has no entry for the VM's alias: %v %s", err, out)
	}
}
