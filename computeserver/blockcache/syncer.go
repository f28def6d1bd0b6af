package blockcache

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// syncer makes the writes to one file durable with group commit: callers
// that arrive while an fdatasync is running share the next one, so N
// concurrent durable writes cost about two fdatasyncs, not N.
//
// An fdatasync failure is sticky: after one, Linux may have dropped dirty
// pages and cleared the error, so no later sync can be trusted to cover the
// writes made before it.
type syncer struct {
	f    *os.File
	off  bool // Config.UnsafeNoFsync
	mu   sync.Mutex
	cond sync.Cond
	// asked counts tickets; done is the highest ticket a finished sync
	// covers. A sync covers every ticket handed out before it started.
	asked, done uint64
	running     bool
	err         error
}

func newSyncer(f *os.File, off bool) *syncer {
	s := &syncer{f: f, off: off}
	s.cond.L = &s.mu
	return s
}

// Sync returns once every write to the file that completed before the call
// is on stable storage.
func (s *syncer) Sync() error {
	if s.off {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.asked++
	me := s.asked
	for s.done < me && s.err == nil {
		if s.running {
			s.cond.Wait()
			continue
		}
		s.running = true
		target := s.asked
		s.mu.Unlock()
		err := fdatasync(s.f)
		s.mu.Lock()
		s.running = false
		if err != nil {
			s.err = fmt.Errorf("fdatasync %s: %w", s.f.Name(), err)
		} else {
			s.done = target
		}
		s.cond.Broadcast()
	}
	return s.err
}

func fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}
