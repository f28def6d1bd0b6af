//go:build compose

package compose

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
)

// grid is the suite's compose grid.
type grid struct {
	repo, dir, project string
	env                map[string]string // DIR/env: addresses, tokens, TLS files
	tls                services.TLSFiles
	mounts             int // containers' root file systems mounted before up
}

// containerMounts counts the host's mounts of container root file systems
// (overlay2's merged directories): down must leave as many as up found.
func containerMounts() int {
	b, _ := os.ReadFile("/proc/self/mounts")
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && strings.Contains(f[1], "/overlay2/") {
			n++ // the mount point: one per running container
		}
	}
	return n
}

var g *grid

func TestMain(m *testing.M) {
	var err error
	g, err = up()
	code := 1
	if err != nil {
		fmt.Fprintln(os.Stderr, "compose grid:", err)
	} else {
		code = m.Run()
	}
	if g != nil {
		if err := g.down(); err != nil {
			fmt.Fprintln(os.Stderr, "compose grid down:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// up builds the images and brings up a grid of the suite's own.
func up() (*grid, error) {
	repo, err := filepath.Abs("../..")
	if err != nil {
		return nil, err
	}
	b := make([]byte, 3)
	rand.Read(b) //nolint:errcheck
	dir, err := os.MkdirTemp("", "vmgrid-ct-")
	if err != nil {
		return nil, err
	}
	gr := &grid{repo: repo, dir: dir, project: "vmgrid-ct-" + hex.EncodeToString(b), mounts: containerMounts()}
	start := time.Now()
	if out, err := gr.script("images.sh"); err != nil {
		return gr, fmt.Errorf("images: %w\n%s", err, out)
	}
	fmt.Printf("images: %s\n", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	if out, err := gr.script("up.sh"); err != nil {
		return gr, fmt.Errorf("up: %w\n%s\n%s", err, out, gr.logs())
	}
	fmt.Printf("grid up (golden image published): %s\n", time.Since(start).Round(time.Millisecond))
	if gr.env, err = readEnv(filepath.Join(dir, "env")); err != nil {
		return gr, err
	}
	gr.tls = services.TLSFiles{CAFile: gr.env["VMGRID_TLS_CA"], CertFile: gr.env["VMGRID_TLS_CERT"], KeyFile: gr.env["VMGRID_TLS_KEY"]}
	return gr, nil
}

// down takes the grid down and checks that nothing of it is left.
func (gr *grid) down() error {
	if os.Getenv("VMGRID_COMPOSE_KEEP") == "1" {
		fmt.Println("VMGRID_COMPOSE_KEEP=1: grid", gr.project, "left up, dir", gr.dir)
		return nil
	}
	out, err := gr.script("down.sh")
	if err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	defer os.RemoveAll(gr.dir)
	if m := containerMounts(); m != gr.mounts {
		return fmt.Errorf("%d container file systems mounted after down, %d before up", m, gr.mounts)
	}
	if !dockerUp() {
		return nil // dockerd stopped: it was ours, and so was everything in it
	}
	for _, kind := range []string{"ps -a", "network ls", "volume ls"} {
		args := append(strings.Fields(kind), "-q", "--filter", "label=com.docker.compose.project="+gr.project)
		if left, _ := docker(args...); strings.TrimSpace(left) != "" {
			return fmt.Errorf("docker %s: left after down: %s", kind, left)
		}
	}
	return nil
}

// script runs deploy/compose/NAME for this grid.
func (gr *grid) script(name string) (string, error) {
	cmd := exec.Command(filepath.Join(gr.repo, "deploy/compose", name))
	cmd.Env = append(os.Environ(), "VMGRID_COMPOSE_DIR="+gr.dir, "VMGRID_COMPOSE_STATE="+gr.dir, "VMGRID_COMPOSE_PROJECT="+gr.project,
		"VMGRID_SKIP_IMAGES=1", "VMGRID_PLANTS=3", "VMGRID_SHOPS=2")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func dockerUp() bool { return exec.Command("docker", "info").Run() == nil }

// docker runs the docker CLI.
func docker(args ...string) (string, error) {
	out, err := exec.Command("docker", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// compose runs docker-compose on the grid's project.
func (gr *grid) compose(args ...string) (string, error) {
	cmd := exec.Command("docker-compose", append([]string{"-p", gr.project, "-f", filepath.Join(gr.repo, "deploy/compose.yaml")}, args...)...)
	cmd.Env = append(os.Environ(), "VMGRID_COMPOSE_DIR="+gr.dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker-compose %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// logs is the last lines of every container's log (for failures).
func (gr *grid) logs() string {
	out, _ := gr.compose("logs", "--no-color", "--tail", "15")
	return out
}

// keepLogs saves every container's whole log when a test failed, before
// its cleanup removes containers (a killed plant's goes with it): into
// $VMGRID_COMPOSE_LOGS (default: the temporary directory), and the last
// lines of each into the test's output, which is what CI keeps.
func (gr *grid) keepLogs(t testing.TB) {
	dir := os.Getenv("VMGRID_COMPOSE_LOGS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "vmgrid-compose-logs")
	}
	all, err := gr.compose("logs", "--no-color", "--timestamps")
	if err != nil {
		t.Logf("container logs: %v", err)
		return
	}
	path := filepath.Join(dir, gr.project+"-"+strings.ReplaceAll(t.Name(), "/", "_")+".log")
	if err := os.MkdirAll(dir, 0o755); err == nil {
		if err := os.WriteFile(path, []byte(all), 0o644); err == nil {
			t.Logf("every container's log: %s", path)
		}
	}
	tail, _ := gr.compose("logs", "--no-color", "--timestamps", "--tail", "40")
	t.Logf("the containers' last lines:\n%s", tail)
}

// containers lists the running containers of a service: name → hostname.
func (gr *grid) containers(t testing.TB, service string) map[string]string {
	t.Helper()
	out, err := docker("ps", "--filter", "label=com.docker.compose.project="+gr.project,
		"--filter", "label=com.docker.compose.service="+service, "--format", "{{.Names}} {{.ID}}")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			m[f[0]] = f[1][:12]
		}
	}
	return m
}

// plantContainer is the container of the plant named name (plant-HOSTNAME).
func (gr *grid) plantContainer(t testing.TB, name string) string {
	t.Helper()
	for c, host := range gr.containers(t, "plant") {
		if "plant-"+host == name {
			return c
		}
	}
	t.Fatalf("no running container for plant %s", name)
	return ""
}

// shopAddr is the host address of shop number i (1-based).
func (gr *grid) shopAddr(t testing.TB, i int) string {
	t.Helper()
	out, err := gr.compose("port", fmt.Sprintf("--index=%d", i), "shop", "7060")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// shop is a client of shop number i as the owner demo.
func (gr *grid) shop(t testing.TB, i int) shopv1.ShopServiceClient {
	t.Helper()
	cc, err := services.Dial(gr.shopAddr(t, i), gr.tls, services.WithToken(gr.env["VMGRID_TOKEN"], gr.tls))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return shopv1.NewShopServiceClient(cc)
}

// createTimeout bounds one create: seconds on a quiet host, a minute or
// more when CI's host is loaded (the first create of a grid fetches the
// golden image through the cache proxy).
const createTimeout = 3 * time.Minute

// create makes a VM through c and waits for it to be ready. Its error says
// how long it took and the last progress it saw: where a creation stopped.
func create(ctx context.Context, c shopv1.ShopServiceClient, id string) (*computev1.ClassAd, error) {
	ctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	start := time.Now()
	st, err := c.CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: id})
	if err != nil {
		return nil, err
	}
	ad, last, err := lastAd(st)
	if err != nil {
		return nil, fmt.Errorf("create %s: after %s (last progress: %s): %w", id, time.Since(start).Round(time.Millisecond), last, err)
	}
	return ad, nil
}

// lastAd reads a CreateVM stream to its end: the classad of its last
// message, and that message's stage and text.
func lastAd(st grpc.ServerStreamingClient[shopv1.CreateVMProgress]) (*computev1.ClassAd, string, error) {
	var ad *computev1.ClassAd
	last := "none"
	for {
		p, err := st.Recv()
		if err == io.EOF {
			if ad == nil {
				return nil, last, fmt.Errorf("CreateVM ended without a classad")
			}
			return ad, last, nil
		}
		if err != nil {
			return nil, last, err
		}
		last = fmt.Sprintf("%s %q at %s", p.GetStage(), p.GetMessage(), time.Duration(p.GetElapsedNanos()).Round(time.Millisecond))
		if p.GetClassad() != nil {
			ad = p.GetClassad()
		}
	}
}

// readEnv parses the "export K=V ..." lines up.sh writes.
func readEnv(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	env := map[string]string{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		for _, kv := range strings.Fields(strings.TrimPrefix(s.Text(), "export ")) {
			if k, v, ok := strings.Cut(kv, "="); ok {
				env[k] = v
			}
		}
	}
	return env, s.Err()
}

// eventually polls cond every 200 ms until it holds or d passes; it returns
// how long that took.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	return eventuallyWhy(t, d, what, func() (bool, string) { return cond(), "" })
}

// eventuallyWhy is eventually whose condition also says why it does not
// hold yet: the last reason is in the failure.
func eventuallyWhy(t testing.TB, d time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, why := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s: %s", what, d, why)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
