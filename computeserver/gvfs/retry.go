package gvfs

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/connectivity"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Backoff between attempts to reach an upstream that is away.
const (
	retryFirstWait = 50 * time.Millisecond
	retryMaxWait   = 2 * time.Second
)

// outage is the clock of an upstream that is away: since when it has not
// answered, and when a read last gave up on it. The retry window counts
// from the start of the outage, not from each read's own start: a guest's
// reads of one file come one after another (the kernel re-reads what its
// read-ahead failed, QEMU reads on), and each waiting a whole window anew
// made one outage of a few seconds into a restore failing after 41 s.
type outage struct {
	mu     sync.Mutex
	since  time.Time // zero while the upstream answers
	gaveUp time.Time // the last read that gave up waiting
	last   error     // and why
}

// away records a failed attempt and returns when the outage began.
func (o *outage) away() time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.since.IsZero() {
		o.since = time.Now()
	}
	return o.since
}

// answered ends the outage.
func (o *outage) answered() {
	o.mu.Lock()
	o.since = time.Time{}
	o.mu.Unlock()
}

func (o *outage) giveUp(err error) {
	o.mu.Lock()
	o.gaveUp, o.last = time.Now(), err
	o.mu.Unlock()
}

// Unreachable reports whether a read gave up on the upstream (away for
// longer than Config.UpstreamRetry) after t: the error says so and wraps
// errdefs.ErrUnavailable, nil when none did. A plant whose guest died of
// the I/O errors of such reads fails the creation with it, as Unavailable.
func (u *Upstream) Unreachable(t time.Time) error {
	if u == nil {
		return nil
	}
	u.out.mu.Lock()
	defer u.out.mu.Unlock()
	if u.out.gaveUp.IsZero() || u.out.gaveUp.Before(t) {
		return nil
	}
	return fmt.Errorf("reads of the upstream %s gave up: %w", u.Addr, u.out.last)
}

// retry runs op until it succeeds, fails for another reason than an
// unavailable upstream, ctx ends, or the upstream has been away for window,
// waiting with exponential backoff between attempts: as a hard NFS mount,
// a read waits out an image server's restart instead of failing the
// guest's I/O. Once an outage has lasted window, reads fail at once (after
// one more attempt: a broken stream is reopened at once) until the
// upstream answers again.
func (u *Upstream) retry(ctx context.Context, window time.Duration, op func() error) error {
	wait := retryFirstWait
	for attempt := 0; ; attempt++ {
		err := op()
		if err == nil || !errdefs.IsUnavailable(err) {
			if ctx.Err() == nil {
				u.out.answered()
			}
			return err
		}
		if ctx.Err() != nil {
			return err
		}
		since := u.out.away()
		left := time.Until(since.Add(window))
		if left <= 0 {
			if attempt == 0 {
				continue
			}
			err = fmt.Errorf("upstream away for %s (the limit is %s): %w", time.Since(since).Round(time.Millisecond), window, err)
			u.out.giveUp(err)
			return err
		}
		t := time.NewTimer(min(wait, left))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return err
		}
		wait = min(2*wait, retryMaxWait)
		// The connection's own reconnect backoff (up to two minutes in
		// gRPC) would keep failing calls after the upstream is back: the
		// retries pace the reconnects instead.
		u.cc.ResetConnectBackoff()
		// The bulk connection only when it is backing off: gRPC's reset
		// iterates its sub-connections unlocked, a race while a first
		// connect creates them (go test -race saw it).
		if u.bcc.GetState() == connectivity.TransientFailure {
			u.bcc.ResetConnectBackoff()
		}
	}
}
