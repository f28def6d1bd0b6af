package grid

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/vmgrid/vmgrid/internal/testutil"
)

// Plants on one host share its memory: together they offer no more than
// the 80% of RAM one plant alone would (each assumed 80% before).
func TestUpDividesGuestMemory(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, err := Up(ctx, Config{Dir: testutil.ShortTempDir(t), Plants: 2, NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		t.Fatal(err)
	}
	host := uint64(si.Totalram) * uint64(si.Unit) >> 20
	var sum uint64
	for _, p := range g.Plants {
		sum += p.Line.Offer().MemoryMiB
	}
	if sum == 0 || sum > host*8/10 {
		t.Fatalf("2 plants offer %d MiB of guest memory together on a host with %d MiB", sum, host)
	}
}

// vmgrid up keeps one tokens file with the three identities every role of
// it is started with (owner demo, the operator, the services), the
// services' token in a 0600 file, and the same ones on the next start.
func TestUpTokens(t *testing.T) {
	dir := t.TempDir()
	var first Grid
	if err := first.startTokens(context.Background(), Config{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	tokens, err := os.ReadFile(first.TokensFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{first.Token + " demo owner", first.OperatorToken + " operator operator", first.ServiceToken + " vmgrid service"} {
		if !strings.Contains(string(tokens), line+"\n") {
			t.Errorf("the tokens file lacks %q:\n%s", line, tokens)
		}
	}
	for _, f := range []string{first.TokensFile, first.ServiceTokenFile, first.TaskKeyFile} {
		if st, err := os.Stat(f); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want mode 0600", f, st.Mode(), err)
		}
	}
	if b, _ := os.ReadFile(first.ServiceTokenFile); strings.TrimSpace(string(b)) != first.ServiceToken {
		t.Errorf("service token file holds %q", b)
	}
	var again Grid
	if err := again.startTokens(context.Background(), Config{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	if again.Token != first.Token || again.OperatorToken != first.OperatorToken || again.ServiceToken != first.ServiceToken {
		t.Fatal("a restart made new tokens")
	}
}
