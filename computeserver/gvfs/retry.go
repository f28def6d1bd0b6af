package gvfs

import (
	"context"
	"fmt"
	"time"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Backoff between attempts to reach an upstream that is away.
const (
	retryFirstWait = 50 * time.Millisecond
	retryMaxWait   = 2 * time.Second
)

// retryUnavailable runs op until it succeeds, fails for another reason
// than an unavailable upstream, ctx ends, or window has passed, waiting
// with exponential backoff between attempts: as a hard NFS mount, a read
// waits out an image server's restart instead of failing the guest's I/O.
// A window of zero or less still tries twice (a broken stream is reopened
// at once).
func retryUnavailable(ctx context.Context, window time.Duration, op func() error) error {
	deadline := time.Now().Add(window)
	wait := retryFirstWait
	for attempt := 0; ; attempt++ {
		err := op()
		if err == nil || !errdefs.IsUnavailable(err) || ctx.Err() != nil {
			return err
		}
		left := time.Until(deadline)
		if left <= 0 {
			if attempt == 0 {
				continue
			}
			return fmt.Errorf("upstream away for %s: %w", window, err)
		}
		t := time.NewTimer(min(wait, left))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return err
		}
		wait = min(2*wait, retryMaxWait)
	}
}
