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
// file and root disk it reads from its restore until profileAfterReady
// after it is ready, in order (gvfs.Recording). A clone of an image that
// has a profile on the image server fetches the profile's blocks first, in
// order and pipelined, in the prefetch class, while QEMU restores
// (gvfs.ProfileRun). The recording is stored with the image
// (PutProfile) when the image had none, or when the profile no longer
// predicts: fewer than half of its fetched blocks were read, or the clone
// read more blocks outside it than from it.

// profileAfterReady is how long after ready a clone's reads still count
// as its start: the workload it was made for begins then.
const profileAfterReady = 2 * time.Second

// minHitRate is the hit rate below which a profile is recorded again.
const minHitRate = 0.5

// profile is one clone's profile prefetch and recording.
type profile struct {
	rec  *gvfs.Recording
	mu   sync.Mutex
	run  *gvfs.ProfileRun // nil until the profile arrived, or none
	done chan struct{}    // the profile was asked for
}

// startProfile starts the recording and, in the background, asks the image
// server for the image's profile and prefetches it.
func (l *line) startProfile() *profile {
	p := l.p.cfg.Proxy
	pr := &profile{rec: p.Record(l.src.image, nil), done: make(chan struct{})}
	image := l.src.image
	go func() {
		defer close(pr.done)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := p.Upstream().Client.API.GetProfile(ctx, &imagev1.GetProfileRequest{Image: image})
		if err != nil {
			l.log.Debug("no working-set profile", zap.Error(err))
			return
		}
		if len(resp.Entries) == 0 {
			return
		}
		run := p.Prefetch(image, resp.Entries)
		pr.rec.Attach(run)
		pr.mu.Lock()
		pr.run = run
		pr.mu.Unlock()
		l.log.Info("prefetching the working-set profile", zap.Int("blocks", len(resp.Entries)))
	}()
	return pr
}

// abandon ends the recording and the prefetch of a failed creation.
func (pr *profile) abandon() {
	go func() {
		<-pr.done
		pr.rec.Stop()
		pr.mu.Lock()
		defer pr.mu.Unlock()
		if pr.run != nil {
			pr.run.Stop()
		}
	}()
}

// finishProfile ends a clone's recording profileAfterReady after it is
// ready and stores it when the image needs a profile.
func (p *Plant) finishProfile(image string, pr *profile, log *zap.Logger) {
	go func() {
		time.Sleep(profileAfterReady)
		<-pr.done
		pr.mu.Lock()
		run := pr.run
		pr.mu.Unlock()
		entries := pr.rec.Stop()
		reason := "the image has no profile"
		if run != nil {
			st := run.Stop()
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
