package blockcache

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// nameTable maps file hashes back to file ids. Tags hold only the hash; the
// ids of files with dirty blocks must survive a restart so that the flusher
// can be told which file a dirty block belongs to.
//
// On disk it is a journal of records, appended and fdatasynced the first
// time a file id is written (before the first dirty tag that names it):
//
//	u32 length of the id | 16-byte file hash | id | u32 CRC-32C of the preceding bytes
//
// A torn last record is cut off when the journal is loaded. Open rewrites
// the journal keeping only the ids that dirty blocks still refer to.
type nameTable struct {
	mu     sync.Mutex
	f      *os.File
	end    int64
	noSync bool
	byHash map[fileHash]string
}

const maxFileID = 4096

func loadNames(path string, noSync bool) (*nameTable, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	t := &nameTable{f: f, noSync: noSync, byHash: make(map[fileHash]string)}
	off := 0
	for {
		name, h, n, ok := decodeName(b[off:])
		if !ok {
			break
		}
		t.byHash[h] = name
		off += n
	}
	t.end = int64(off)
	if off != len(b) {
		// The tail is a record torn by a crash; its tag was never written.
		if err := f.Truncate(t.end); err != nil {
			f.Close()
			return nil, err
		}
	}
	return t, nil
}

func encodeName(name string, h fileHash) []byte {
	b := make([]byte, 4+16+len(name)+4)
	binary.LittleEndian.PutUint32(b, uint32(len(name)))
	copy(b[4:], h[:])
	copy(b[20:], name)
	n := len(b) - 4
	binary.LittleEndian.PutUint32(b[n:], checksum(b[:n]))
	return b
}

func decodeName(b []byte) (name string, h fileHash, n int, ok bool) {
	if len(b) < 24 {
		return "", h, 0, false
	}
	l := int(binary.LittleEndian.Uint32(b))
	if l > maxFileID || len(b) < 24+l {
		return "", h, 0, false
	}
	n = 24 + l
	if binary.LittleEndian.Uint32(b[n-4:]) != checksum(b[:n-4]) {
		return "", h, 0, false
	}
	copy(h[:], b[4:20])
	name = string(b[20 : 20+l])
	if hashFile(name) != h {
		return "", h, 0, false
	}
	return name, h, n, true
}

func (t *nameTable) lookup(h fileHash) (string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	name, ok := t.byHash[h]
	return name, ok
}

// ensure makes the mapping h -> name durable.
func (t *nameTable) ensure(name string, h fileHash) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if have, ok := t.byHash[h]; ok {
		if have != name {
			return fmt.Errorf("blockcache: file ids %q and %q share a 128-bit hash: %w", have, name, errdefs.ErrInternal)
		}
		return nil
	}
	rec := encodeName(name, h)
	if _, err := t.f.WriteAt(rec, t.end); err != nil {
		return fmt.Errorf("blockcache: record file id: %w", err)
	}
	if !t.noSync {
		if err := fdatasync(t.f); err != nil {
			// The record may or may not be on disk; write it again next time.
			return fmt.Errorf("blockcache: record file id: %w", err)
		}
	}
	t.end += int64(len(rec))
	t.byHash[h] = name
	return nil
}

// compact rewrites the journal with only the hashes in keep. It runs during
// Open, before the table is shared.
func (t *nameTable) compact(keep map[fileHash]bool) error {
	if len(keep) == len(t.byHash) {
		return nil
	}
	path := t.f.Name()
	var buf []byte
	kept := make(map[fileHash]string, len(keep))
	for h := range keep {
		if name, ok := t.byHash[h]; ok {
			buf = append(buf, encodeName(name, h)...)
			kept[h] = name
		}
	}
	if err := fsutil.WriteFileAtomic(path, buf); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	t.f.Close()
	t.f, t.end, t.byHash = f, int64(len(buf)), kept
	return nil
}

func (t *nameTable) close() error { return t.f.Close() }
