package imageserver

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// layout describes a test file: its content, and which ranges are written as
// data (everything else is left as a hole by Truncate).
type layout struct {
	size    int
	content []byte // the expected bytes, len == size
	written []span // ranges written with WriteAt (data, possibly zero bytes)
}

type span struct{ off, n int }

func (l *layout) write(off int, b []byte) {
	copy(l.content[off:], b)
	l.written = append(l.written, span{off, len(b)})
}

func newLayout(size int) *layout { return &layout{size: size, content: make([]byte, size)} }

// create writes the layout into a new file in dir and returns it open.
func (l *layout) create(t testing.TB, dir string) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "f"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(l.size)); err != nil {
		t.Fatal(err)
	}
	for _, w := range l.written {
		if _, err := f.WriteAt(l.content[w.off:w.off+w.n], int64(w.off)); err != nil {
			t.Fatal(err)
		}
	}
	// Allocate written blocks on disk, so Stat_t.Blocks tells what a punch did.
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return f
}

// want computes the meta-data ScanFile must produce, from the bytes alone.
func (l *layout) want(bs int) *FileScan {
	s := &FileScan{Size: uint64(l.size), BlockSize: uint32(bs), ZeroMap: make([]byte, blockproto.ZeroMapLen(uint64(l.size)))}
	for g := 0; g*blockproto.ZeroGranule < l.size; g++ {
		p := l.content[g*blockproto.ZeroGranule : min((g+1)*blockproto.ZeroGranule, l.size)]
		if bytes.Count(p, []byte{0}) == len(p) {
			s.ZeroMap[g/8] |= 1 << (g % 8)
		} else {
			s.NonZero += uint64(len(p))
		}
	}
	for off := 0; off < l.size; off += bs {
		d := sha256.Sum256(l.content[off:min(off+bs, l.size)])
		s.Digests = append(s.Digests, d[:]...)
	}
	sum := sha256.Sum256(l.content)
	s.SHA256 = sum[:]
	return s
}

func checkScan(t *testing.T, got, want *FileScan) {
	t.Helper()
	if got.Size != want.Size || got.BlockSize != want.BlockSize {
		t.Fatalf("size %d block size %d, want %d %d", got.Size, got.BlockSize, want.Size, want.BlockSize)
	}
	if !bytes.Equal(got.ZeroMap, want.ZeroMap) {
		t.Fatalf("zero map\n got %x\nwant %x", got.ZeroMap, want.ZeroMap)
	}
	if len(got.Digests) != len(want.Digests) {
		t.Fatalf("%d digest bytes, want %d", len(got.Digests), len(want.Digests))
	}
	for i := 0; i < len(want.Digests); i += blockproto.DigestSize {
		if !bytes.Equal(got.Digests[i:i+blockproto.DigestSize], want.Digests[i:i+blockproto.DigestSize]) {
			t.Fatalf("digest of block %d: got %x want %x", i/blockproto.DigestSize, got.Digests[i:i+blockproto.DigestSize], want.Digests[i:i+blockproto.DigestSize])
		}
	}
	if !bytes.Equal(got.SHA256, want.SHA256) {
		t.Fatalf("sha256 %x, want %x", got.SHA256, want.SHA256)
	}
	if got.NonZero != want.NonZero {
		t.Fatalf("nonzero %d, want %d", got.NonZero, want.NonZero)
	}
}

func diskBlocks(t testing.TB, f *os.File) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks // 512-byte units
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.IntN(255) + 1) // never zero
	}
	return b
}

// mixedLayout has every case a zero map must get right: hole blocks, blocks
// of explicitly written zeros, data and zeros in one block, one non-zero byte
// in a granule, a granule of zeros between data, and a partial last block
// whose partial last granule is data.
func mixedLayout(rng *rand.Rand, bs int) *layout {
	size := 5*bs + 3*blockproto.ZeroGranule + 100
	l := newLayout(size)
	// block 0: a hole.
	// block 1: explicit zeros.
	l.write(bs, make([]byte, bs))
	// block 2: zeros, then one granule of data, then a granule of zeros,
	// then data up to the end of the block.
	l.write(2*bs, make([]byte, blockproto.ZeroGranule))
	l.write(2*bs+blockproto.ZeroGranule, randBytes(rng, blockproto.ZeroGranule))
	l.write(2*bs+2*blockproto.ZeroGranule, make([]byte, blockproto.ZeroGranule))
	if bs > 3*blockproto.ZeroGranule {
		l.write(2*bs+3*blockproto.ZeroGranule, randBytes(rng, bs-3*blockproto.ZeroGranule))
	}
	// block 3: a single non-zero byte in the middle of a hole.
	l.write(3*bs+bs/2+7, []byte{0x42})
	// block 4: data straddling into block 5.
	l.write(5*bs-100, randBytes(rng, 200))
	// last (partial) block: zeros written, then data in the partial granule.
	l.write(5*bs+blockproto.ZeroGranule, make([]byte, blockproto.ZeroGranule))
	l.write(size-50, randBytes(rng, 50))
	return l
}

func TestScanFileMetadata(t *testing.T) {
	for _, bs := range []int{blockproto.MinBlockSize, 16 << 10, blockproto.DefaultBlockSize, blockproto.MaxBlockSize} {
		t.Run(fmt.Sprintf("bs=%d", bs), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(bs), 1))
			l := mixedLayout(rng, bs)
			f := l.create(t, t.TempDir())
			want := l.want(bs)

			before := diskBlocks(t, f)
			got, err := ScanFile(f, uint32(bs), false)
			if err != nil {
				t.Fatal(err)
			}
			checkScan(t, got, want)
			if after := diskBlocks(t, f); after != before {
				t.Fatalf("ScanFile without punch changed the allocation: %d -> %d blocks", before, after)
			}

			got, err = ScanFile(f, uint32(bs), true)
			if err != nil {
				t.Fatal(err)
			}
			checkScan(t, got, want) // punching changes nothing a reader sees
			if after := diskBlocks(t, f); after >= before {
				t.Fatalf("punching explicit zeros did not free space: %d -> %d blocks", before, after)
			}
			back, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, l.content) {
				t.Fatal("content changed by punching holes")
			}
			// Every zero granule is now a hole: a second scan has nothing to punch
			// and the allocation is what the data needs.
			blocks := diskBlocks(t, f)
			if _, err := ScanFile(f, uint32(bs), true); err != nil {
				t.Fatal(err)
			}
			if again := diskBlocks(t, f); again != blocks {
				t.Fatalf("second punch changed the allocation: %d -> %d", blocks, again)
			}
		})
	}
}

func TestScanFileZeroDigests(t *testing.T) {
	const bs = 64 << 10
	size := 3*bs + 12345 // a partial last block
	l := newLayout(size)
	l.write(bs, make([]byte, bs)) // block 1: explicit zeros, block 0 and the tail: holes
	f := l.create(t, t.TempDir())
	got, err := ScanFile(f, bs, true)
	if err != nil {
		t.Fatal(err)
	}
	full := blockproto.ZeroDigest(bs)
	if want := sha256.Sum256(make([]byte, bs)); full != want {
		t.Fatalf("ZeroDigest(%d) = %x, want %x", bs, full, want)
	}
	for b := 0; b < 3; b++ {
		if d := got.Digests[b*blockproto.DigestSize : (b+1)*blockproto.DigestSize]; !bytes.Equal(d, full[:]) {
			t.Fatalf("block %d: digest %x, want the zero-block digest %x", b, d, full)
		}
	}
	tail := blockproto.ZeroDigest(12345)
	if want := sha256.Sum256(make([]byte, 12345)); tail != want {
		t.Fatalf("ZeroDigest(12345) wrong")
	}
	if d := got.Digests[3*blockproto.DigestSize:]; !bytes.Equal(d, tail[:]) {
		t.Fatalf("last partial block: digest %x, want %x", d, tail)
	}
	if got.NonZero != 0 {
		t.Fatalf("NonZero = %d for an all-zero file", got.NonZero)
	}
	for i, b := range got.ZeroMap {
		if i < len(got.ZeroMap)-1 && b != 0xff {
			t.Fatalf("zero map byte %d = %#x", i, b)
		}
	}
	granules := (size + blockproto.ZeroGranule - 1) / blockproto.ZeroGranule
	if last := got.ZeroMap[len(got.ZeroMap)-1]; last != byte(1<<(granules%8)-1) && !(granules%8 == 0 && last == 0xff) {
		t.Fatalf("last zero map byte %#x for %d granules", last, granules)
	}
	if diskBlocks(t, f) != 0 {
		t.Fatalf("an all-zero file still has %d blocks allocated after punching", diskBlocks(t, f))
	}
}

func TestScanFileEmptyAndTiny(t *testing.T) {
	for _, size := range []int{0, 1, blockproto.ZeroGranule - 1, blockproto.ZeroGranule, blockproto.ZeroGranule + 1} {
		l := newLayout(size)
		if size > 0 {
			l.write(size-1, []byte{9})
		}
		f := l.create(t, t.TempDir())
		got, err := ScanFile(f, blockproto.DefaultBlockSize, true)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		checkScan(t, got, l.want(blockproto.DefaultBlockSize))
	}
}

func TestScanFileRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range 20 {
		bs := blockproto.MinBlockSize << rng.IntN(5)
		size := rng.IntN(40 * bs)
		l := newLayout(size)
		for range rng.IntN(12) {
			if size == 0 {
				break
			}
			off := rng.IntN(size)
			n := 1 + rng.IntN(min(size-off, 3*blockproto.ZeroGranule))
			if rng.IntN(3) == 0 {
				l.write(off, make([]byte, n))
			} else {
				l.write(off, randBytes(rng, n))
			}
		}
		f := l.create(t, t.TempDir())
		for _, punch := range []bool{false, true} {
			got, err := ScanFile(f, uint32(bs), punch)
			if err != nil {
				t.Fatalf("case %d: %v", i, err)
			}
			checkScan(t, got, l.want(bs))
		}
	}
}

func TestPunchHoleShrinksFile(t *testing.T) {
	const size = 8 << 20
	rng := rand.New(rand.NewPCG(3, 4))
	l := newLayout(size)
	l.write(0, make([]byte, size)) // all explicitly written zeros
	data := randBytes(rng, 64<<10)
	l.write(1<<20, data)
	f := l.create(t, t.TempDir())
	before := diskBlocks(t, f)
	if before*512 < size {
		t.Fatalf("test file not allocated: %d blocks", before)
	}
	if _, err := ScanFile(f, blockproto.DefaultBlockSize, true); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			t.Skip("file system cannot punch holes")
		}
		t.Fatal(err)
	}
	after := diskBlocks(t, f)
	if after*512 > 2*int64(len(data)) {
		t.Fatalf("after punching: %d bytes allocated for %d bytes of data (was %d)", after*512, len(data), before*512)
	}
}

func TestDefaultPolicy(t *testing.T) {
	for k := range imagev1.FileKind_name {
		kind := imagev1.FileKind(k)
		want := imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE
		if kind == imagev1.FileKind_FILE_KIND_DISK {
			want = imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS
		}
		if got := DefaultPolicy(kind); got != want {
			t.Errorf("DefaultPolicy(%v) = %v, want %v", kind, got, want)
		}
	}
	if DefaultPolicy(imagev1.FileKind_FILE_KIND_MEMORY_STATE) != imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		t.Error("memory state must travel whole (GVFS §3.2.2)")
	}
}

// validManifest is a consistent golden manifest of two files.
func validManifest() *imagev1.Manifest {
	file := func(name string, size uint64, bs uint32) *imagev1.FileMeta {
		nb := (size + uint64(bs) - 1) / uint64(bs)
		return &imagev1.FileMeta{
			Name: name, Kind: imagev1.FileKind_FILE_KIND_DISK, Size: size, BlockSize: bs,
			Policy:       imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS,
			ZeroMap:      make([]byte, blockproto.ZeroMapLen(size)),
			BlockDigests: make([]byte, nb*blockproto.DigestSize),
			Sha256:       make([]byte, blockproto.DigestSize),
			ChunkSize:    blockproto.ChunkSize,
		}
	}
	return &imagev1.Manifest{
		Name:       "debian-12",
		Attributes: &imagev1.ImageAttributes{Arch: "x86_64", Vcpus: 2},
		Files:      []*imagev1.FileMeta{file("root.img", 1<<20+5, blockproto.DefaultBlockSize), file("mem", 0, blockproto.MinBlockSize)},
	}
}

func validDiskManifest() *imagev1.Manifest {
	return &imagev1.Manifest{
		Name: "disk-1", Writable: true, BaseImage: "debian-12", BaseFile: "root.img",
		Files: []*imagev1.FileMeta{{Name: "root.img", Size: 1 << 20, BlockSize: blockproto.DefaultBlockSize, ChunkSize: blockproto.ChunkSize}},
	}
}

func TestDecodeManifest(t *testing.T) {
	for _, m := range []*imagev1.Manifest{validManifest(), validDiskManifest()} {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeManifest(b)
		if err != nil {
			t.Fatalf("a consistent manifest was rejected: %v", err)
		}
		if !proto.Equal(got, m) {
			t.Fatal("decoded manifest differs")
		}
	}
}

func TestDecodeManifestRejects(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(m *imagev1.Manifest)
		disk   bool
	}{
		{"no name", func(m *imagev1.Manifest) { m.Name = "" }, false},
		{"name with slash", func(m *imagev1.Manifest) { m.Name = "../etc" }, false},
		{"no files", func(m *imagev1.Manifest) { m.Files = nil }, false},
		{"kind out of range", func(m *imagev1.Manifest) { m.Files[0].Kind = 99 }, false},
		{"policy out of range", func(m *imagev1.Manifest) { m.Files[0].Policy = 99 }, false},
		{"too many files", func(m *imagev1.Manifest) {
			for i := range imagev1.MaxFiles {
				f := proto.Clone(m.Files[1]).(*imagev1.FileMeta)
				f.Name = fmt.Sprintf("f%d", i)
				m.Files = append(m.Files, f)
			}
		}, false},
		{"bad file name", func(m *imagev1.Manifest) { m.Files[0].Name = "a/b" }, false},
		{"file twice", func(m *imagev1.Manifest) { m.Files[1].Name = m.Files[0].Name }, false},
		{"block size 0", func(m *imagev1.Manifest) { m.Files[0].BlockSize = 0 }, false},
		{"block size not a power of two", func(m *imagev1.Manifest) { m.Files[0].BlockSize = 48 << 10 }, false},
		{"block size too small", func(m *imagev1.Manifest) { m.Files[0].BlockSize = 512 }, false},
		{"block size too large", func(m *imagev1.Manifest) { m.Files[0].BlockSize = 2 << 20 }, false},
		{"size too large", func(m *imagev1.Manifest) { m.Files[0].Size = imagev1.MaxFileSize + 1 }, false},
		{"digests short", func(m *imagev1.Manifest) { m.Files[0].BlockDigests = m.Files[0].BlockDigests[:blockproto.DigestSize] }, false},
		{"digests long", func(m *imagev1.Manifest) {
			m.Files[0].BlockDigests = append(m.Files[0].BlockDigests, make([]byte, blockproto.DigestSize)...)
		}, false},
		{"digests ragged", func(m *imagev1.Manifest) { m.Files[0].BlockDigests = m.Files[0].BlockDigests[1:] }, false},
		{"size grew", func(m *imagev1.Manifest) { m.Files[0].Size += blockproto.DefaultBlockSize }, false},
		{"zero map short", func(m *imagev1.Manifest) { m.Files[0].ZeroMap = m.Files[0].ZeroMap[1:] }, false},
		{"zero map long", func(m *imagev1.Manifest) { m.Files[0].ZeroMap = append(m.Files[0].ZeroMap, 0) }, false},
		{"no sha256", func(m *imagev1.Manifest) { m.Files[0].Sha256 = nil }, false},
		{"short sha256", func(m *imagev1.Manifest) { m.Files[0].Sha256 = m.Files[0].Sha256[:31] }, false},
		{"chunk size 0", func(m *imagev1.Manifest) { m.Files[0].ChunkSize = 0 }, false},
		{"chunk size too large", func(m *imagev1.Manifest) { m.Files[0].ChunkSize = blockproto.ChunkSize + 1 }, false},
		{"disk with two files", func(m *imagev1.Manifest) {
			m.Files = append(m.Files, &imagev1.FileMeta{Name: "x", BlockSize: blockproto.DefaultBlockSize, ChunkSize: blockproto.ChunkSize})
		}, true},
		{"disk without base", func(m *imagev1.Manifest) { m.BaseImage = "" }, true},
		{"disk with bad base", func(m *imagev1.Manifest) { m.BaseImage = "a/../b" }, true},
		{"disk with bad block size", func(m *imagev1.Manifest) { m.Files[0].BlockSize = 3 }, true},
		{"disk chunk size 0", func(m *imagev1.Manifest) { m.Files[0].ChunkSize = 0 }, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := validManifest()
			if c.disk {
				m = validDiskManifest()
			}
			c.mutate(m)
			b, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := DecodeManifest(b); err == nil {
				t.Fatal("an inconsistent manifest was accepted")
			}
		})
	}
	for _, garbage := range [][]byte{{0xff}, []byte("not a manifest"), {0x0a, 0x05, 'a'}} {
		if _, err := DecodeManifest(garbage); err == nil {
			t.Errorf("DecodeManifest(%q) accepted garbage", garbage)
		}
	}
	if _, err := DecodeManifest(nil); err == nil {
		t.Error("DecodeManifest(nil) accepted an empty manifest")
	}
}
