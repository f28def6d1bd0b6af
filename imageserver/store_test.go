package imageserver

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

func openStore(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := OpenStore(dir, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	return s
}

type testFile struct {
	name   string
	kind   imagev1.FileKind
	policy imagev1.TransferPolicy
	bs     uint32
	data   []byte
	// writeZeros sends all-zero pieces too (as a careless publisher would), so
	// the store has to punch them out.
	writeZeros bool
}

func header(name string, attrs *imagev1.ImageAttributes, files ...testFile) *imagev1.PublishHeader {
	h := &imagev1.PublishHeader{Name: name, Attributes: attrs}
	for _, f := range files {
		h.Files = append(h.Files, &imagev1.PublishFile{Name: f.name, Kind: f.kind, Size: uint64(len(f.data)), Policy: f.policy, BlockSize: f.bs})
	}
	return h
}

// upload sends the files' data in 256 KiB pieces, in reverse order (the
// protocol allows any order) and skipping zero pieces unless asked.
func upload(t *testing.T, u *Upload, files ...testFile) [][]byte {
	t.Helper()
	const piece = 256 << 10
	var sums [][]byte
	for i, f := range files {
		for off := (len(f.data) - 1) / piece * piece; off >= 0; off -= piece {
			p := f.data[off:min(off+piece, len(f.data))]
			if blockproto.IsZero(p) && !f.writeZeros {
				continue
			}
			if err := u.Write(uint32(i), uint64(off), p); err != nil {
				t.Fatalf("write %s at %d: %v", f.name, off, err)
			}
		}
		sum := sha256.Sum256(f.data)
		sums = append(sums, sum[:])
	}
	return sums
}

func publish(t *testing.T, s *Store, name string, attrs *imagev1.ImageAttributes, files ...testFile) *imagev1.Manifest {
	t.Helper()
	u, err := s.BeginPublish(header(name, attrs, files...))
	if err != nil {
		t.Fatalf("begin publish %s: %v", name, err)
	}
	m, err := u.Commit(upload(t, u, files...))
	if err != nil {
		t.Fatalf("commit %s: %v", name, err)
	}
	return m
}

// sparseData is size bytes, zero except for random runs covering about a
// quarter of it.
func sparseData(rng *rand.Rand, size int) []byte {
	b := make([]byte, size)
	for range max(1, size/(64<<10)) {
		off := rng.IntN(size)
		n := min(size-off, 1+rng.IntN(32<<10))
		copy(b[off:], randBytes(rng, n))
	}
	return b
}

func wantErr(t *testing.T, err, sentinel error) {
	t.Helper()
	if !errors.Is(err, sentinel) {
		t.Fatalf("error %v, want %v", err, sentinel)
	}
}

func tmpEntries(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.tmpDir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// readAll reads every block of a file through ReadBlock and checks it against
// want, the digests and the zero flags.
func readAll(t *testing.T, s *Store, image, file string, want []byte) {
	t.Helper()
	h, err := s.OpenFile(image, file)
	if err != nil {
		t.Fatal(err)
	}
	meta := h.Meta()
	bs := int(meta.BlockSize)
	buf := make([]byte, blockproto.MaxBlockSize)
	for b := 0; b*bs < len(want); b++ {
		exp := want[b*bs : min((b+1)*bs, len(want))]
		blk, err := h.ReadBlock(uint64(b), buf)
		if err != nil {
			t.Fatalf("block %d: %v", b, err)
		}
		if int(blk.Length) != len(exp) {
			t.Fatalf("block %d: length %d, want %d", b, blk.Length, len(exp))
		}
		if blk.Zero {
			if blk.Data != nil || !blockproto.IsZero(exp) {
				t.Fatalf("block %d: reported zero (data %d bytes) but is not", b, len(blk.Data))
			}
		} else if !bytes.Equal(blk.Data, exp) {
			t.Fatalf("block %d: data differs", b)
		}
		if sum := sha256.Sum256(exp); !bytes.Equal(blk.Digest, sum[:]) {
			t.Fatalf("block %d: digest %x, want %x", b, blk.Digest, sum)
		}
		if len(meta.BlockDigests) > 0 && !bytes.Equal(meta.BlockDigests[b*blockproto.DigestSize:(b+1)*blockproto.DigestSize], blk.Digest) {
			t.Fatalf("block %d: digest differs from the manifest", b)
		}
	}
	_, err = h.ReadBlock(uint64((len(want)+bs-1)/bs), buf)
	wantErr(t, err, errdefs.ErrOutOfRange)
}

func TestPublishAndRead(t *testing.T) {
	s := openStore(t, t.TempDir())
	rng := rand.New(rand.NewPCG(1, 1))
	disk := testFile{name: "root.img", kind: imagev1.FileKind_FILE_KIND_DISK, data: sparseData(rng, 4<<20+1000)}
	mem := testFile{name: "mem", kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, bs: 16 << 10, data: sparseData(rng, 1<<20), writeZeros: true}
	cfg := testFile{name: "vm.conf", kind: imagev1.FileKind_FILE_KIND_CONFIG, policy: imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS, data: []byte("memory=512\n")}
	attrs := &imagev1.ImageAttributes{Arch: "x86_64", Os: "debian-12", Vcpus: 2, MemoryMib: 512, Labels: map[string]string{"tier": "gold"}}
	m := publish(t, s, "debian-12", attrs, disk, mem, cfg)

	if m.Name != "debian-12" || m.Writable || m.Generation != 0 || m.CreatedUnixNano == 0 || !proto.Equal(m.Attributes, attrs) {
		t.Fatalf("manifest header: %v", m)
	}
	wantPolicy := []imagev1.TransferPolicy{
		imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS,     // disk by default
		imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE, // memory state by default
		imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS,     // chosen by the publisher
	}
	for i, f := range []testFile{disk, mem, cfg} {
		fm := m.Files[i]
		wantBS := f.bs
		if wantBS == 0 {
			wantBS = blockproto.DefaultBlockSize
		}
		sum := sha256.Sum256(f.data)
		if fm.Name != f.name || fm.Kind != f.kind || fm.Size != uint64(len(f.data)) || fm.BlockSize != wantBS ||
			fm.Policy != wantPolicy[i] || fm.ChunkSize != blockproto.ChunkSize || !bytes.Equal(fm.Sha256, sum[:]) {
			t.Fatalf("file %d meta: %v", i, fm)
		}
		l := &layout{size: len(f.data), content: f.data}
		want := l.want(int(wantBS))
		if !bytes.Equal(fm.ZeroMap, want.ZeroMap) || !bytes.Equal(fm.BlockDigests, want.Digests) || fm.NonzeroBytes != want.NonZero {
			t.Fatalf("file %s: per-block meta-data differs from the content", f.name)
		}
		readAll(t, s, "debian-12", f.name, f.data)
	}

	// The stored memory file was sent with its zeros written out; the store
	// keeps only the non-zero granules allocated.
	f, err := os.Open(filepath.Join(s.imagesDir(), "debian-12", filesDir, "mem"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if alloc := uint64(diskBlocks(t, f)) * 512; alloc > m.Files[1].NonzeroBytes+64<<10 {
		t.Fatalf("stored memory file has %d bytes allocated for %d non-zero bytes: zeros were not punched", alloc, m.Files[1].NonzeroBytes)
	}

	full, err := s.Get("debian-12", imagev1.View_VIEW_FULL)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(full, m) {
		t.Fatal("Get(FULL) differs from the published manifest")
	}
	basic, err := s.Get("debian-12", imagev1.View_VIEW_BASIC)
	if err != nil {
		t.Fatal(err)
	}
	for _, fm := range basic.Files {
		if fm.ZeroMap != nil || fm.BlockDigests != nil || len(fm.Sha256) != blockproto.DigestSize {
			t.Fatalf("BASIC view of %s carries per-block meta-data", fm.Name)
		}
	}
	if full.Files[0].ZeroMap == nil {
		t.Fatal("BASIC view modified the stored manifest")
	}
	if _, err := s.Get("nope", imagev1.View_VIEW_FULL); !errdefs.IsNotFound(err) {
		t.Fatalf("Get(unknown): %v", err)
	}
	if _, err := s.OpenFile("debian-12", "nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("OpenFile(unknown file): %v", err)
	}

	// Everything survives a restart.
	s2 := openStore(t, s.dir)
	m2, err := s2.Get("debian-12", imagev1.View_VIEW_FULL)
	if err != nil || !proto.Equal(m2, m) {
		t.Fatalf("after reopening: %v", err)
	}
	readAll(t, s2, "debian-12", "root.img", disk.data)
}

func TestReadRange(t *testing.T) {
	s := openStore(t, t.TempDir())
	rng := rand.New(rand.NewPCG(2, 2))
	data := sparseData(rng, 3<<20+777)
	clear(data[1<<20 : 2<<20]) // one whole zero chunk
	publish(t, s, "img", nil, testFile{name: "mem", kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, data: data})
	h, err := s.OpenFile("img", "mem")
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += blockproto.ChunkSize {
		n := min(blockproto.ChunkSize, len(data)-off)
		buf := bytes.Repeat([]byte{0xee}, n)
		zero, err := h.ReadRange(uint64(off), buf)
		if err != nil {
			t.Fatal(err)
		}
		if zero != blockproto.IsZero(data[off:off+n]) {
			t.Fatalf("chunk at %d: zero=%v", off, zero)
		}
		if !zero && !bytes.Equal(buf, data[off:off+n]) {
			t.Fatalf("chunk at %d differs", off)
		}
	}
	_, err = h.ReadRange(uint64(len(data)-10), make([]byte, 11))
	wantErr(t, err, errdefs.ErrOutOfRange)
}

func TestPublishAbortLeavesNothing(t *testing.T) {
	s := openStore(t, t.TempDir())
	f := testFile{name: "root.img", kind: imagev1.FileKind_FILE_KIND_DISK, data: randBytes(rand.New(rand.NewPCG(3, 3)), 300<<10)}
	u, err := s.BeginPublish(header("img", nil, f))
	if err != nil {
		t.Fatal(err)
	}
	upload(t, u, f)
	// In progress: invisible, and the name is taken.
	if _, err := s.Get("img", imagev1.View_VIEW_BASIC); !errdefs.IsNotFound(err) {
		t.Fatalf("Get during upload: %v", err)
	}
	if len(s.List(&imagev1.ListImagesRequest{})) != 0 {
		t.Fatal("an upload in progress is listed")
	}
	if _, err := s.BeginPublish(header("img", nil, f)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second upload of the same name: %v", err)
	}
	if _, err := s.CreateDisk("img", "x", "", nil); !errdefs.IsNotFound(err) {
		t.Fatalf("CreateDisk from an image being uploaded: %v", err)
	}
	u.Abort()
	u.Abort() // twice is fine
	if left := tmpEntries(t, s); len(left) != 0 {
		t.Fatalf("tmp holds %v after Abort", left)
	}
	if _, err := s.Get("img", imagev1.View_VIEW_BASIC); !errdefs.IsNotFound(err) {
		t.Fatalf("Get after abort: %v", err)
	}
	publish(t, s, "img", nil, f) // the name is free again
	if _, err := s.BeginPublish(header("img", nil, f)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("upload of an existing name: %v", err)
	}
}

func TestPublishBadChecksum(t *testing.T) {
	s := openStore(t, t.TempDir())
	f := testFile{name: "root.img", kind: imagev1.FileKind_FILE_KIND_DISK, data: randBytes(rand.New(rand.NewPCG(4, 4)), 100<<10)}
	u, err := s.BeginPublish(header("img", nil, f))
	if err != nil {
		t.Fatal(err)
	}
	sums := upload(t, u, f)
	sums[0][0] ^= 1
	_, err = u.Commit(sums)
	wantErr(t, err, errdefs.ErrDataLoss)
	if _, err := s.Get("img", imagev1.View_VIEW_BASIC); !errdefs.IsNotFound(err) {
		t.Fatalf("a corrupt upload is visible: %v", err)
	}
	if left := tmpEntries(t, s); len(left) != 0 {
		t.Fatalf("tmp holds %v", left)
	}
	// A missing piece is caught the same way.
	u, err = s.BeginPublish(header("img", nil, f))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(f.data)
	if err := u.Write(0, 0, f.data[:50<<10]); err != nil {
		t.Fatal(err)
	}
	_, err = u.Commit([][]byte{sum[:]})
	wantErr(t, err, errdefs.ErrDataLoss)
	// Wrong number of checksums.
	u, err = s.BeginPublish(header("img", nil, f))
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.Commit(nil)
	wantErr(t, err, errdefs.ErrInvalidArgument)
	publish(t, s, "img", nil, f)
}

func TestUploadWriteBounds(t *testing.T) {
	s := openStore(t, t.TempDir())
	u, err := s.BeginPublish(header("img", nil, testFile{name: "a", data: make([]byte, 1000)}))
	if err != nil {
		t.Fatal(err)
	}
	defer u.Abort()
	wantErr(t, u.Write(1, 0, []byte{1}), errdefs.ErrInvalidArgument)
	wantErr(t, u.Write(0, 999, []byte{1, 2}), errdefs.ErrOutOfRange)
	wantErr(t, u.Write(0, 1<<62, []byte{1}), errdefs.ErrOutOfRange)
	if err := u.Write(0, 999, []byte{1}); err != nil {
		t.Fatal(err)
	}
	if u.Received() != 1 {
		t.Fatalf("received %d", u.Received())
	}
}

func TestOpenStoreDropsUnfinishedUploads(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	f := testFile{name: "a", data: randBytes(rand.New(rand.NewPCG(5, 5)), 10000)}
	u, err := s.BeginPublish(header("img", nil, f))
	if err != nil {
		t.Fatal(err)
	}
	upload(t, u, f)
	// The process dies here: no Commit, no Abort.
	s2 := openStore(t, dir)
	if left := tmpEntries(t, s2); len(left) != 0 {
		t.Fatalf("tmp holds %v after a restart", left)
	}
	if _, err := s2.Get("img", imagev1.View_VIEW_BASIC); !errdefs.IsNotFound(err) {
		t.Fatalf("an unfinished upload is visible after a restart: %v", err)
	}
	publish(t, s2, "img", nil, f)
}

func TestDeleteImage(t *testing.T) {
	s := openStore(t, t.TempDir())
	f := testFile{name: "a", data: []byte("hello")}
	publish(t, s, "img", nil, f)
	h, err := s.OpenFile("img", "a")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("img"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("img", imagev1.View_VIEW_BASIC); !errdefs.IsNotFound(err) {
		t.Fatalf("Get after delete: %v", err)
	}
	wantErr(t, s.Delete("img"), errdefs.ErrNotFound)
	if _, err := os.Stat(filepath.Join(s.imagesDir(), "img")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("image directory still there: %v", err)
	}
	// A handle opened before the delete is stale at once, and reading through
	// it answers NotFound once the files are closed, never an internal error.
	if s.current(h) {
		t.Fatal("a handle of a deleted image is current")
	}
	buf := make([]byte, blockproto.MaxBlockSize)
	for deadline := time.Now().Add(5 * time.Second); ; {
		_, err := h.ReadBlock(0, buf)
		if errdefs.IsNotFound(err) {
			break
		}
		if err != nil {
			t.Fatalf("read of a deleted image: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatal("the deleted image's files were never closed")
		}
		time.Sleep(time.Millisecond)
	}
	publish(t, s, "img", nil, f)
	h2, err := s.OpenFile("img", "a")
	if err != nil {
		t.Fatal(err)
	}
	if s.current(h) || !s.current(h2) {
		t.Fatal("after publishing the name again, the old handle is current or the new one is not")
	}
	if got := openStore(t, s.dir).List(&imagev1.ListImagesRequest{}); len(got) != 1 {
		t.Fatalf("after reopening: %d images", len(got))
	}
}

func TestList(t *testing.T) {
	s := openStore(t, t.TempDir())
	one := testFile{name: "root", kind: imagev1.FileKind_FILE_KIND_DISK, data: []byte("x")}
	publish(t, s, "a-x86", &imagev1.ImageAttributes{Arch: "x86_64", Os: "debian-12", Vcpus: 2, MemoryMib: 1024, Labels: map[string]string{"t": "1"}}, one)
	publish(t, s, "b-arm", &imagev1.ImageAttributes{Arch: "aarch64", Os: "debian-12", Vcpus: 4, MemoryMib: 512}, one)
	publish(t, s, "c-bare", nil, one)
	if _, err := s.CreateDisk("d-disk", "a-x86", "", map[string]string{"owner": "me"}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		q    *imagev1.ListImagesRequest
		want []string
	}{
		{&imagev1.ListImagesRequest{}, []string{"a-x86", "b-arm", "c-bare", "d-disk"}},
		{&imagev1.ListImagesRequest{Arch: "x86_64"}, []string{"a-x86", "d-disk"}},
		{&imagev1.ListImagesRequest{Os: "debian-12", MinVcpus: 3}, []string{"b-arm"}},
		{&imagev1.ListImagesRequest{MinMemoryMib: 1000}, []string{"a-x86", "d-disk"}},
		{&imagev1.ListImagesRequest{Labels: map[string]string{"t": "1"}}, []string{"a-x86"}},
		{&imagev1.ListImagesRequest{Labels: map[string]string{"owner": "me"}}, []string{"d-disk"}},
		{&imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_GOLDEN}, []string{"a-x86", "b-arm", "c-bare"}},
		{&imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_WRITABLE}, []string{"d-disk"}},
		{&imagev1.ListImagesRequest{NamePrefix: "b"}, []string{"b-arm"}},
		{&imagev1.ListImagesRequest{Arch: "riscv64"}, nil},
	} {
		var got []string
		for _, m := range s.List(c.q) {
			got = append(got, m.Name)
			if m.Files[0].ZeroMap != nil || m.Files[0].BlockDigests != nil {
				t.Fatalf("List returned per-block meta-data for %s", m.Name)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("List(%v) = %v, want %v", c.q, got, c.want)
		}
	}
}

func TestProfile(t *testing.T) {
	s := openStore(t, t.TempDir())
	publish(t, s, "img", nil,
		testFile{name: "root", kind: imagev1.FileKind_FILE_KIND_DISK, data: make([]byte, 3*blockproto.DefaultBlockSize)},
		testFile{name: "kernel", kind: imagev1.FileKind_FILE_KIND_KERNEL, data: []byte("k")})
	got, err := s.GetProfile("img")
	if err != nil || len(got) != 0 {
		t.Fatalf("no profile yet: %v %v", got, err)
	}
	want := []*imagev1.ProfileEntry{{File: "kernel", Block: 0}, {File: "root", Block: 2}, {File: "root", Block: 0}}
	if err := s.PutProfile("img", want); err != nil {
		t.Fatal(err)
	}
	got, err = s.GetProfile("img")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("profile of %d entries, want %d", len(got), len(want))
	}
	for i := range want {
		if !proto.Equal(got[i], want[i]) {
			t.Fatalf("entry %d: %v, want %v", i, got[i], want[i])
		}
	}
	wantErr(t, s.PutProfile("img", []*imagev1.ProfileEntry{{File: "nope"}}), errdefs.ErrInvalidArgument)
	wantErr(t, s.PutProfile("img", []*imagev1.ProfileEntry{{File: "root", Block: 3}}), errdefs.ErrOutOfRange)
	wantErr(t, s.PutProfile("nope", nil), errdefs.ErrNotFound)
	if _, err := s.GetProfile("nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("GetProfile(unknown): %v", err)
	}
	// A rejected profile left the stored one alone.
	if got, _ := s.GetProfile("img"); len(got) != len(want) {
		t.Fatalf("profile changed by a rejected put: %v", got)
	}
}

// goldenWithDisk publishes a golden image with one disk file (the last block
// partial) and creates a persistent disk from it.
func goldenWithDisk(t *testing.T, s *Store) (golden []byte) {
	t.Helper()
	golden = sparseData(rand.New(rand.NewPCG(6, 6)), 10*blockproto.DefaultBlockSize+1234)
	publish(t, s, "golden", &imagev1.ImageAttributes{Arch: "x86_64", Labels: map[string]string{"a": "b"}},
		testFile{name: "root.img", kind: imagev1.FileKind_FILE_KIND_DISK, data: golden},
		testFile{name: "mem", kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, data: []byte("state")})
	m, err := s.CreateDisk("disk", "golden", "", map[string]string{"owner": "alice"})
	if err != nil {
		t.Fatal(err)
	}
	if !m.Writable || m.BaseImage != "golden" || m.BaseFile != "root.img" || m.Generation != 0 ||
		m.Attributes.Parent != "golden" || m.Attributes.Arch != "x86_64" || m.Attributes.Labels["owner"] != "alice" ||
		len(m.Files) != 1 || m.Files[0].Size != uint64(len(golden)) || m.Files[0].Policy != imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS {
		t.Fatalf("disk manifest: %v", m)
	}
	return golden
}

// writeBatch commits writes (block -> data) and returns the generation.
func writeBatch(t *testing.T, s *Store, disk string, expect uint64, writes map[uint64][]byte) uint64 {
	t.Helper()
	b, err := s.BeginWrite(disk, expect)
	if err != nil {
		t.Fatal(err)
	}
	for blk, data := range writes {
		if err := b.Add(blk, data); err != nil {
			t.Fatal(err)
		}
	}
	gen, n, err := b.Commit()
	if err != nil {
		t.Fatal(err)
	}
	if n != uint64(len(writes)) {
		t.Fatalf("%d blocks written, want %d", n, len(writes))
	}
	return gen
}

func applyWrites(content []byte, bs int, writes map[uint64][]byte) {
	for blk, data := range writes {
		copy(content[int(blk)*bs:], data)
	}
}

func TestDiskWrites(t *testing.T) {
	s := openStore(t, t.TempDir())
	golden := goldenWithDisk(t, s)
	const bs = blockproto.DefaultBlockSize
	want := bytes.Clone(golden)
	readAll(t, s, "disk", "root.img", want) // reads from the golden file

	rng := rand.New(rand.NewPCG(8, 8))
	lastLen := len(golden) - 10*bs
	w1 := map[uint64][]byte{1: randBytes(rng, bs), 4: make([]byte, bs), 10: randBytes(rng, lastLen)}
	if gen := writeBatch(t, s, "disk", 0, w1); gen != 1 {
		t.Fatalf("generation %d after the first batch", gen)
	}
	applyWrites(want, bs, w1)
	readAll(t, s, "disk", "root.img", want)
	readAll(t, s, "golden", "root.img", golden) // golden unchanged
	m, _ := s.Get("disk", imagev1.View_VIEW_BASIC)
	if m.Generation != 1 {
		t.Fatalf("manifest generation %d", m.Generation)
	}

	// A written zero block is data on a disk (it overrides the golden block)
	// and never reported as a hole.
	h, _ := s.OpenFile("disk", "root.img")
	blk, err := h.ReadBlock(4, make([]byte, bs))
	if err != nil || blk.Zero || !blockproto.IsZero(blk.Data) {
		t.Fatalf("written zero block: %+v %v", blk.Zero, err)
	}

	// Stale writer.
	b, err := s.BeginWrite("disk", 5)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Add(2, randBytes(rng, bs)); err != nil {
		t.Fatal(err)
	}
	_, _, err = b.Commit()
	wantErr(t, err, errdefs.ErrFailedPrecondition)
	readAll(t, s, "disk", "root.img", want)

	// An aborted batch changes nothing.
	b, err = s.BeginWrite("disk", 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Add(3, randBytes(rng, bs)); err != nil {
		t.Fatal(err)
	}
	b.Abort()
	b.Abort()
	readAll(t, s, "disk", "root.img", want)
	if ents, _ := os.ReadDir(filepath.Join(s.imagesDir(), "disk", journalDir)); len(ents) != 0 {
		t.Fatalf("journal holds %d files after an abort", len(ents))
	}

	// Bad writes.
	b, err = s.BeginWrite("disk", 0)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, b.Add(11, make([]byte, bs)), errdefs.ErrOutOfRange)
	wantErr(t, b.Add(0, make([]byte, bs-1)), errdefs.ErrInvalidArgument)
	wantErr(t, b.Add(10, make([]byte, bs)), errdefs.ErrInvalidArgument) // the last block is short
	b.Abort()

	// Golden images are immutable; disks are not bases.
	_, err = s.BeginWrite("golden", 0)
	wantErr(t, err, errdefs.ErrFailedPrecondition)
	_, err = s.BeginWrite("nope", 0)
	wantErr(t, err, errdefs.ErrNotFound)
	_, err = s.CreateDisk("disk2", "disk", "", nil)
	wantErr(t, err, errdefs.ErrFailedPrecondition)
	_, err = s.CreateDisk("disk", "golden", "", nil)
	wantErr(t, err, errdefs.ErrAlreadyExists)
	_, err = s.CreateDisk("disk2", "golden", "nope", nil)
	wantErr(t, err, errdefs.ErrNotFound)
	_, err = s.CreateDisk("disk2", "nope", "", nil)
	wantErr(t, err, errdefs.ErrNotFound)
	if _, err := s.CreateDisk("disk-of-mem", "golden", "mem", nil); err != nil {
		t.Fatalf("a disk over a named file: %v", err)
	}

	// The golden image is pinned by its disks.
	wantErr(t, s.Delete("golden"), errdefs.ErrFailedPrecondition)
	readAll(t, s, "golden", "root.img", golden)

	w2 := map[uint64][]byte{1: randBytes(rng, bs), 0: randBytes(rng, bs)}
	if gen := writeBatch(t, s, "disk", 1, w2); gen != 2 {
		t.Fatalf("generation %d", gen)
	}
	applyWrites(want, bs, w2)

	// Everything survives reopening the store.
	s2 := openStore(t, s.dir)
	readAll(t, s2, "disk", "root.img", want)
	readAll(t, s2, "golden", "root.img", golden)
	if m, _ := s2.Get("disk", imagev1.View_VIEW_BASIC); m.Generation != 2 {
		t.Fatalf("generation %d after reopening", m.Generation)
	}
	if err := s2.Delete("disk"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, s2.Delete("golden"), errdefs.ErrFailedPrecondition) // disk-of-mem
	if err := s2.Delete("disk-of-mem"); err != nil {
		t.Fatal(err)
	}
	if err := s2.Delete("golden"); err != nil {
		t.Fatal(err)
	}
}

func TestCreateDiskNeedsOneDiskFile(t *testing.T) {
	s := openStore(t, t.TempDir())
	d := testFile{kind: imagev1.FileKind_FILE_KIND_DISK, data: []byte("x")}
	d1, d2 := d, d
	d1.name, d2.name = "a", "b"
	publish(t, s, "two", nil, d1, d2)
	publish(t, s, "none", nil, testFile{name: "mem", kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE, data: []byte("x")})
	for _, src := range []string{"two", "none"} {
		_, err := s.CreateDisk("disk", src, "", nil)
		wantErr(t, err, errdefs.ErrInvalidArgument)
	}
	if _, err := s.CreateDisk("disk", "two", "b", nil); err != nil {
		t.Fatal(err)
	}
	if left := tmpEntries(t, s); len(left) != 0 {
		t.Fatalf("tmp holds %v", left)
	}
}

// journal encodes a committed WriteBlocks batch in the documented format:
// records [block u64][len u32][crc32c u32][data], then [^0 u64][count u32][0 u32].
func journal(writes []journalRec) []byte {
	var b []byte
	for _, w := range writes {
		b = binary.LittleEndian.AppendUint64(b, w.block)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(w.data)))
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(w.data, crc32.MakeTable(crc32.Castagnoli)))
		b = append(b, w.data...)
	}
	b = binary.LittleEndian.AppendUint64(b, ^uint64(0))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(writes)))
	return binary.LittleEndian.AppendUint32(b, 0)
}

func TestJournalFormatMatchesBatch(t *testing.T) {
	s := openStore(t, t.TempDir())
	goldenWithDisk(t, s)
	rng := rand.New(rand.NewPCG(9, 9))
	recs := []journalRec{{3, randBytes(rng, blockproto.DefaultBlockSize)}, {0, randBytes(rng, blockproto.DefaultBlockSize)}}
	b, err := s.BeginWrite("disk", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Abort()
	for _, r := range recs {
		if err := b.Add(r.block, r.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.w.Flush(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(b.path)
	if err != nil {
		t.Fatal(err)
	}
	want := journal(recs)
	if !bytes.Equal(got, want[:len(want)-16]) {
		t.Fatal("Batch writes records in a format other than the documented one")
	}
}

// TestJournalReplay simulates crashes around the commit point of a batch: a
// committed journal (renamed to its generation) whose data never reached the
// data file must be applied at the next start; an uncommitted one (*.tmp)
// and one already applied must not.
func TestJournalReplay(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	golden := goldenWithDisk(t, s)
	const bs = blockproto.DefaultBlockSize
	rng := rand.New(rand.NewPCG(10, 10))
	want := bytes.Clone(golden)
	w1 := map[uint64][]byte{2: randBytes(rng, bs)}
	writeBatch(t, s, "disk", 0, w1) // generation 1, applied
	applyWrites(want, bs, w1)

	jdir := filepath.Join(dir, "images", "disk", journalDir)
	put := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(jdir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Generation 1 again: applied before the crash, not yet removed. Its
	// content differs so a wrong replay would show.
	put("1", journal([]journalRec{{2, randBytes(rng, bs)}}))
	// Generations 2 and 3: committed, not applied. 3 overwrites a block of 2.
	r2 := []journalRec{{5, randBytes(rng, bs)}, {10, randBytes(rng, len(golden)-10*bs)}}
	r3 := []journalRec{{5, randBytes(rng, bs)}, {7, make([]byte, bs)}}
	put("3", journal(r3))
	put("2", journal(r2))
	// An uncommitted batch.
	put("abc.tmp", journal([]journalRec{{0, randBytes(rng, bs)}})[:100])
	for _, r := range append(r2, r3...) {
		copy(want[int(r.block)*bs:], r.data)
	}

	s2 := openStore(t, dir) // the restart
	readAll(t, s2, "disk", "root.img", want)
	readAll(t, s2, "golden", "root.img", golden)
	m, err := s2.Get("disk", imagev1.View_VIEW_BASIC)
	if err != nil {
		t.Fatal(err)
	}
	if m.Generation != 3 {
		t.Fatalf("generation %d after replay, want 3", m.Generation)
	}
	if ents, _ := os.ReadDir(jdir); len(ents) != 0 {
		t.Fatalf("journal holds %d files after replay", len(ents))
	}
	// Replay is durable: a second restart sees the same.
	s3 := openStore(t, dir)
	readAll(t, s3, "disk", "root.img", want)
	if gen := writeBatch(t, s3, "disk", 3, map[uint64][]byte{0: randBytes(rng, bs)}); gen != 4 {
		t.Fatalf("generation %d after replay and a new batch", gen)
	}
}

func TestJournalReplayRejectsDamage(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 11))
	good := journal([]journalRec{{1, randBytes(rng, blockproto.DefaultBlockSize)}})
	flip := bytes.Clone(good)
	flip[20] ^= 1
	for name, b := range map[string][]byte{
		"truncated":  good[:len(good)-20],
		"bad crc":    flip,
		"bad count":  append(bytes.Clone(good[:len(good)-8]), 5, 0, 0, 0, 0, 0, 0, 0),
		"past end":   journal([]journalRec{{11, randBytes(rng, 10)}}),
		"too long":   journal([]journalRec{{1, randBytes(rng, blockproto.DefaultBlockSize+1)}}),
		"no trailer": good[:len(good)-16],
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			goldenWithDisk(t, s)
			jdir := filepath.Join(dir, "images", "disk", journalDir)
			if err := os.WriteFile(filepath.Join(jdir, strconv.Itoa(1)), b, 0o644); err != nil {
				t.Fatal(err)
			}
			// A committed batch that cannot be read is reported, not skipped.
			if _, err := OpenStore(dir, zaptest.NewLogger(t)); err == nil {
				t.Fatal("a damaged committed journal was accepted")
			}
		})
	}
}

func TestDiskConcurrentReadWrite(t *testing.T) {
	s := openStore(t, t.TempDir())
	golden := goldenWithDisk(t, s)
	const bs = blockproto.DefaultBlockSize
	nb := uint64((len(golden) + bs - 1) / bs)
	h, err := s.OpenFile("disk", "root.img")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, bs)
			rng := rand.New(rand.NewPCG(uint64(g), 0))
			for {
				select {
				case <-stop:
					return
				default:
				}
				blk := rng.Uint64N(nb)
				r, err := h.ReadBlock(blk, buf)
				if err != nil {
					t.Error(err)
					return
				}
				// Writers only write blocks filled with one byte value, so a
				// torn read would show.
				if blk < nb-1 && !r.Zero && !bytes.Equal(r.Data, golden[blk*bs:(blk+1)*bs]) && bytes.Count(r.Data, r.Data[:1]) != len(r.Data) {
					t.Errorf("block %d: torn read", blk)
					return
				}
			}
		}()
	}
	for i := range 20 {
		w := map[uint64][]byte{uint64(i) % (nb - 1): bytes.Repeat([]byte{byte(i + 1)}, bs)}
		writeBatch(t, s, "disk", 0, w)
	}
	close(stop)
	wg.Wait()
}
