package vmm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Live migration (Goiri et al. §4, with QEMU's pre-copy instead of Xen's).
// The source machine streams its RAM to a destination machine started
// with Incoming.Live on a URI the caller connects (a unix socket the plant
// tunnels); the disks that live on the source's host are mirrored first
// (blockdev-mirror to the destination's NBD export of the same drive, in
// write-blocking mode so the copies never diverge), and only the clusters
// of the top layer when the destination has the layers below. The source
// pauses before the switch-over (pause-before-switchover): the mirrors
// are finished then, the caller's Switchover has moved what is not
// QEMU's (the network: started when the switch is near), and the device
// state goes. On any failure the source
// runs on, as it was.

// Mirror is one of the source's drives to copy to the destination before
// the switch.
type Mirror struct {
	// Drive is the drive's id on both machines (disk0, disk1, … in
	// Spec.Disks order: DriveID).
	Drive string
	// Socket is the unix socket of the destination's NBD server (or of a
	// tunnel to it); the export is named after the drive.
	Socket string
	// Full copies the whole disk, backing layers too (the baseline the
	// Goiri paper rejects: "transferring the whole VM image"); otherwise
	// only the top layer's clusters move (the redo log).
	Full bool
}

// DriveID is the QEMU drive id of the i-th disk of a Spec.
func DriveID(i int) string { return fmt.Sprintf("disk%d", i) }

// MigrateOptions configures Migrate.
type MigrateOptions struct {
	// URI is where the destination listens ("unix:PATH").
	URI     string
	Mirrors []Mirror
	// DowntimeLimit is the pause QEMU aims at for the last round (0:
	// DefaultDowntimeLimit).
	DowntimeLimit time.Duration
	// PostCopy switches to post-copy after the first full pass of RAM:
	// the destination runs at once and pulls what is left on demand (a
	// guest that dirties memory faster than the link moves it converges;
	// until the copy ends the VM needs both hosts).
	PostCopy bool
	// Switchover runs once, when the switch-over is near (what is left of
	// the pass over RAM goes in twice the downtime limit at the stream's
	// rate: the last pass may be the next) or, at the latest, in the pause
	// before the switch-over as the mirrors finish;
	// it must not end them. The migration waits for it in the pause; an
	// error cancels it.
	Switchover func(ctx context.Context) error
	// Switched runs once the destination has what it needs to run the
	// guest (the state is complete; in post-copy, once the switch to
	// post-copy is made): it should run it there. An error says the
	// destination does not run it: the source runs on (in post-copy it
	// cannot: the error is returned and the guest is lost).
	Switched func(ctx context.Context) error
	// Progress receives query-migrate's answers while RAM is copied.
	Progress func(MigrationInfo)
	Logger   *zap.Logger
}

// DefaultDowntimeLimit is the last round's pause QEMU aims at (QEMU's own
// default is 300 ms, all a 10 ms poller may see).
const DefaultDowntimeLimit = 100 * time.Millisecond

// migrateBandwidth lifts QEMU's default cap (32 MiB/s): the plants' link
// is the limit.
const migrateBandwidth = 4 << 30

// MirrorStats is what a drive mirror moved.
type MirrorStats struct {
	Drive string
	Bytes int64 // the job's length: what it copied
}

// Migration is what Migrate reports.
type Migration struct {
	Info    MigrationInfo // the last query-migrate: total-time, downtime, RAM
	Mirrors []MirrorStats
	// Paused is how long the source stood paused before the switch-over
	// (mirrors finished, Switchover run).
	Paused time.Duration
	// PostCopy: the migration switched to post-copy (asked for, and the
	// guest had not converged in pre-copy first).
	PostCopy bool
	// Switch is the pause's course, each from the pause seen.
	Switch SwitchTimes
}

// SwitchTimes is the course of the pause before the switch-over, each
// step's end from the moment the pause was seen (QEMU stopped the guest
// up to one poll earlier).
type SwitchTimes struct {
	Seen       time.Time     // when the plant saw the pause
	Mirrors    time.Duration // the mirrors finished
	Switchover time.Duration // Switchover returned (< 0: before the pause)
	Completed  time.Duration // the source saw the state sent
}

// Migrate migrates m to the destination of o. When it returns nil the
// destination has the complete state and m is paused for good (stop it);
// on an error m runs as before.
func Migrate(ctx context.Context, m Machine, o MigrateOptions) (mig Migration, err error) {
	log := o.Logger
	if log == nil {
		log = zap.NewNop()
	}
	var nodes []string
	defer func() {
		if err != nil {
			abortMigration(m, nodes, o.Mirrors, log)
		}
	}()
	if err := setupMigration(ctx, m, o); err != nil {
		return mig, err
	}
	for _, mr := range o.Mirrors {
		node, err := startMirror(ctx, m, mr)
		if node != "" {
			nodes = append(nodes, node)
		}
		if err != nil {
			return mig, err
		}
	}
	if mig.Mirrors, err = waitMirrorsReady(ctx, m, o.Mirrors); err != nil {
		return mig, err
	}
	if err := m.QMP(ctx, "migrate", map[string]any{"uri": o.URI}, nil); err != nil {
		return mig, err
	}
	if mig, err = followMigration(ctx, m, o, mig); err != nil {
		return mig, err
	}
	for _, node := range nodes {
		if err := m.QMP(ctx, "blockdev-del", map[string]any{"node-name": node}, nil); err != nil {
			log.Warn("remove the mirror's target node", zap.String("node", node), zap.Error(err))
		}
	}
	return mig, nil
}

// setupMigration sets the capabilities and parameters of an outgoing
// migration.
func setupMigration(ctx context.Context, m Machine, o MigrateOptions) error {
	if m.Spec().MemoryFile != nil && m.Spec().MemoryFile.Share && !m.Spec().MemoryFile.Memfd {
		return errors.New("a machine whose RAM is a shared file cannot migrate live (its RAM is not in the stream)")
	}
	caps := map[string]bool{
		"auto-converge":           true, // throttle a guest that dirties RAM faster than it moves
		"pause-before-switchover": true,
		"postcopy-ram":            o.PostCopy,
		// A machine restored with x-ignore-shared keeps it: RAM must be
		// in this stream.
		"x-ignore-shared": false,
	}
	if err := setCapabilities(ctx, m, caps); err != nil {
		return err
	}
	limit := o.DowntimeLimit
	if limit == 0 {
		limit = DefaultDowntimeLimit
	}
	return m.QMP(ctx, "migrate-set-parameters", map[string]any{
		"max-bandwidth": migrateBandwidth, "downtime-limit": limit.Milliseconds(), "max-postcopy-bandwidth": migrateBandwidth,
	}, nil)
}

func setCapabilities(ctx context.Context, m Machine, caps map[string]bool) error {
	return m.QMP(ctx, "migrate-set-capabilities", capabilitiesArgs(caps), nil)
}

func mirrorNode(mr Mirror) string { return "migrate-" + mr.Drive }

// startMirror opens the destination's export as a node and mirrors the
// drive into it. It returns the node made (to remove) even on an error.
func startMirror(ctx context.Context, m Machine, mr Mirror) (string, error) {
	node := mirrorNode(mr)
	err := m.QMP(ctx, "blockdev-add", map[string]any{
		"driver": "nbd", "node-name": node, "export": mr.Drive,
		"server": map[string]any{"type": "unix", "path": mr.Socket},
	}, nil)
	if err != nil {
		return "", fmt.Errorf("open the destination's disk %s: %w", mr.Drive, err)
	}
	sync := "top"
	if mr.Full {
		sync = "full"
	}
	err = m.QMP(ctx, "blockdev-mirror", map[string]any{
		"job-id": node, "device": mr.Drive, "target": node, "sync": sync,
		// Every guest write reaches both copies before it completes: the
		// mirror stays in step, and the switch needs no last catch-up.
		"copy-mode": "write-blocking",
	}, nil)
	if err != nil {
		return node, fmt.Errorf("mirror %s: %w", mr.Drive, err)
	}
	return node, nil
}

// blockJob is an entry of query-block-jobs.
type blockJob struct {
	Device string `json:"device"` // the job id
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
}

func blockJobs(ctx context.Context, m Machine) (map[string]blockJob, error) {
	var jobs []blockJob
	if err := m.QMP(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	out := map[string]blockJob{}
	for _, j := range jobs {
		out[j.Device] = j
	}
	return out, nil
}

// waitMirrorsReady waits until every mirror has copied its disk and keeps
// the copies in step.
func waitMirrorsReady(ctx context.Context, m Machine, mirrors []Mirror) ([]MirrorStats, error) {
	var watch stallWatch
	for {
		jobs, err := blockJobs(ctx, m)
		if err != nil {
			return nil, err
		}
		var stats []MirrorStats
		var copied int64
		for _, mr := range mirrors {
			j, ok := jobs[mirrorNode(mr)]
			if !ok {
				return nil, fmt.Errorf("the mirror of %s ended before it was ready (the destination's disk went away?)", mr.Drive)
			}
			copied += j.Offset
			if j.Ready {
				stats = append(stats, MirrorStats{Drive: mr.Drive, Bytes: j.Len})
			}
		}
		if len(stats) == len(mirrors) {
			return stats, nil
		}
		if watch.stalled(copied, time.Now()) {
			return nil, watch.err("mirror the disks", copied)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("mirror the disks: %w", ctx.Err())
		case <-time.After(pollEvery):
		}
	}
}

// followMigration polls the migration to its end, finishing the mirrors
// and running Switchover in the pause before the switch.
func followMigration(ctx context.Context, m Machine, o MigrateOptions, mig Migration) (Migration, error) {
	// migrate-continue only wakes the migration thread: the status may
	// read pre-switchover once more after it.
	postcopy, switched, continued := false, false, false
	var watch stallWatch
	var early chan switchDone // Switchover, started before the pause
	near := 2 * o.DowntimeLimit
	if near == 0 {
		near = 2 * DefaultDowntimeLimit
	}
	switchNow := func() error {
		if switched || o.Switched == nil {
			return nil
		}
		switched = true
		return o.Switched(ctx)
	}
	for {
		var info MigrationInfo
		if err := m.QMP(ctx, "query-migrate", nil, &info); err != nil {
			return mig, err
		}
		mig.Info = info
		switch info.Status {
		case "completed":
			if !mig.Switch.Seen.IsZero() {
				mig.Switch.Completed = time.Since(mig.Switch.Seen)
			}
			return mig, switchNow()
		case "postcopy-active":
			mig.PostCopy = true
			if err := switchNow(); err != nil {
				return mig, err
			}
		case "failed", "cancelled":
			return mig, fmt.Errorf("migration %s: %s", info.Status, info.ErrorDesc)
		case "pre-switchover":
			if continued {
				break
			}
			continued = true
			if err := switchOver(ctx, m, o, &mig, early); err != nil {
				return mig, err
			}
		case "active":
			if early == nil && o.Switchover != nil && nearSwitch(info, near) {
				early = make(chan switchDone, 1)
				go func() { early <- switchDone{o.Switchover(ctx), time.Now()} }()
			}
			if o.PostCopy && !postcopy && info.RAM != nil && info.RAM.DirtySyncCount >= 2 {
				// One full pass is there: the rest comes on demand (if
				// what is left does not fit the downtime limit; else the
				// pre-copy completes as it is).
				if err := m.QMP(ctx, "migrate-start-postcopy", nil, nil); err != nil {
					return mig, err
				}
				postcopy = true
			}
		}
		if o.Progress != nil {
			o.Progress(info)
		}
		if sent := info.sent(); info.Status != "postcopy-active" && !continued && watch.stalled(sent, time.Now()) {
			return mig, watch.err("migration "+info.Status, sent)
		}
		select {
		case <-ctx.Done():
			return mig, fmt.Errorf("migration still %s: %w", info.Status, ctx.Err())
		case <-time.After(migratePoll(info, continued)):
		}
	}
}

// MigrationStall is how long a migration's RAM copy or disk mirror may go
// without moving a byte before Migrate gives up on it and the guest runs
// on where it is: a network cut between the plants (no reset, only
// silence) would otherwise hold it until the caller's deadline. Not in
// post-copy, where the guest runs on the destination already.
var MigrationStall = 30 * time.Second

// stallWatch tells a stuck copy from a slow one: stalled once the count of
// bytes moved stood still for MigrationStall.
type stallWatch struct {
	moved int64
	since time.Time
}

func (w *stallWatch) stalled(moved int64, now time.Time) bool {
	if w.since.IsZero() || moved != w.moved {
		w.moved, w.since = moved, now
		return false
	}
	return now.Sub(w.since) >= MigrationStall
}

func (w *stallWatch) err(what string, moved int64) error {
	return fmt.Errorf("%s: no progress in %v (%d bytes moved): is the network between the plants cut, or the destination stuck? %w",
		what, MigrationStall, moved, errdefs.ErrUnavailable)
}

// sent is the RAM bytes the migration sent so far.
func (i MigrationInfo) sent() int64 {
	if i.RAM == nil {
		return 0
	}
	return i.RAM.Transferred
}

// nearSwitch reports that the pass over RAM in progress ends within d:
// the switch-over may come at its end.
func nearSwitch(info MigrationInfo, d time.Duration) bool {
	r := info.RAM
	if r == nil || r.Mbps <= 0 || r.DirtySyncCount < 1 {
		return false
	}
	return time.Duration(float64(r.Remaining)*8/(r.Mbps*1e6)*float64(time.Second)) <= d
}

// switchDone is Switchover's end.
type switchDone struct {
	err error
	at  time.Time
}

// switchOver runs the pause before the switch-over: the mirrors finish
// as Switchover (started early, or now) ends, then the migration goes on.
func switchOver(ctx context.Context, m Machine, o MigrateOptions, mig *Migration, early chan switchDone) error {
	sw := &mig.Switch
	sw.Seen = time.Now()
	if early == nil {
		early = make(chan switchDone, 1)
		if o.Switchover == nil {
			early <- switchDone{at: time.Now()}
		} else {
			go func() { early <- switchDone{o.Switchover(ctx), time.Now()} }()
		}
	}
	err := finishMirrors(ctx, m, o.Mirrors)
	sw.Mirrors = time.Since(sw.Seen)
	d := <-early
	sw.Switchover = d.at.Sub(sw.Seen)
	if d.err != nil {
		err = errors.Join(err, fmt.Errorf("switch-over: %w", d.err))
	}
	if err != nil {
		return err
	}
	if err := m.QMP(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
		return err
	}
	mig.Paused = time.Since(sw.Seen)
	return nil
}

// migratePoll is how long followMigration waits before it asks again:
// the guest is paused from the moment QEMU reaches pre-switchover until
// the plant sees it and lets the switch go on, and from the end of the
// stream until the plant sees it complete and runs the guest there; near
// those moments it asks often (after the first pass over RAM, the last
// round can come at any of the short passes that follow).
func migratePoll(info MigrationInfo, continued bool) time.Duration {
	switch {
	case continued:
		return time.Millisecond
	case info.RAM != nil && info.RAM.DirtySyncCount >= 2:
		return 2 * time.Millisecond
	}
	return pollEvery
}

// finishMirrors ends the mirrors in step (a ready mirror's cancel leaves
// the copy complete) and waits for them to be gone.
func finishMirrors(ctx context.Context, m Machine, mirrors []Mirror) error {
	for _, mr := range mirrors {
		if err := m.QMP(ctx, "block-job-cancel", map[string]any{"device": mirrorNode(mr)}, nil); err != nil {
			return err
		}
	}
	for {
		jobs, err := blockJobs(ctx, m)
		if err != nil {
			return err
		}
		left := 0
		for _, mr := range mirrors {
			if _, ok := jobs[mirrorNode(mr)]; ok {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("finish the mirrors: %w", ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// abortMigration undoes a failed outgoing migration: the stream is
// cancelled, the mirrors and their nodes go, and the guest runs again.
func abortMigration(m Machine, nodes []string, mirrors []Mirror, log *zap.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := m.QMP(ctx, "migrate_cancel", nil, nil); err != nil {
		log.Warn("cancel the migration", zap.Error(err))
	}
	// Wait for the cancel to land: a migration cancelled in its last
	// phase leaves the guest paused.
	for ctx.Err() == nil {
		var info MigrationInfo
		if err := m.QMP(ctx, "query-migrate", nil, &info); err != nil || info.Status != "cancelling" {
			break
		}
		time.Sleep(pollEvery)
	}
	for _, mr := range mirrors {
		_ = m.QMP(ctx, "block-job-cancel", map[string]any{"device": mirrorNode(mr), "force": true}, nil)
	}
	for ctx.Err() == nil {
		if jobs, err := blockJobs(ctx, m); err != nil || len(jobs) == 0 {
			break
		}
		time.Sleep(pollEvery)
	}
	for _, n := range nodes {
		if err := m.QMP(ctx, "blockdev-del", map[string]any{"node-name": n}, nil); err != nil {
			log.Warn("remove the mirror's target node", zap.String("node", n), zap.Error(err))
		}
	}
	if st, err := m.Status(ctx); err == nil && st != "running" {
		if err := m.Continue(ctx); err != nil {
			log.Warn("could not resume the guest after a failed migration", zap.String("status", st), zap.Error(err))
		}
	}
}

// ListenIncoming makes a machine started with Incoming.Live serve its
// drives to the source's mirrors (an NBD server on nbdSocket, one
// writable export per drive, named after it) and listen for the state on
// uri. The disks are activated only when the guest is continued
// (late-block-activate): until then the mirrors write them.
func ListenIncoming(ctx context.Context, m Machine, uri, nbdSocket string, drives []string, postCopy bool) error {
	if err := setCapabilities(ctx, m, map[string]bool{"late-block-activate": true, "postcopy-ram": postCopy}); err != nil {
		return err
	}
	if len(drives) > 0 {
		if err := serveDrives(ctx, m, nbdSocket, drives); err != nil {
			return err
		}
	}
	return m.QMP(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

func serveDrives(ctx context.Context, m Machine, socket string, drives []string) error {
	var blocks []struct {
		Device   string `json:"device"`
		Inserted *struct {
			NodeName string `json:"node-name"`
		} `json:"inserted"`
	}
	if err := m.QMP(ctx, "query-block", nil, &blocks); err != nil {
		return err
	}
	nodes := map[string]string{}
	for _, b := range blocks {
		if b.Inserted != nil {
			nodes[b.Device] = b.Inserted.NodeName
		}
	}
	if err := m.QMP(ctx, "nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": socket}}}, nil); err != nil {
		return err
	}
	for _, d := range drives {
		node, ok := nodes[d]
		if !ok {
			return fmt.Errorf("the machine has no drive %s", d)
		}
		if err := m.QMP(ctx, "block-export-add", map[string]any{"type": "nbd", "id": "export-" + d, "node-name": node, "name": d, "writable": true}, nil); err != nil {
			return err
		}
	}
	return nil
}

// StopServingDrives ends the exports of ListenIncoming once the mirrors
// are finished (the exported nodes were activated with their exports,
// so the guest may run before).
func StopServingDrives(ctx context.Context, m Machine, drives []string) error {
	for _, d := range drives {
		if err := m.QMP(ctx, "block-export-del", map[string]any{"id": "export-" + d, "mode": "hard"}, nil); err != nil {
			return err
		}
	}
	if len(drives) == 0 {
		return nil
	}
	return m.QMP(ctx, "nbd-server-stop", nil, nil)
}

// WaitIncoming waits until the incoming state is loaded (pre-copy) or the
// source handed over (post-copy): the machine is paused, ready to run.
func WaitIncoming(ctx context.Context, m Machine) error {
	for {
		st, err := m.Status(ctx)
		if err != nil {
			return err
		}
		switch st {
		case "paused", "prelaunch":
			return nil
		case "running":
			return nil
		case "inmigrate":
		default:
			return fmt.Errorf("machine is %s while receiving its state", st)
		}
		select {
		case <-m.Exited():
			return ErrExited
		case <-ctx.Done():
			return fmt.Errorf("wait for the incoming state: %w", ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// Announce has QEMU send gratuitous ARP/RARP from the guest's NICs (and
// ask the guest to announce itself), so switches and peers learn where it
// is now.
func Announce(ctx context.Context, m Machine) error {
	return m.QMP(ctx, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100}, nil)
}
