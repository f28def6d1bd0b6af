package imageserver

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// checkFrames reads every chunk of image/file through Frame and compares it
// with want; it reports whether the file had frames.
func checkFrames(t *testing.T, s *Store, image, file string, want []byte) bool {
	t.Helper()
	h, err := s.OpenFile(image, file)
	if err != nil {
		t.Fatal(err)
	}
	dec, _ := zstd.NewReader(nil)
	defer dec.Close()
	cs := uint64(h.Meta().ChunkSize)
	for off := uint64(0); off < uint64(len(want)); off += cs {
		frame, zero, ok, err := h.Frame(off)
		if err != nil {
			t.Fatalf("frame at %d: %v", off, err)
		}
		if !ok {
			return false
		}
		chunk := want[off:min(off+cs, uint64(len(want)))]
		if zero {
			if !blockproto.IsZero(chunk) {
				t.Fatalf("chunk at %d is marked zero but holds data", off)
			}
			continue
		}
		got, err := dec.DecodeAll(frame, nil)
		if err != nil || !bytes.Equal(got, chunk) {
			t.Fatalf("chunk at %d: %v, %d bytes, equal %v", off, err, len(got), bytes.Equal(got, chunk))
		}
	}
	return true
}

// TestChunksCompressedAtPublish: a whole-file file is compressed once, at
// publish, chunk by chunk (zero chunks have no frame); on-demand files are
// not; a store whose sidecar is missing or damaged serves without it.
func TestChunksCompressedAtPublish(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	rng := rand.New(rand.NewPCG(5, 5))
	mem := make([]byte, 5*blockproto.ChunkSize+12345)
	for i := range mem[:2*blockproto.ChunkSize] { // two chunks of data, compressible
		mem[i] = byte(rng.IntN(16))
	}
	copy(mem[4*blockproto.ChunkSize:], bytes.Repeat([]byte("vmgrid"), 1000))
	disk := sparseData(rng, 4<<20)
	publish(t, s, "img", nil,
		testFile{name: "mem.state", kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, data: mem},
		testFile{name: "disk.raw", kind: imagev1.FileKind_FILE_KIND_DISK, data: disk})
	if !checkFrames(t, s, "img", "mem.state", mem) {
		t.Fatal("the memory state has no compressed chunks")
	}
	if checkFrames(t, s, "img", "disk.raw", disk) {
		t.Fatal("an on-demand disk got compressed chunks")
	}
	side := filepath.Join(dir, "images", "img", zstDir, "mem.state")
	st, err := os.Stat(side)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() >= int64(len(mem))/2 {
		t.Fatalf("sidecar of %d bytes for %d compressible bytes", st.Size(), len(mem))
	}

	// Damaged, then missing: reopened stores fall back to compressing at
	// request time, and reads are right either way.
	if err := os.WriteFile(side, []byte("junk"), 0o644); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	if checkFrames(t, s, "img", "mem.state", mem) {
		t.Fatal("a damaged sidecar was used")
	}
	readAll(t, s, "img", "mem.state", mem)
	if err := os.Remove(side); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	if checkFrames(t, s, "img", "mem.state", mem) {
		t.Fatal("frames without a sidecar")
	}
	readAll(t, s, "img", "mem.state", mem)
}
