package testutil

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

// DataServer starts a real data server on 127.0.0.1 taking tokens and task
// credentials signed with the key it returns; it stops when the test ends.
func DataServer(tb testing.TB, tokens *auth.Tokens) (addr string, key auth.TaskKey) {
	tb.Helper()
	dir := tb.TempDir()
	keyFile := filepath.Join(dir, "task.key")
	if err := auth.NewTaskKeyFile(keyFile); err != nil {
		tb.Fatal(err)
	}
	key, err := auth.LoadTaskKey(keyFile)
	if err != nil {
		tb.Fatal(err)
	}
	srv, err := dataserver.Start(context.Background(), dataserver.Config{
		Server: services.Options{Name: "dataserver", Listen: "127.0.0.1:0", Logger: zaptest.NewLogger(tb), ShutdownTimeout: 5 * time.Second},
		Store:  dataserver.StoreConfig{DataDir: filepath.Join(dir, "data")}, Tokens: tokens, TaskKeyFile: keyFile,
	})
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			tb.Errorf("data server: %v", err)
		}
	})
	return srv.Addr(), key
}

// NeedE2fsprogs skips a test when mkfs.ext4 or debugfs is missing.
func NeedE2fsprogs(tb testing.TB) {
	tb.Helper()
	for _, p := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(p); err != nil {
			tb.Skipf("%s not installed (e2fsprogs)", p)
		}
	}
}

// Debugfs runs a debugfs request on an ext4 image and returns its output.
func Debugfs(tb testing.TB, image string, args ...string) string {
	tb.Helper()
	out, err := exec.Command("debugfs", append(args, image)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("debugfs %v: %v: %s", args, err, out)
	}
	return string(out)
}

// DataClient dials a data server with token (no TLS); closed when the test
// ends.
func DataClient(tb testing.TB, addr, token string, extra ...grpc.DialOption) *dataclient.Client {
	tb.Helper()
	cc, err := dataclient.Dial(addr, services.TLSFiles{}, token, extra...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return dataclient.NewClient(cc)
}
