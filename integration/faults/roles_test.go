//go:build faults

package faults

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/shop/market"
)

// The grid under test: etcd, an image server, a data server, a cache proxy
// in front of the image server, two plants (one reading through the proxy)
// registered in etcd, and a shop. Every role is a process of its own.

// Tokens of the grid's tokens file (one file for every role that takes
// --tokens).
const (
	ownerToken    = "faults-owner-demo-0001"
	otherToken    = "faults-owner-mallory-0002"
	operatorToken = "faults-operator-0003"
	serviceToken  = "faults-service-0004"
	wrongToken    = "faults-nobody-knows-this"
)

type grid struct {
	t          *testing.T
	dir        string
	tokensFile string
	taskKey    string
	svcToken   string // file holding serviceToken (--service-token-file)

	etcdAddr, etcdPeer string
	etcd, images, data *proc
	proxy, shop        *proc
	plants             []*plant
}

// plant is a compute server process, its directories and its spec.
type plant struct {
	*proc
	spec roleSpec
	mnt  string
}

// roleSpec is what differs between two processes of one role.
type roleSpec struct {
	Listen, DataDir string
	Peer            string        // etcd: the peer address
	Upstream        string        // cacheproxy, computeserver
	Name            string        // computeserver
	Etcd            string        // computeserver: etcd address ("" joins no market)
	UpstreamRetry   time.Duration // cacheproxy, computeserver (0: 30s)
}

// roleArgs is the one place role command lines are built. It follows the
// flags the binary has: once every role takes --tokens (and callers
// --service-token-file, the shop --task-key) and `vmgrid etcd` exists, they
// are used without a change here. TLS (--tls-*, --etcd-ca…) is the one
// thing to add when it becomes mandatory.
func (g *grid) roleArgs(role string, s roleSpec) []string {
	vm := binary(g.t, "vmgrid")
	retry := s.UpstreamRetry
	if retry == 0 {
		retry = 30 * time.Second
	}
	base := []string{vm, role, "--log-level", "info", "--listen", s.Listen, "--metrics-listen", ""}
	var a []string
	switch role {
	case "etcd":
		if !hasCommand(g.t, "etcd") {
			return []string{os.Args[0], etcdChild, s.DataDir, s.Listen, s.Peer}
		}
		return []string{vm, "etcd", "--data-dir", s.DataDir, "--listen-client", s.Listen, "--listen-peer", s.Peer}
	case "imageserver":
		a = append(base, "--data-dir", s.DataDir, "--shutdown-timeout", "5s")
	case "dataserver":
		a = append(base, "--data-dir", s.DataDir, "--shutdown-timeout", "5s", "--task-key", g.taskKey)
	case "cacheproxy":
		a = append(base, "--data-dir", s.DataDir, "--upstream", s.Upstream, "--cache-size", "256MiB",
			"--upstream-retry", retry.String())
	case "computeserver":
		a = append(base, "--data-dir", s.DataDir, "--upstream", s.Upstream, "--name", s.Name,
			"--dataserver", g.data.addr, "--guest-memory-mib", "3072", "--cache-size", "512MiB",
			"--flush-idle=-1s", "--upstream-retry", retry.String())
		if s.Etcd != "" {
			a = append(a, "--etcd", "http://"+s.Etcd)
		}
	case "shop":
		a = append(base, "--etcd", "http://"+g.etcdAddr, "--images", g.images.addr, "--dataserver", g.data.addr)
	default:
		g.t.Fatalf("no role %q", role)
	}
	return append(a, g.authArgs(role)...)
}

// authArgs are the credentials flags of role, those its binary has.
func (g *grid) authArgs(role string) []string {
	var a []string
	if hasFlag(g.t, role, "--tokens") {
		a = append(a, "--tokens", g.tokensFile)
	}
	if hasFlag(g.t, role, "--service-token-file") {
		a = append(a, "--service-token-file", g.svcToken)
	}
	if role == "shop" && hasFlag(g.t, role, "--task-key") {
		a = append(a, "--task-key", g.taskKey)
	}
	return a
}

var (
	helpMu sync.Mutex
	helps  = map[string]string{}
)

// help is `vmgrid CMD --help` (cached; "" when CMD does not exist).
func help(t testing.TB, cmd string) string {
	helpMu.Lock()
	defer helpMu.Unlock()
	if h, ok := helps[cmd]; ok {
		return h
	}
	out, err := exec.Command(binary(t, "vmgrid"), cmd, "--help").CombinedOutput()
	h := string(out)
	if err != nil || !strings.Contains(h, "vmgrid "+cmd) {
		h = ""
	}
	helps[cmd] = h
	return h
}

func hasCommand(t testing.TB, cmd string) bool { return help(t, cmd) != "" }

// hasFlag reports whether `vmgrid ROLE` takes flag (listed in its help).
func hasFlag(t testing.TB, role, flag string) bool {
	return strings.Contains(help(t, role), "  "+flag+" ")
}

// authWired reports whether role authenticates its callers (it takes
// --tokens): the unauthenticated probes then must all be refused.
func authWired(t testing.TB, role string) bool { return hasFlag(t, role, "--tokens") }

// startGrid starts every role and builds the golden image "tiny".
func startGrid(t *testing.T) *grid {
	t.Helper()
	g := &grid{t: t, dir: subDir(t, "grid")}
	g.writeCredentials()
	g.etcdAddr, g.etcdPeer = freeAddr(t), freeAddr(t)
	g.etcd = spawn(t, "etcd", g.etcdAddr, g.roleArgs("etcd", roleSpec{Listen: g.etcdAddr, Peer: g.etcdPeer, DataDir: g.sub("etcd")}))
	g.images = g.spawnRole("imageserver", "imageserver", roleSpec{})
	g.buildGolden()
	g.data = g.spawnRole("dataserver", "dataserver", roleSpec{})
	g.proxy = g.spawnRole("cacheproxy", "cacheproxy", roleSpec{Upstream: g.images.addr})
	g.plants = append(g.plants, g.startPlant("plant0", g.images.addr, true, 0), g.startPlant("plant1", g.proxy.addr, true, 0))
	g.shop = g.spawnRole("shop", "shop", roleSpec{})
	g.waitPlants(2, 30*time.Second)
	return g
}

// spawnRole starts a role on a new port with a new data directory.
func (g *grid) spawnRole(name, role string, s roleSpec) *proc {
	s.Listen, s.DataDir = freeAddr(g.t), g.sub(name)
	return spawn(g.t, name, s.Listen, g.roleArgs(role, s))
}

// startPlant starts a compute server; it joins the market when market is
// set. Its FUSE mount is removed when the test ends, whatever happened.
func (g *grid) startPlant(name, upstream string, joinMarket bool, retry time.Duration) *plant {
	s := roleSpec{Listen: freeAddr(g.t), DataDir: g.sub(name), Upstream: upstream, Name: name, UpstreamRetry: retry}
	if joinMarket {
		s.Etcd = g.etcdAddr
	}
	p := &plant{spec: s, mnt: filepath.Join(s.DataDir, "mnt")}
	// Registered before the process's cleanup, so it runs after it.
	g.t.Cleanup(func() { g.cleanPlant(p) })
	p.proc = spawn(g.t, name, s.Listen, g.roleArgs("computeserver", s))
	return p
}

// cleanPlant unmounts the plant's view and kills QEMUs it left.
func (g *grid) cleanPlant(p *plant) {
	for _, mnt := range []string{p.mnt, computeserver.MemoryMountpoint(p.mnt)} {
		if err := unmount(mnt); err != nil {
			g.t.Errorf("unmount %s: %v", mnt, err)
		}
	}
	if q := qemusUnder(p.spec.DataDir); len(q) > 0 {
		g.t.Errorf("%s left QEMUs %v after it stopped", p.name, q)
		if bad := killLeftovers(q); len(bad) > 0 {
			g.t.Errorf("unkillable QEMUs of %s: %v", p.name, bad)
		}
	}
}

func (g *grid) sub(name string) string {
	d := filepath.Join(g.dir, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		g.t.Fatal(err)
	}
	return d
}

// writeCredentials writes the tokens file, the service token file and the
// task key every role of the grid shares.
func (g *grid) writeCredentials() {
	g.tokensFile = filepath.Join(g.dir, "tokens")
	content := ownerToken + " demo\n" + otherToken + " mallory\n" + operatorToken + " ops operator\n" +
		serviceToken + " vmgrid-plants service\n"
	if err := os.WriteFile(g.tokensFile, []byte(content), 0o600); err != nil {
		g.t.Fatal(err)
	}
	g.svcToken = filepath.Join(g.dir, "service-token")
	if err := os.WriteFile(g.svcToken, []byte(serviceToken+"\n"), 0o600); err != nil {
		g.t.Fatal(err)
	}
	g.taskKey = filepath.Join(g.dir, "task.key")
	if err := auth.NewTaskKeyFile(g.taskKey); err != nil {
		g.t.Fatal(err)
	}
}

// cli runs a vmgrid client verb with the grid's tokens in its environment.
func (g *grid) cli(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, binary(g.t, "vmgrid"), args...)
	cmd.Env = append(os.Environ(), "VMGRID_TOKEN="+ownerToken, "VMGRID_OPERATOR_TOKEN="+operatorToken)
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (g *grid) buildGolden() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := g.cli(ctx, "image", "build", "tiny", "--server", g.images.addr, "--agent", binary(g.t, "vmgrid-agent"),
		"--work-dir", g.sub("build"), "--log-level", "warn")
	if err != nil {
		g.t.Fatalf("vmgrid image build tiny: %v\n%s", err, out)
	}
	os.RemoveAll(filepath.Join(g.dir, "build"))
}

// dial connects to addr sending token on every call ("" sends none).
func (g *grid) dial(addr, token string) *grpc.ClientConn {
	g.t.Helper()
	var opts []grpc.DialOption
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(auth.Credentials{Token: token, Insecure: true}))
	}
	cc, err := services.Dial(addr, services.TLSFiles{}, opts...)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { cc.Close() })
	return cc
}

// etcdClient is a client of the grid's etcd, closed at the end.
func (g *grid) etcdClient() *clientv3.Client {
	cli, err := clientv3.New(market.ClientConfig([]string{"http://" + g.etcdAddr}, zap.NewNop()))
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { cli.Close() })
	return cli
}

// registered counts the plants in the registry.
func (g *grid) registered(cli *clientv3.Client) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := cli.Get(ctx, market.PlantsPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return -1
	}
	return int(r.Count)
}

// waitPlants waits until n plants are registered.
func (g *grid) waitPlants(n int, d time.Duration) {
	g.t.Helper()
	cli := g.etcdClient()
	waitFor(g.t, d, "plants registered", func() bool { return g.registered(cli) == n })
}

// waitFor polls cond every 100 ms for up to d.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
