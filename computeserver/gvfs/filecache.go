package gvfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// FileCache holds files whose policy is WHOLE_FILE (GVFS §3.2.2: memory
// state, kernels, configs). The first read starts one FetchFile stream that
// decompresses chunks into a local sparse file; a read waits only until the
// range it needs has arrived, not for the whole file. A finished file is
// verified against its SHA-256 and renamed into place, so a restarted
// compute server finds it warm. Files are keyed by content (SHA-256), so
// equal files of different images are fetched once.
type FileCache struct {
	dir   string
	up    *Upstream
	retry time.Duration // Config.UpstreamRetry
	log   *zap.Logger

	// Fetches run under ctx; Close cancels it and waits for them.
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closeMu sync.Mutex // orders wg.Add against Close (never held with mu)
	closed  bool

	mu    sync.Mutex
	files map[string]*wholeFile

	received atomic.Uint64 // uncompressed non-zero bytes received
}

// newFileCache opens a file cache in dir.
func newFileCache(dir string, up *Upstream, retry time.Duration, log *zap.Logger) (*FileCache, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// Partial downloads of a previous run restart from zero.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".partial") {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &FileCache{dir: dir, up: up, retry: retry, log: log, files: map[string]*wholeFile{}, ctx: ctx, cancel: cancel}, nil
}

// Close stops the fetches in flight and waits for them.
func (c *FileCache) Close() {
	c.closeMu.Lock()
	c.closed = true
	c.closeMu.Unlock()
	c.cancel()
	c.wg.Wait()
}

type wholeFile struct {
	c     *FileCache
	key   string
	image string
	name  string
	size  uint64
	sum   []byte
	path  string

	mu       sync.Mutex
	f        *os.File
	arrived  uint64 // every byte below this has arrived
	complete bool
	fetching bool
	err      error
	changed  chan struct{} // closed and replaced whenever the state changes
	hash     hash.Hash
}

func (c *FileCache) get(image string, meta *imagev1.FileMeta) *wholeFile {
	key := hex.EncodeToString(meta.Sha256)
	c.mu.Lock()
	defer c.mu.Unlock()
	if w := c.files[key]; w != nil {
		return w
	}
	w := &wholeFile{c: c, key: key, image: image, name: meta.Name, size: meta.Size, sum: meta.Sha256,
		path: filepath.Join(c.dir, key), changed: make(chan struct{})}
	if f, err := os.Open(w.path); err == nil {
		if st, err := f.Stat(); err == nil && uint64(st.Size()) == meta.Size {
			w.f, w.arrived, w.complete = f, meta.Size, true
		} else {
			f.Close()
		}
	}
	c.files[key] = w
	return w
}

// ReadAt reads from a whole-file-policy file, fetching it if needed and
// waiting only for the bytes it needs.
func (c *FileCache) ReadAt(ctx context.Context, image string, meta *imagev1.FileMeta, dst []byte, off int64) (int, error) {
	if off >= int64(meta.Size) {
		return 0, nil
	}
	end := min(uint64(off)+uint64(len(dst)), meta.Size)
	w := c.get(image, meta)
	f, err := w.waitFor(ctx, end)
	if err != nil {
		return 0, err
	}
	n, err := f.ReadAt(dst[:end-uint64(off)], off)
	if n == int(end-uint64(off)) {
		err = nil
	}
	return n, err
}

// Complete reports whether the file is fully cached (for stats and tests).
func (c *FileCache) Complete(meta *imagev1.FileMeta) bool {
	c.mu.Lock()
	w := c.files[hex.EncodeToString(meta.Sha256)]
	c.mu.Unlock()
	if w == nil {
		_, err := os.Stat(filepath.Join(c.dir, hex.EncodeToString(meta.Sha256)))
		return err == nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.complete
}

// waitFor starts the fetch if needed and returns the local file once every
// byte below end has arrived.
func (w *wholeFile) waitFor(ctx context.Context, end uint64) (*os.File, error) {
	for {
		w.mu.Lock()
		if w.arrived >= end {
			f := w.f
			w.mu.Unlock()
			return f, nil
		}
		if !w.fetching {
			if w.err != nil {
				// The fetch failed (not found, corrupt, or the upstream away
				// for longer than Config.UpstreamRetry): report it, and let
				// the next reader try again.
				err := w.err
				w.err = nil
				w.mu.Unlock()
				return nil, err
			}
			if err := w.startLocked(); err != nil {
				w.mu.Unlock()
				return nil, err
			}
		}
		ch := w.changed
		w.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (w *wholeFile) startLocked() error {
	w.c.closeMu.Lock()
	if w.c.closed {
		w.c.closeMu.Unlock()
		return fmt.Errorf("the file cache is closed: %w", errdefs.ErrUnavailable)
	}
	w.c.wg.Add(1) // done by fetch, or below on failure
	w.c.closeMu.Unlock()
	if w.f == nil {
		f, err := os.OpenFile(w.path+".partial", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err == nil {
			if err = f.Truncate(int64(w.size)); err != nil {
				f.Close()
			}
		}
		if err != nil {
			w.c.wg.Done()
			return err
		}
		w.f, w.arrived, w.hash = f, 0, sha256.New()
	}
	w.fetching, w.err = true, nil
	go w.fetch()
	return nil
}

func (w *wholeFile) notifyLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *wholeFile) fetch() {
	c := w.c
	defer c.wg.Done()
	var zero [imagev1.MaxBlockSize]byte
	got := func(off uint64, n uint32, data []byte) error {
		if data != nil {
			if _, err := w.f.WriteAt(data, int64(off)); err != nil {
				return err
			}
			w.hash.Write(data)
			c.received.Add(uint64(len(data)))
		} else {
			for left := int(n); left > 0; left -= min(left, len(zero)) {
				w.hash.Write(zero[:min(left, len(zero))])
			}
		}
		w.mu.Lock()
		w.arrived = off + uint64(n)
		w.notifyLocked()
		w.mu.Unlock()
		return nil
	}
	// An upstream that goes away is waited for; each attempt resumes where
	// the last one stopped (chunks arrive in order, so the hash goes on).
	// FetchFile itself does not retry: its waits would add to the window.
	err := c.up.retry(c.ctx, c.retry, func() error {
		w.mu.Lock()
		from := w.arrived
		w.mu.Unlock()
		return c.up.Bulk.FetchFile(c.ctx, w.image, w.name, from, 0, got)
	})
	if err == nil && w.arrived != w.size {
		err = fmt.Errorf("%s/%s: stream ended at %d of %d bytes: %w", w.image, w.name, w.arrived, w.size, errdefs.ErrUnavailable)
	}
	if err == nil {
		err = w.finish()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.fetching = false
	if err != nil {
		c.log.Warn("whole-file fetch failed", zap.String("image", w.image), zap.String("file", w.name), zap.Uint64("arrived", w.arrived), zap.Error(err))
		w.err = err
		if !errdefs.IsUnavailable(err) { // start over next time
			w.f.Close()
			os.Remove(w.path + ".partial")
			w.f, w.arrived = nil, 0
		}
	}
	w.notifyLocked()
}

// finish verifies and publishes a fully arrived file.
func (w *wholeFile) finish() error {
	if got := w.hash.Sum(nil); !equalBytes(got, w.sum) {
		return fmt.Errorf("%s/%s: SHA-256 of the fetched file does not match the manifest: %w", w.image, w.name, errdefs.ErrDataLoss)
	}
	if err := w.f.Sync(); err != nil {
		return err
	}
	if err := os.Rename(w.path+".partial", w.path); err != nil {
		return err
	}
	w.mu.Lock()
	w.complete = true
	w.mu.Unlock()
	return nil
}

// Drop removes every complete file that is not being fetched and returns
// how many it removed. Readers holding the file keep their descriptor.
func (c *FileCache) Drop() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for key, w := range c.files {
		w.mu.Lock()
		if !w.fetching {
			// The descriptor is not closed: a reader may still hold it (the
			// file is unlinked; its finalizer closes it).
			os.Remove(w.path)
			os.Remove(w.path + ".partial")
			delete(c.files, key)
			n++
		}
		w.mu.Unlock()
	}
	// Files of a previous run that were never opened in this one.
	ents, _ := os.ReadDir(c.dir)
	for _, e := range ents {
		if _, open := c.files[e.Name()]; !open && !strings.HasSuffix(e.Name(), ".partial") {
			if os.Remove(filepath.Join(c.dir, e.Name())) == nil {
				n++
			}
		}
	}
	return n
}

// Received is the number of non-zero bytes received so far.
func (c *FileCache) Received() uint64 { return c.received.Load() }

func equalBytes(a, b []byte) bool { return string(a) == string(b) }
