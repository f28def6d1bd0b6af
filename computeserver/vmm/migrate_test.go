package vmm

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// A running guest moves to a second QEMU process: its redo log mirrored
// over NBD (only the top layer: both clones are over the same golden
// disk), its RAM pre-copied; the counter it prints goes on from where it
// was on the destination, and the source is left paused for good.
func TestLiveMigrate(t *testing.T) {
	for _, postCopy := range []bool{false, true} {
		t.Run(map[bool]string{false: "pre-copy", true: "post-copy"}[postCopy], func(t *testing.T) { liveMigrate(t, postCopy) })
	}
}

func liveMigrate(t *testing.T, postCopy bool) {
	d := driver(t)
	img := tinyImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	src := tinySpec(t, img, overlay(t, img.RootDisk))
	src.MemoryFile = &MemoryFile{Path: filepath.Join(src.Dir, "mem.ram")}
	m, err := d.Start(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	waitTick(t, ctx, m, 3)

	dst := m.Spec()
	dst.Dir = t.TempDir()
	dst.Disks[0].Path = overlay(t, img.RootDisk)
	dst.MemoryFile = &MemoryFile{Memfd: true}
	dst.Incoming = &Incoming{Live: true}
	m2, err := d.Start(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Kill()
	uri, nbd := "unix:"+filepath.Join(dst.Dir, "in.sock"), filepath.Join(dst.Dir, "nbd.sock")
	if err := ListenIncoming(ctx, m2, uri, nbd, []string{DriveID(0)}, postCopy); err != nil {
		t.Fatal(err)
	}
	switched := false
	mig, err := Migrate(ctx, m, MigrateOptions{
		URI: uri, Mirrors: []Mirror{{Drive: DriveID(0), Socket: nbd}}, Logger: m2.(*machine).log, PostCopy: postCopy,
		// Near the switch (the mirror still running: the exports stay).
		Switchover: func(ctx context.Context) error {
			switched = true
			return nil
		},
		// The destination runs as soon as it may (in post-copy: before
		// the copy ends, the rest of RAM on demand); the mirror is done.
		Switched: func(ctx context.Context) error {
			if err := WaitIncoming(ctx, m2); err != nil {
				return err
			}
			if err := m2.Continue(ctx); err != nil {
				return err
			}
			if err := StopServingDrives(ctx, m2, []string{DriveID(0)}); err != nil {
				return err
			}
			return Announce(ctx, m2)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !switched {
		t.Fatal("Switchover was not called")
	}
	before := lastTick(t, m.ConsoleLog())
	t.Logf("migrated: post-copy %v, requests %d, passes %d, total %d ms, downtime %d ms, RAM %d bytes, mirror %+v, paused %v", mig.PostCopy, mig.Info.RAM.PostcopyRequests, mig.Info.RAM.DirtySyncCount, mig.Info.TotalTime, mig.Info.Downtime, mig.Info.RAM.Transferred, mig.Mirrors, mig.Paused)
	if st, _ := m.Status(ctx); st != "postmigrate" {
		t.Errorf("source is %q after the migration, want postmigrate", st)
	}
	// The destination's console log starts empty: its first tick follows
	// the source's last.
	first, err := m2.WaitConsole(ctx, "tick ")
	if err != nil {
		t.Fatal(err)
	}
	after, _ := strconv.Atoi(strings.TrimPrefix(first, "tick "))
	if after < before || after > before+2 {
		t.Fatalf("counter went from %d to %d", before, after)
	}
	waitTick(t, ctx, m2, after+3)
}

// TestNearSwitch: the switch-over is near when what is left of the pass
// goes within the time given, at the stream's rate.
func TestNearSwitch(t *testing.T) {
	info := func(remaining int64, mbps float64, syncs int64) MigrationInfo {
		var m MigrationInfo
		if err := json.Unmarshal(fmt.Appendf(nil, `{"status":"active","ram":{"remaining":%d,"mbps":%g,"dirty-sync-count":%d}}`, remaining, mbps, syncs), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	for _, c := range []struct {
		info MigrationInfo
		want bool
	}{
		{info(10e6, 800, 1), true},  // 100 ms left at 100 MB/s
		{info(30e6, 800, 2), false}, // 300 ms left
		{info(10e6, 0, 1), false},   // no rate yet
		{info(10e6, 800, 0), false}, // not started
		{MigrationInfo{Status: "active"}, false},
	} {
		if got := nearSwitch(c.info, 200*time.Millisecond); got != c.want {
			t.Errorf("nearSwitch(%+v) = %v, want %v", c.info.RAM, got, c.want)
		}
	}
}

// stuckMachine answers query-migrate with a migration whose RAM copy moved
// sent bytes and then nothing more; it has no other methods.
type stuckMachine struct {
	Machine
	polls int
	sent  int64
}

func (m *stuckMachine) QMP(_ context.Context, command string, _, result any) error {
	if command != "query-migrate" {
		return fmt.Errorf("unexpected %s", command)
	}
	m.polls++
	if m.polls < 3 {
		m.sent += 1 << 20 // moving at first
	}
	return json.Unmarshal(fmt.Appendf(nil, `{"status":"active","ram":{"transferred":%d,"total":536870912}}`, m.sent), result)
}

// A copy that stops moving (a network cut between the plants: silence, no
// reset) fails the migration with Unavailable once it stood still for
// MigrationStall, not at the caller's deadline; a slow one does not.
func TestMigrationStall(t *testing.T) {
	defer func(d time.Duration) { MigrationStall = d }(MigrationStall)
	MigrationStall = 500 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := &stuckMachine{}
	start := time.Now()
	_, err := followMigration(ctx, m, MigrateOptions{}, Migration{})
	took := time.Since(start)
	if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "no progress") || !strings.Contains(err.Error(), "2097152 bytes") {
		t.Fatalf("a stuck migration: %v, want Unavailable saying it made no progress after 2 MiB", err)
	}
	if took < MigrationStall || took > MigrationStall+5*time.Second {
		t.Fatalf("gave up after %v; the stall bound is %v", took, MigrationStall)
	}

	var w stallWatch
	now := time.Now()
	for i := range 100 {
		if w.stalled(int64(i), now.Add(time.Duration(i)*time.Second)) {
			t.Fatalf("a copy moving a byte a second stalled at %d s", i)
		}
	}
}
