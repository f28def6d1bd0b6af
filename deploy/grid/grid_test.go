package grid

import (
	"context"
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
