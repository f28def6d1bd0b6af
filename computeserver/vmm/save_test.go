package vmm

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/imagebuild"
)

// Save leaves the machine paused with its state on disk; Continue runs the
// guest on (QEMU takes its disks back after the completed migration), and
// the state restores into a second machine that continues from the save.
func TestSaveRunsOn(t *testing.T) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	spec := tinySpec(t, img, overlay(t, img.RootDisk))
	m, err := d.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if _, err := m.WaitConsole(ctx, imagebuild.ReadyMarker); err != nil {
		t.Fatal(err)
	}
	waitTick(t, ctx, m, 3)
	state := filepath.Join(t.TempDir(), "mem.state")
	start := time.Now()
	if err := m.Save(ctx, state); err != nil {
		t.Fatal(err)
	}
	t.Logf("save: %v, %d bytes", time.Since(start), fileSize(t, state))
	if st, err := m.Status(ctx); err != nil || st == "running" {
		t.Fatalf("after Save the machine is %q (%v); want it paused", st, err)
	}
	at := lastTick(t, m.ConsoleLog())
	if err := m.Continue(ctx); err != nil {
		t.Fatal(err)
	}
	waitTick(t, ctx, m, at+3) // the guest runs on

	spec2 := m.Spec()
	spec2.Name, spec2.Dir = spec2.Name+"-2", t.TempDir()
	spec2.Disks = append([]Disk(nil), spec2.Disks...)
	spec2.Disks[0].Path = overlay(t, img.RootDisk)
	m2, err := Restore(ctx, d, spec2, Incoming{Path: state}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Kill()
	first, err := m2.WaitConsole(ctx, "tick ")
	if err != nil {
		t.Fatal(err)
	}
	// The line printed at the save may be split: the first whole one can
	// skip one.
	if n, err := strconv.Atoi(strings.TrimPrefix(first, "tick ")); err != nil || n != at+1 && n != at+2 {
		t.Fatalf("the restored guest printed %q first; it was saved at tick %d", first, at)
	}
	for _, mm := range []Machine{m, m2} {
		if err := mm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		requireGone(t, mm.Pid())
	}
}
