package plant

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Working-set profiles. Every lazy clone records the blocks of its RAM
// file and root disk it reads from the start of its creation until
// profileAfterReady after it is ready, in order (gvfs.Recording). The
// image's profile is asked for as the creation starts (profileLookup); a
// clone of an image that has one fetches the profile's blocks first, in
// order and pipelined, in the prefetch class, while the redo log is made
// and QEMU restores (gvfs.ProfileRun). The recording is stored with the image
// (PutProfile) when the image had none, or when the profile no longer
// predicts: fewer than half of its fetched blocks were read, or the clone
// read more blocks outside it than from it.

// profileAfterReady is how long after ready a clone's reads still count
// as its start: the workload it was made for begins then.
const profileAfterReady = 2 * time.Second

// minHitRate is the hit rate below which a profile is recorded again.
const minHitRate = 0.5

// profileLookup is an image's working-set profile asked for as a creation
// starts, while the plant reads the image's manifest and configuration:
// the restore then knows whether there is one (auto decides on it) and
// the prefetch begins without a round trip of its own.
type profileLookup struct {
	done    chan struct{}
	entries []*imagev1.ProfileEntry
}

// lookupProfile asks the image server for image's profile in the
// background (nil when the plant restores eagerly: no profile is used).
func (p *Plant) lookupProfile(ctx context.Context, image string) *profileLookup {
	if p.cfg.MemoryRestore == RestoreEager {
		return nil
	}
	pl := &profileLookup{done: make(chan struct{})}
	go func() {
		defer close(pl.done)
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		resp, err := p.cfg.Proxy.Upstream().Client.API.GetProfile(ctx, &imagev1.GetProfileRequest{Image: image})
		if err != nil {
			p.log.Debug("no working-set profile", zap.String("image", image), zap.Error(err))
			return
		}
		pl.entries = resp.Entries
	}()
	return pl
}

// wait returns the profile's entries (none: no profile, or none asked for).
func (pl *profileLookup) wait(ctx context.Context) []*imagev1.ProfileEntry {
	if pl == nil {
		return nil
	}
	select {
	case <-pl.done:
		return pl.entries
	case <-ctx.Done():
		return nil
	}
}

// profile is one clone's profile prefetch and recording.
type profile struct {
	rec  *gvfs.Recording
	run  *gvfs.ProfileRun // nil: the image has no profile
	once sync.Once
}

// profiled: the step "profile" applies to restores of images whose RAM is
// a file, unless the plant restores eagerly.
func (l *line) profiled() bool {
	return l.restored() && l.src.config.RAM != "" && l.p.cfg.MemoryRestore != RestoreEager
}

// startProfile starts the clone's recording and, when the image has a
// profile, its prefetch, before QEMU is even started: the blocks the
// guest will read first are on their way while the redo log is made.
func (l *line) startProfile(ctx context.Context) (func(), error) {
	p := l.p.cfg.Proxy
	pr := &profile{rec: p.Record(l.src.image, nil)}
	if entries := l.src.profile.wait(ctx); len(entries) > 0 {
		pr.run = p.Prefetch(l.src.image, entries)
		pr.rec.Attach(pr.run)
		l.log.Info("prefetching the working-set profile", zap.Int("blocks", len(entries)))
	}
	l.prof = pr
	return func() { l.prof.abandon() }, nil
}

// abandon ends the recording and the prefetch without storing anything (a
// failed creation, an eager restore); nil or done already does nothing.
func (pr *profile) abandon() {
	if pr == nil {
		return
	}
	pr.once.Do(func() {
		pr.rec.Stop()
		if pr.run != nil {
			pr.run.Stop()
		}
	})
}

// finishProfile ends a clone's recording profileAfterReady after it is
// ready and stores it when the image needs a profile; a plant that closes
// meanwhile abandons it.
func (p *Plant) finishProfile(image string, pr *profile, log *zap.Logger) {
	p.bg.Add(1)
	go func() {
		defer p.bg.Done()
		select {
		case <-time.After(profileAfterReady):
		case <-p.closing:
			pr.abandon()
			return
		}
		var entries []*imagev1.ProfileEntry
		var st *gvfs.ProfileStats
		pr.once.Do(func() {
			entries = pr.rec.Stop()
			if pr.run != nil {
				s := pr.run.Stop()
				st = &s
			}
		})
		reason := "the image has no profile"
		if st != nil {
			log.Info("working-set profile", zap.Int("entries", st.Entries), zap.Int("fetched", st.Fetched),
				zap.Int("used", st.Used), zap.Int("missed", st.Missed), zap.Float64("hit_rate", st.HitRate()))
			if st.HitRate() >= minHitRate && st.Missed <= st.Used {
				return // it still predicts
			}
			reason = "the profile no longer predicts"
		}
		if len(entries) == 0 {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := p.cfg.Proxy.Upstream().Client.API.PutProfile(ctx, &imagev1.PutProfileRequest{Image: image, Entries: entries}); err != nil {
			log.Warn("could not store the working-set profile", zap.Error(err))
			return
		}
		log.Info("working-set profile stored", zap.String("why", reason), zap.Int("blocks", len(entries)))
	}()
}
