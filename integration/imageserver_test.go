package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

const bs = blockproto.DefaultBlockSize

var zeros = make([]byte, blockproto.MaxBlockSize)

// isZero is imageserver.IsZero in assembly (bytes.Equal): the race detector
// instruments every byte a Go loop reads, and the tests compare gigabytes.
func isZero(b []byte) bool { return bytes.Equal(b, zeros[:len(b)]) }

// TestSparseDiskBlockReads publishes a 1 GiB sparse disk and reads random
// blocks through one shared BlockStream from many goroutines.
func TestSparseDiskBlockReads(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(1, 2))
	const size = 1 << 30
	path := filepath.Join(t.TempDir(), "root.img")
	regions := testutil.SparseFile(t, path, size, 200, 256<<10, rng)
	kernel := writeFile(t, "vmlinuz", []byte("a kernel"))

	var progressed uint64
	resp, err := s.Client.Publish(ctx, imageclient.PublishSpec{
		Name:       "debian-12",
		Attributes: &imagev1.ImageAttributes{Arch: "x86_64", Os: "debian-12", Vcpus: 2, MemoryMib: 1024},
		Files: []imageclient.PublishFile{
			{Name: "root.img", Path: path, Kind: imagev1.FileKind_FILE_KIND_DISK},
			{Name: "vmlinuz", Path: kernel, Kind: imagev1.FileKind_FILE_KIND_KERNEL},
		},
	}, func(done, total uint64) { progressed = done })
	if err != nil {
		t.Fatal(err)
	}
	var dataBytes uint64
	for _, r := range regions {
		dataBytes += r.Len
	}
	// Holes never cross the wire: at most the data regions (rounded to the
	// file system's allocation) and the kernel were sent.
	if resp.BytesReceived == 0 || resp.BytesReceived > dataBytes+uint64(len(regions))*8192+8 {
		t.Fatalf("%d bytes received for %d bytes of data", resp.BytesReceived, dataBytes)
	}
	if progressed != resp.BytesReceived {
		t.Fatalf("progress reported %d bytes, server received %d", progressed, resp.BytesReceived)
	}
	if m := resp.Manifest; m.Files[0].ZeroMap != nil || m.Files[0].Size != size {
		t.Fatalf("publish response manifest: %v", m.Files[0])
	}

	got, err := s.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "debian-12", View: imagev1.View_VIEW_FULL})
	if err != nil {
		t.Fatal(err)
	}
	meta := got.Manifest.Files[0]
	if meta.Policy != imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS || got.Manifest.Files[1].Policy != imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		t.Fatalf("policies %v %v", meta.Policy, got.Manifest.Files[1].Policy)
	}
	if meta.NonzeroBytes < dataBytes/2 || meta.NonzeroBytes > dataBytes+uint64(len(regions))*2*blockproto.ZeroGranule {
		t.Fatalf("nonzero bytes %d for %d bytes of data", meta.NonzeroBytes, dataBytes)
	}

	src, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	nb := uint64(size / bs)

	for _, compress := range []bool{false, true} {
		t.Run("compress="+strconv.FormatBool(compress), func(t *testing.T) {
			stream, err := s.Client.OpenBlockStream(ctx, compress)
			if err != nil {
				t.Fatal(err)
			}
			defer stream.Close()
			var wg sync.WaitGroup
			var mu sync.Mutex
			zero, data := 0, 0
			for g := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(g), 99))
					want := make([]byte, 4*bs)
					for range 60 {
						var first uint64
						if rng.IntN(2) == 0 { // a block holding data
							r := regions[rng.IntN(len(regions))]
							first = (r.Off + rng.Uint64N(r.Len)) / bs
						} else {
							first = rng.Uint64N(nb)
						}
						count := uint32(1 + rng.IntN(4))
						count = uint32(min(uint64(count), nb-first))
						res, err := stream.Read(ctx, "debian-12", "root.img", first, count)
						if err != nil {
							t.Errorf("read %d+%d: %v", first, count, err)
							return
						}
						if len(res) != int(count) {
							t.Errorf("read %d+%d: %d results", first, count, len(res))
							return
						}
						w := want[:int(count)*bs]
						if _, err := src.ReadAt(w, int64(first*bs)); err != nil && !errors.Is(err, io.EOF) {
							t.Error(err)
							return
						}
						for i, r := range res {
							blk := first + uint64(i)
							exp := w[i*bs : (i+1)*bs]
							digest := meta.BlockDigests[blk*blockproto.DigestSize : (blk+1)*blockproto.DigestSize]
							if r.Block != blk || r.Length != bs {
								t.Errorf("block %d: got block %d length %d", blk, r.Block, r.Length)
								return
							}
							if r.Zero {
								if r.Data != nil || !isZero(exp) {
									t.Errorf("block %d: zero=true but the source has data (or data was sent: %d bytes)", blk, len(r.Data))
									return
								}
							} else if !bytes.Equal(r.Data, exp) {
								t.Errorf("block %d: data differs from the source", blk)
								return
							}
							if isZero(exp) && !r.Zero {
								t.Errorf("block %d: an all-zero block was sent as data", blk)
								return
							}
							if !bytes.Equal(r.Digest, digest) {
								t.Errorf("block %d: digest differs from the manifest", blk)
								return
							}
							if err := blockproto.VerifyBlock(r, digest); err != nil {
								t.Error(err)
								return
							}
							mu.Lock()
							if r.Zero {
								zero++
							} else {
								data++
							}
							mu.Unlock()
						}
					}
				}()
			}
			wg.Wait()
			if zero == 0 || data == 0 {
				t.Fatalf("%d zero and %d data blocks read; the test should see both", zero, data)
			}

			// Errors are answered in-band; the stream keeps working.
			_, err = stream.Read(ctx, "debian-12", "root.img", nb, 1)
			wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange, "past its end")
			_, err = stream.Read(ctx, "debian-12", "root.img", nb-1, 2)
			wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange)
			_, err = stream.Read(ctx, "nope", "root.img", 0, 1)
			wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "nope")
			_, err = stream.Read(ctx, "debian-12", "nope", 0, 1)
			wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "nope")
			r := regions[0]
			res, err := stream.Read(ctx, "debian-12", "root.img", r.Off/bs, 1)
			if err != nil {
				t.Fatalf("the stream broke after in-band errors: %v", err)
			}
			if err := blockproto.VerifyBlock(res[0], meta.BlockDigests[r.Off/bs*32:r.Off/bs*32+32]); err != nil {
				t.Fatal(err)
			}
			if stream.Err() != nil {
				t.Fatalf("stream error: %v", stream.Err())
			}
			// A wrong digest is noticed.
			res[0].Data[0] ^= 1
			if err := blockproto.VerifyBlock(res[0], meta.BlockDigests[r.Off/bs*32:r.Off/bs*32+32]); !errors.Is(err, errdefs.ErrDataLoss) {
				t.Fatalf("VerifyBlock of a damaged block: %v", err)
			}
		})
	}

	// A request that fails validation fails the stream as a whole.
	stream, err := s.Client.OpenBlockStream(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	_, err = stream.Read(ctx, "debian-12", "../root.img", 0, 1)
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "file")
	if _, err := stream.Read(ctx, "debian-12", "root.img", 0, 1); err == nil {
		t.Fatal("a broken stream answered")
	}
}

// TestWholeFileChannel round-trips a memory-state file through FetchFile.
func TestWholeFileChannel(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(3, 4))
	content := testutil.MemoryLike(rng, 20<<20+12345, 0.22, 0.05)
	clear(content[4<<20 : 7<<20]) // three whole zero chunks
	path := writeFile(t, "mem", content)
	publish(t, s.Client, imageclient.PublishSpec{Name: "vm-state", Files: []imageclient.PublishFile{
		{Name: "mem", Path: path, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE},
	}})
	m, err := s.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "vm-state"})
	if err != nil {
		t.Fatal(err)
	}
	if p := m.Manifest.Files[0].Policy; p != imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		t.Fatalf("memory state has policy %v", p)
	}
	cs := uint64(m.Manifest.Files[0].ChunkSize)

	fetch := func(offset uint64) ([]byte, int, error) {
		var out []byte
		zeroChunks := 0
		next := offset
		err := s.Client.FetchFile(ctx, "vm-state", "mem", offset, 0, func(off uint64, length uint32, data []byte) error {
			if off != next {
				t.Fatalf("chunk at %d, expected %d", off, next)
			}
			if data == nil {
				zeroChunks++
				out = append(out, make([]byte, length)...)
			} else {
				if len(data) != int(length) {
					t.Fatalf("chunk at %d: %d bytes for length %d", off, len(data), length)
				}
				out = append(out, data...)
			}
			next += uint64(length)
			return nil
		})
		return out, zeroChunks, err
	}
	got, zeroChunks, err := fetch(0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, content) {
		t.Fatalf("fetched %d bytes differ from the %d published", len(got), len(content))
	}
	if zeroChunks != 3 {
		t.Fatalf("%d zero chunks sent without data, want 3", zeroChunks)
	}

	// Resume from a chunk boundary.
	got, _, err = fetch(5 * cs)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, content[5*cs:]) {
		t.Fatal("resumed fetch differs")
	}
	// Resume at the last (partial) chunk.
	last := uint64(len(content)) / cs * cs
	got, _, err = fetch(last)
	if err != nil || !bytes.Equal(got, content[last:]) {
		t.Fatalf("fetch of the last chunk: %d bytes, %v", len(got), err)
	}
	_, _, err = fetch(cs + 4096)
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "chunk size")
	_, _, err = fetch(last + cs)
	wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange, "past the end")
	err = s.Client.FetchFile(ctx, "nope", "mem", 0, 3, func(uint64, uint32, []byte) error { return nil })
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)

	// A ChunkFunc error stops the transfer and is returned as is.
	stop := errors.New("enough")
	calls := 0
	err = s.Client.FetchFile(ctx, "vm-state", "mem", 0, 0, func(uint64, uint32, []byte) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("FetchFile after the callback failed: %v after %d calls", err, calls)
	}
}

// TestPublishInterrupted checks that an upload that does not commit leaves
// nothing behind and the name can be published afterwards.
func TestPublishInterrupted(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(5, 6))
	content := make([]byte, 8<<20)
	testutil.RandomNonZero(rng, content)
	path := writeFile(t, "root.img", content)
	spec := imageclient.PublishSpec{Name: "img", Files: []imageclient.PublishFile{{Name: "root.img", Path: path, Kind: imagev1.FileKind_FILE_KIND_DISK}}}

	nothingVisible := func(t *testing.T) {
		t.Helper()
		eventually(t, "the server to drop the upload", func() bool { return len(tmpEntries(t, s)) == 0 })
		_, err := s.Client.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "img"})
		wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "img")
		l, err := s.Client.API.ListImages(ctx, &imagev1.ListImagesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(l.Images) != 0 {
			t.Fatalf("ListImages shows %d images", len(l.Images))
		}
	}

	t.Run("cancel", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		_, err := s.Client.Publish(cctx, spec, func(done, total uint64) {
			if done >= 2<<20 {
				// The upload is staged on the server; now the publisher dies.
				eventually(t, "the upload to be staged", func() bool { return len(tmpEntries(t, s)) > 0 })
				cancel()
			}
		})
		wantCode(t, err, nil, codes.Canceled)
		nothingVisible(t)
	})

	t.Run("no commit", func(t *testing.T) {
		stream, err := s.Client.API.Publish(ctx)
		if err != nil {
			t.Fatal(err)
		}
		send := func(r *imagev1.PublishRequest) {
			if err := stream.Send(r); err != nil {
				t.Fatal(err)
			}
		}
		send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "img", Files: []*imagev1.PublishFile{{Name: "root.img", Size: uint64(len(content))}}}}})
		send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Data: content[:1<<20]}}})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "without a commit")
		nothingVisible(t)
	})

	t.Run("wrong sha256", func(t *testing.T) {
		stream, err := s.Client.API.Publish(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []*imagev1.PublishRequest{
			{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "img", Files: []*imagev1.PublishFile{{Name: "root.img", Size: uint64(len(content))}}}}},
			{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Data: content[:4<<20]}}},
			{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Offset: 4 << 20, Data: content[4<<20:]}}},
			{Msg: &imagev1.PublishRequest_Commit{Commit: &imagev1.PublishCommit{FileSha256: [][]byte{make([]byte, 32)}}}},
		} {
			if err := stream.Send(r); err != nil {
				t.Fatal(err)
			}
		}
		_, err = stream.CloseAndRecv()
		wantCode(t, err, nil, codes.DataLoss, "sha256")
		if !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("%v is not ErrDataLoss", err)
		}
		nothingVisible(t)
	})

	t.Run("protocol errors", func(t *testing.T) {
		header := &imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "img", Files: []*imagev1.PublishFile{{Name: "root.img", Size: 10}}}}}
		for _, c := range []struct {
			name  string
			msgs  []*imagev1.PublishRequest
			code  codes.Code
			words []string
		}{
			{"data first", []*imagev1.PublishRequest{{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Data: []byte("x")}}}}, codes.InvalidArgument, []string{"header"}},
			{"oversized data", []*imagev1.PublishRequest{header, {Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Data: make([]byte, imagev1.MaxDataChunk+1)}}}}, codes.InvalidArgument, []string{"at most 4194304 bytes"}},
			{"past the size", []*imagev1.PublishRequest{header, {Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{Offset: 5, Data: make([]byte, 6)}}}}, codes.OutOfRange, []string{"root.img"}},
			{"unknown file", []*imagev1.PublishRequest{header, {Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{FileIndex: 1, Data: []byte("x")}}}}, codes.InvalidArgument, []string{"file index 1"}},
			{"second header", []*imagev1.PublishRequest{header, header}, codes.InvalidArgument, []string{"second header"}},
			{"sums missing", []*imagev1.PublishRequest{header, {Msg: &imagev1.PublishRequest_Commit{Commit: &imagev1.PublishCommit{}}}}, codes.InvalidArgument, []string{"checksums"}},
			{"bad image name", []*imagev1.PublishRequest{{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "../img", Files: []*imagev1.PublishFile{{Name: "a"}}}}}}, codes.InvalidArgument, []string{"image name"}},
			{"bad file name", []*imagev1.PublishRequest{{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "img", Files: []*imagev1.PublishFile{{Name: "a/b"}}}}}}, codes.InvalidArgument, []string{"files[0].name"}},
		} {
			t.Run(c.name, func(t *testing.T) {
				stream, err := s.Client.API.Publish(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, m := range c.msgs {
					if err := stream.Send(m); err != nil {
						break // the server already answered; CloseAndRecv has the reason
					}
				}
				_, err = stream.CloseAndRecv()
				wantCode(t, err, nil, c.code, c.words...)
				nothingVisible(t)
			})
		}
	})

	// After all that, the name is free.
	publish(t, s.Client, spec)
	_, err := s.Client.Publish(ctx, spec, nil)
	wantCode(t, err, errdefs.IsAlreadyExists, codes.AlreadyExists, "img")

	// A second upload of a name while the first is still running.
	stream, err := s.Client.API.Publish(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Header{Header: &imagev1.PublishHeader{Name: "other", Files: []*imagev1.PublishFile{{Name: "a", Size: 1}}}}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the first upload to start", func() bool { return len(tmpEntries(t, s)) > 0 })
	spec.Name = "other"
	_, err = s.Client.Publish(ctx, spec, nil)
	wantCode(t, err, errdefs.IsAlreadyExists, codes.AlreadyExists, "being published")
	_, err = stream.CloseAndRecv()
	wantCode(t, err, nil, codes.InvalidArgument)
	publish(t, s.Client, spec)
}

func TestErrors(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	api := s.Client.API
	publish(t, s.Client, imageclient.PublishSpec{Name: "img", Files: []imageclient.PublishFile{{Name: "root", Path: writeFile(t, "root", []byte("data")), Kind: imagev1.FileKind_FILE_KIND_DISK}}})

	_, err := api.GetImage(ctx, &imagev1.GetImageRequest{Name: "nope"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound, `"nope"`)
	_, err = api.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "nope"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	_, err = api.GetProfile(ctx, &imagev1.GetProfileRequest{Image: "nope"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	_, err = api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "d", SourceImage: "nope"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)

	for _, name := range []string{"a/b", "..", "../../etc/passwd", "a..b", "/abs", "a\x01b", "a\nb", "img\x00", ".hidden"} {
		_, err = api.GetImage(ctx, &imagev1.GetImageRequest{Name: name})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "name")
		_, err = api.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: name})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "name")
		_, err = api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: name, SourceImage: "img"})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "disk name")
		_, err = api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "d", SourceImage: "img", SourceFile: name})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "source_file")
		_, err = api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "img", Entries: []*imagev1.ProfileEntry{{File: name}}})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "entries[0].file")
		err = s.Client.FetchFile(ctx, "img", name, 0, 0, func(uint64, uint32, []byte) error { return nil })
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "file")
	}
	_, err = api.ListImages(ctx, &imagev1.ListImagesRequest{Labels: map[string]string{"a/b": "x"}})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "label key")
	// Nothing was created by any of that.
	l, err := api.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil || len(l.Images) != 1 {
		t.Fatalf("ListImages: %v %v", l, err)
	}
}

func TestDisks(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	api := s.Client.API
	rng := rand.New(rand.NewPCG(7, 8))
	const nb = 32
	golden := make([]byte, nb*bs-1000) // the last block is partial
	for i := 0; i < nb; i += 2 {       // every other block holds data
		testutil.RandomNonZero(rng, golden[i*bs:min((i+1)*bs, len(golden))])
	}
	goldenPath := writeFile(t, "root.img", golden)
	publish(t, s.Client, imageclient.PublishSpec{
		Name:       "golden",
		Attributes: &imagev1.ImageAttributes{Arch: "x86_64", Vcpus: 2},
		Files:      []imageclient.PublishFile{{Name: "root.img", Path: goldenPath, Kind: imagev1.FileKind_FILE_KIND_DISK}},
	})
	cd, err := api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "vm1-root", SourceImage: "golden", Labels: map[string]string{"vm": "vm1"}})
	if err != nil {
		t.Fatal(err)
	}
	if !cd.Manifest.Writable || cd.Manifest.BaseImage != "golden" || cd.Manifest.Files[0].Size != uint64(len(golden)) {
		t.Fatalf("disk manifest %v", cd.Manifest)
	}
	_, err = api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "vm1-root", SourceImage: "golden"})
	wantCode(t, err, errdefs.IsAlreadyExists, codes.AlreadyExists)

	stream, err := s.Client.OpenBlockStream(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	checkBlocks := func(t *testing.T, stream *imageclient.BlockStream, image string, want []byte) {
		t.Helper()
		res, err := stream.Read(ctx, image, "root.img", 0, nb)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range res {
			exp := want[i*bs : min((i+1)*bs, len(want))]
			if r.Zero && !isZero(exp) || !r.Zero && !bytes.Equal(r.Data, exp) {
				t.Fatalf("%s block %d differs", image, i)
			}
			if sum := sha256.Sum256(exp); !bytes.Equal(r.Digest, sum[:]) {
				t.Fatalf("%s block %d: digest differs", image, i)
			}
		}
		var fetched []byte
		if err := s.Client.FetchFile(ctx, image, "root.img", 0, 0, func(_ uint64, n uint32, data []byte) error {
			if data == nil {
				data = make([]byte, n)
			}
			fetched = append(fetched, data...)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fetched, want) {
			t.Fatalf("%s: FetchFile differs", image)
		}
	}
	want := bytes.Clone(golden)
	checkBlocks(t, stream, "vm1-root", want)

	type write struct {
		block uint64
		data  []byte
	}
	writeBlocks := func(disk string, expect uint64, commit bool, batches ...[]write) (*imagev1.WriteBlocksResponse, error) {
		ws, err := api.WriteBlocks(ctx)
		if err != nil {
			return nil, err
		}
		for i, b := range batches {
			req := &imagev1.WriteBlocksRequest{}
			if i == 0 {
				req.Disk, req.ExpectGeneration = disk, expect
			}
			for _, w := range b {
				req.Writes = append(req.Writes, &imagev1.BlockWrite{Block: w.block, Data: w.data})
			}
			req.Commit = commit && i == len(batches)-1
			if err := ws.Send(req); err != nil {
				break
			}
		}
		return ws.CloseAndRecv()
	}
	block := func(n int) []byte { b := make([]byte, n); testutil.RandomNonZero(rng, b); return b }

	// One batch in two messages: a data block over a hole, a data block over
	// data, zeros over data and the partial last block.
	batch1 := [][]write{
		{{1, block(bs)}, {2, block(bs)}},
		{{4, make([]byte, bs)}, {nb - 1, block(len(golden) - (nb-1)*bs)}},
	}
	resp, err := writeBlocks("vm1-root", 0, true, batch1...)
	if err != nil {
		t.Fatal(err)
	}
	if resp.Generation != 1 || resp.BlocksWritten != 4 {
		t.Fatalf("write response %v", resp)
	}
	for _, b := range batch1 {
		for _, w := range b {
			copy(want[w.block*bs:], w.data)
		}
	}
	checkBlocks(t, stream, "vm1-root", want)
	checkBlocks(t, stream, "golden", golden)

	// A batch without a commit changes nothing.
	_, err = writeBlocks("vm1-root", 0, false, []write{{3, block(bs)}})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "without a commit")
	// A stale writer.
	_, err = writeBlocks("vm1-root", 7, true, []write{{3, block(bs)}})
	wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "generation")
	// Golden images are immutable.
	_, err = writeBlocks("golden", 0, true, []write{{3, block(bs)}})
	wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "golden")
	// Bad writes.
	_, err = writeBlocks("vm1-root", 0, true, []write{{nb, block(bs)}})
	wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange)
	_, err = writeBlocks("vm1-root", 0, true, []write{{0, block(100)}})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "exactly")
	_, err = writeBlocks("nope", 0, true, []write{{0, block(bs)}})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	_, err = writeBlocks("", 0, true, []write{{0, block(bs)}})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "name the disk")
	ws, err := api.WriteBlocks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = ws.Send(&imagev1.WriteBlocksRequest{Disk: "vm1-root", Writes: []*imagev1.BlockWrite{{Block: 3, Data: block(bs)}}})
	_ = ws.Send(&imagev1.WriteBlocksRequest{Disk: "golden", Commit: true})
	_, err = ws.CloseAndRecv()
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "one batch writes one disk")
	checkBlocks(t, stream, "vm1-root", want)

	d, err := api.GetImage(ctx, &imagev1.GetImageRequest{Name: "vm1-root"})
	if err != nil || d.Manifest.Generation != 1 {
		t.Fatalf("disk after failed batches: %v %v", d, err)
	}
	_, err = api.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "golden"})
	wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "vm1-root")

	// Restart the server on the same directory: the writes survive.
	stream.Close()
	dir := s.Dir
	s.Stop()
	s = testutil.StartServer(t, dir)
	api = s.Client.API
	stream, err = s.Client.OpenBlockStream(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, stream, "vm1-root", want)
	checkBlocks(t, stream, "golden", golden)
	w5 := block(bs)
	if resp, err = writeBlocks("vm1-root", 1, true, []write{{5, w5}}); err != nil || resp.Generation != 2 {
		t.Fatalf("write after restart: %v %v", resp, err)
	}
	copy(want[5*bs:], w5)
	checkBlocks(t, stream, "vm1-root", want)
	stream.Close()

	// A crash after the commit point of batch 3: the journal is renamed to
	// its generation but its data never reached the disk. The next start
	// applies it.
	s.Stop()
	crash := []journalRec{{6, block(bs)}, {1, block(bs)}}
	jdir := filepath.Join(dir, "images", "vm1-root", "journal")
	if err := os.WriteFile(filepath.Join(jdir, "3"), committedJournal(crash), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(jdir, "x.tmp"), committedJournal([]journalRec{{7, block(bs)}}), 0o644); err != nil {
		t.Fatal(err) // an uncommitted batch: never applied
	}
	s = testutil.StartServer(t, dir)
	api = s.Client.API
	stream, err = s.Client.OpenBlockStream(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	for _, r := range crash {
		copy(want[r.block*bs:], r.data)
	}
	checkBlocks(t, stream, "vm1-root", want)
	checkBlocks(t, stream, "golden", golden)
	if d, err := api.GetImage(ctx, &imagev1.GetImageRequest{Name: "vm1-root"}); err != nil || d.Manifest.Generation != 3 {
		t.Fatalf("generation after replay: %v %v", d, err)
	}
	if ents, _ := os.ReadDir(jdir); len(ents) != 0 {
		t.Fatalf("%d journal files left after replay", len(ents))
	}

	l, err := api.ListImages(ctx, &imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_WRITABLE})
	if err != nil || len(l.Images) != 1 || l.Images[0].Name != "vm1-root" || l.Images[0].Generation != 3 {
		t.Fatalf("writable disks: %v %v", l, err)
	}
	if _, err := api.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "vm1-root"}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: "golden"}); err != nil {
		t.Fatal(err)
	}
	l, err = api.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil || len(l.Images) != 0 {
		t.Fatalf("after deleting everything: %v %v", l, err)
	}
	// The stream had "golden" open: it must not serve the deleted image, and
	// serves the new one once the name is published again.
	_, err = stream.Read(ctx, "golden", "root.img", 0, 1)
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	fresh := block(bs)
	publish(t, s.Client, imageclient.PublishSpec{Name: "golden", Files: []imageclient.PublishFile{{Name: "root.img", Path: writeFile(t, "fresh", fresh), Kind: imagev1.FileKind_FILE_KIND_DISK}}})
	res, err := stream.Read(ctx, "golden", "root.img", 0, 1)
	if err != nil || !bytes.Equal(res[0].Data, fresh) {
		t.Fatalf("read of the re-published image: %v", err)
	}
}

func TestProfiles(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	api := s.Client.API
	publish(t, s.Client, imageclient.PublishSpec{Name: "img", Files: []imageclient.PublishFile{
		{Name: "root", Path: writeFile(t, "root", make([]byte, 10*bs)), Kind: imagev1.FileKind_FILE_KIND_DISK},
		{Name: "kernel", Path: writeFile(t, "kernel", []byte("k")), Kind: imagev1.FileKind_FILE_KIND_KERNEL},
	}})
	got, err := api.GetProfile(ctx, &imagev1.GetProfileRequest{Image: "img"})
	if err != nil || len(got.Entries) != 0 {
		t.Fatalf("empty profile: %v %v", got, err)
	}
	entries := []*imagev1.ProfileEntry{{File: "kernel"}, {File: "root", Block: 9}, {File: "root", Block: 0}, {File: "root", Block: 3}}
	if _, err := api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "img", Entries: entries}); err != nil {
		t.Fatal(err)
	}
	got, err = api.GetProfile(ctx, &imagev1.GetProfileRequest{Image: "img"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Entries) != len(entries) {
		t.Fatalf("%d entries back, want %d", len(got.Entries), len(entries))
	}
	for i, e := range entries {
		if got.Entries[i].File != e.File || got.Entries[i].Block != e.Block {
			t.Fatalf("entry %d: %v, want %v", i, got.Entries[i], e)
		}
	}
	_, err = api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "img", Entries: []*imagev1.ProfileEntry{{File: "root"}, {File: "initrd"}}})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "entries[1]", "initrd")
	_, err = api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "img", Entries: []*imagev1.ProfileEntry{{File: "root", Block: 10}}})
	wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange)
	_, err = api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: "nope"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	got, err = api.GetProfile(ctx, &imagev1.GetProfileRequest{Image: "img"})
	if err != nil || len(got.Entries) != len(entries) {
		t.Fatalf("profile after rejected puts: %v %v", got, err)
	}
}

func TestListImagesFilters(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	api := s.Client.API
	root := writeFile(t, "root", []byte("root"))
	for _, img := range []struct {
		name  string
		attrs *imagev1.ImageAttributes
	}{
		{"deb-x86", &imagev1.ImageAttributes{Arch: "x86_64", Os: "debian-12", Vcpus: 2, MemoryMib: 2048, Labels: map[string]string{"tier": "gold", "gpu": "no"}}},
		{"deb-arm", &imagev1.ImageAttributes{Arch: "aarch64", Os: "debian-12", Vcpus: 8, MemoryMib: 512, Labels: map[string]string{"tier": "gold"}}},
		{"alpine", &imagev1.ImageAttributes{Arch: "x86_64", Os: "alpine-3", Vcpus: 1, MemoryMib: 256}},
		{"bare", nil},
	} {
		publish(t, s.Client, imageclient.PublishSpec{Name: img.name, Attributes: img.attrs, Files: []imageclient.PublishFile{{Name: "root", Path: root, Kind: imagev1.FileKind_FILE_KIND_DISK}}})
	}
	if _, err := api.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: "disk1", SourceImage: "deb-arm", Labels: map[string]string{"tier": "gold", "vm": "a"}}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		q    *imagev1.ListImagesRequest
		want string
	}{
		{&imagev1.ListImagesRequest{}, "alpine bare deb-arm deb-x86 disk1"},
		{&imagev1.ListImagesRequest{Arch: "x86_64"}, "alpine deb-x86"},
		{&imagev1.ListImagesRequest{Arch: "aarch64"}, "deb-arm disk1"},
		{&imagev1.ListImagesRequest{Os: "debian-12"}, "deb-arm deb-x86 disk1"},
		{&imagev1.ListImagesRequest{MinVcpus: 2}, "deb-arm deb-x86 disk1"},
		{&imagev1.ListImagesRequest{MinVcpus: 4, Arch: "x86_64"}, ""},
		{&imagev1.ListImagesRequest{MinMemoryMib: 1024}, "deb-x86"},
		{&imagev1.ListImagesRequest{Labels: map[string]string{"tier": "gold"}}, "deb-arm deb-x86 disk1"},
		{&imagev1.ListImagesRequest{Labels: map[string]string{"tier": "gold", "gpu": "no"}}, "deb-x86"},
		{&imagev1.ListImagesRequest{Labels: map[string]string{"tier": "silver"}}, ""},
		{&imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_GOLDEN}, "alpine bare deb-arm deb-x86"},
		{&imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_WRITABLE}, "disk1"},
		{&imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_WRITABLE, Arch: "x86_64"}, ""},
		{&imagev1.ListImagesRequest{NamePrefix: "deb-"}, "deb-arm deb-x86"},
	} {
		l, err := api.ListImages(ctx, c.q)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, m := range l.Images {
			names = append(names, m.Name)
			for _, f := range m.Files {
				if f.ZeroMap != nil || f.BlockDigests != nil {
					t.Fatalf("ListImages sent per-block meta-data for %s", m.Name)
				}
			}
		}
		if got := strings.Join(names, " "); got != c.want {
			t.Errorf("ListImages(%v) = %q, want %q", c.q, got, c.want)
		}
	}
}

func TestHealthAndReflection(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	hc := healthpb.NewHealthClient(s.Conn)
	for _, svc := range []string{"", imagev1.ImageService_ServiceDesc.ServiceName} {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatal(err)
		}
		if r.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %q: %v", svc, r.Status)
		}
	}
	_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)

	rc, err := reflectionpb.NewServerReflectionClient(s.Conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, svc := range resp.GetListServicesResponse().GetService() {
		names = append(names, svc.Name)
	}
	if !strings.Contains(" "+strings.Join(names, " ")+" ", " vmgrid.image.v1.ImageService ") {
		t.Fatalf("reflection lists %v", names)
	}
	// The service's schema is there too, for grpcurl.
	if err := rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "vmgrid.image.v1.ImageService"}}); err != nil {
		t.Fatal(err)
	}
	resp, err = rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Fatalf("no descriptor for ImageService: %v", resp.GetErrorResponse())
	}
	if err := rc.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := rc.Recv(); err != io.EOF {
		t.Fatalf("reflection stream end: %v", err)
	}
}

// TestGracefulShutdown: Shutdown reports NOT_SERVING, lets a running stream
// finish its work, returns once it ended, and refuses new calls afterwards.
func TestGracefulShutdown(t *testing.T) {
	s := start(t)
	ctx := ctxT(t)
	data := make([]byte, 4*bs)
	testutil.RandomNonZero(rand.New(rand.NewPCG(9, 9)), data)
	publish(t, s.Client, imageclient.PublishSpec{Name: "img", Files: []imageclient.PublishFile{{Name: "root", Path: writeFile(t, "root", data), Kind: imagev1.FileKind_FILE_KIND_DISK}}})
	stream, err := s.Client.OpenBlockStream(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Read(ctx, "img", "root", 0, 1); err != nil {
		t.Fatal(err)
	}

	var hs healthpb.HealthCheckResponse_ServingStatus
	s.Srv.Health.SetServingStatus("probe", healthpb.HealthCheckResponse_SERVING)
	done := make(chan struct{})
	go func() { s.Srv.Shutdown(); close(done) }()
	eventually(t, "NOT_SERVING", func() bool {
		// Health.Shutdown flips every service; ask the server object itself
		// since new calls may already be refused.
		r, err := s.Srv.Health.Check(ctx, &healthpb.HealthCheckRequest{Service: "probe"})
		if err == nil {
			hs = r.Status
		}
		return hs == healthpb.HealthCheckResponse_NOT_SERVING
	})

	// The running stream still works while the server drains.
	for b := uint64(1); b < 4; b++ {
		res, err := stream.Read(ctx, "img", "root", b, 1)
		if err != nil {
			t.Fatalf("read during graceful stop: %v", err)
		}
		if !bytes.Equal(res[0].Data, data[b*bs:(b+1)*bs]) {
			t.Fatal("data differs")
		}
	}
	select {
	case <-done:
		t.Fatal("Shutdown returned while a stream was running")
	case <-time.After(100 * time.Millisecond):
	}
	stream.Close()
	select {
	case <-done:
	case <-time.After(4 * time.Second): // well before the 5 s hard-stop timeout
		t.Fatal("Shutdown did not return after the last stream ended")
	}
	_, err = s.Client.API.ListImages(ctx, &imagev1.ListImagesRequest{})
	wantCode(t, err, errdefs.IsUnavailable, codes.Unavailable)
	s.Srv.Shutdown() // a second time is fine
}
