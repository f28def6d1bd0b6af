package imageserver

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// FuzzDecodeManifest: DecodeManifest never panics, and a manifest it accepts
// re-encodes to one it accepts again, unchanged.
func FuzzDecodeManifest(f *testing.F) {
	for _, m := range []*imagev1.Manifest{validManifest(), validDiskManifest(), {}, {Name: "x"}} {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0x01, '.'})
	f.Add([]byte{0x1a, 0x00})
	f.Add([]byte("\xff\xff\xff\xff"))

	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeManifest(b)
		if err != nil {
			return
		}
		again, err := proto.Marshal(m)
		if err != nil {
			t.Fatalf("an accepted manifest does not re-encode: %v", err)
		}
		m2, err := DecodeManifest(again)
		if err != nil {
			t.Fatalf("a re-encoded manifest is rejected: %v", err)
		}
		if !proto.Equal(m, m2) {
			t.Fatal("a manifest changed through re-encoding")
		}
		// What an accepted golden manifest promises the read path.
		for _, f := range m.Files {
			if m.Writable {
				continue
			}
			if uint64(len(f.BlockDigests)) != blocks(f)*blockproto.DigestSize || len(f.ZeroMap) != blockproto.ZeroMapLen(f.Size) {
				t.Fatalf("file %s: meta-data inconsistent with its size", f.Name)
			}
			if f.ChunkSize == 0 || f.ChunkSize > blockproto.MaxBlockSize {
				t.Fatalf("file %s: chunk size %d", f.Name, f.ChunkSize)
			}
		}
	})
}

// FuzzScanFile: the meta-data ScanFile computes from a sparse file (with or
// without punching holes) equals what the file's bytes say, and punching
// never changes the bytes. The input is a list of writes: [off u16][len u8]
// [byte], scaled so files span several blocks, holes and partial granules.
func FuzzScanFile(f *testing.F) {
	f.Add(uint16(3*blockproto.MinBlockSize+100), uint8(0), []byte{})
	f.Add(uint16(5000), uint8(1), []byte{0, 1, 10, 0xaa, 0, 2, 255, 0})
	f.Add(uint16(40000), uint8(2), []byte{0, 0, 255, 0, 0, 200, 16, 7})
	f.Add(uint16(65535), uint8(3), []byte{0xff, 0xff, 1, 1, 0x80, 0x00, 128, 0})
	f.Fuzz(func(t *testing.T, size uint16, bsShift uint8, writes []byte) {
		bs := blockproto.MinBlockSize << (bsShift % 3)
		l := newLayout(int(size) * 4) // up to 256 KiB
		for len(writes) >= 4 {
			off := int(binary.LittleEndian.Uint16(writes)) * 4
			n := int(writes[2]) * 64
			v := writes[3]
			writes = writes[4:]
			if off >= l.size {
				continue
			}
			n = min(n, l.size-off)
			l.write(off, bytes.Repeat([]byte{v}, n))
		}
		dir := t.TempDir()
		file, err := os.OpenFile(filepath.Join(dir, "f"), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		if err := file.Truncate(int64(l.size)); err != nil {
			t.Fatal(err)
		}
		for _, w := range l.written {
			if _, err := file.WriteAt(l.content[w.off:w.off+w.n], int64(w.off)); err != nil {
				t.Fatal(err)
			}
		}
		want := l.want(bs)
		for _, punch := range []bool{false, true} {
			got, err := ScanFile(file, uint32(bs), punch)
			if err != nil {
				t.Fatal(err)
			}
			checkScan(t, got, want)
		}
		back, err := os.ReadFile(file.Name())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back, l.content) {
			t.Fatal("punching changed the file's bytes")
		}
	})
}
