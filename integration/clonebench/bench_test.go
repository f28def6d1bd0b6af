package clonebench_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/cmd/vmgrid/cli"
	"github.com/vmgrid/vmgrid/integration/clonebench"
	"github.com/vmgrid/vmgrid/internal/testutil"
)

// TestCloneBenchSmoke runs `vmgrid bench clone --smoke` the way a user
// does (the CLI, a real golden image, real guests, a real WAN emulation)
// and checks the table it writes: every row measured, and a cold vmgrid
// clone moving far fewer bytes across the WAN than a full copy.
func TestCloneBenchSmoke(t *testing.T) {
	testutil.NeedQEMU(t)
	if _, err := exec.LookPath("qemu-nbd"); err != nil {
		t.Skip("qemu-nbd is not installed (qemu-utils)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute) // about 2 min quiet; a loaded host is slower
	defer cancel()
	out := t.TempDir()
	var stdout bytes.Buffer
	root := cli.NewRoot()
	root.SetOut(&stdout)
	root.SetArgs([]string{"bench", "clone", "--smoke", "--rtt", "4ms", "--bandwidth-mbit", "1000", "--plants", "2",
		"--out", out, "--log-level", "warn"})
	start := time.Now()
	if err := root.ExecuteContext(ctx); err != nil {
		t.Fatalf("vmgrid bench clone: %v\n%s", err, stdout.String())
	}
	t.Logf("took %v\n%s", time.Since(start).Round(time.Second), stdout.String())

	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var res clonebench.Results
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(out, "results.md")); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{clonebench.RowLocal, clonebench.RowFullCopy, clonebench.RowNBD, clonebench.RowCold,
		clonebench.RowWarm, clonebench.RowL2, clonebench.RowParallel, clonebench.RowLimit} {
		row := res.Row(key)
		if row == nil {
			t.Errorf("no row %s", key)
			continue
		}
		if len(row.Runs) != 1 || row.Median <= 0 || row.Min <= 0 || row.Max <= 0 {
			t.Errorf("row %s: %d runs, median %v, min %v, max %v", key, len(row.Runs), row.Median, row.Min, row.Max)
		}
	}
	full, cold := res.Row(clonebench.RowFullCopy), res.Row(clonebench.RowCold)
	if full == nil || cold == nil {
		t.FailNow()
	}
	if cold.WANBytes == 0 || cold.WANBytes*4 > full.WANBytes {
		t.Errorf("a cold clone moved %d bytes across the WAN, a full copy %d: want far fewer", cold.WANBytes, full.WANBytes)
	}
	if full.WANBytes < res.Golden.Size {
		t.Errorf("a full copy moved %d bytes, the image has %d", full.WANBytes, res.Golden.Size)
	}
	// A warm clone may read a few disk blocks the first one did not (what a
	// guest touches after a restore varies with timing; under load up to 5%
	// of a cold clone's bytes was seen), but next to nothing.
	if warm := res.Row(clonebench.RowWarm); warm != nil && warm.WANBytes*10 > cold.WANBytes {
		t.Errorf("a warm clone moved %d bytes across the WAN, a cold one %d: want under 10%%", warm.WANBytes, cold.WANBytes)
	}
}
