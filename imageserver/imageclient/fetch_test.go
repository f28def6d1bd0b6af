package imageclient_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// downAPI is an image server that is down: every FetchFile fails with
// Unavailable, and the time of each attempt is kept.
type downAPI struct {
	imagev1.ImageServiceClient
	mu    sync.Mutex
	calls []time.Time
}

func (d *downAPI) FetchFile(context.Context, *imagev1.FetchFileRequest, ...grpc.CallOption) (grpc.ServerStreamingClient[imagev1.FetchFileResponse], error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, time.Now())
	return nil, errdefs.ErrUnavailable
}

// TestFetchFileBacksOff: retries wait, longer each time (issue 15 item 13:
// they used to follow one another at once).
func TestFetchFileBacksOff(t *testing.T) {
	api := &downAPI{}
	c := &imageclient.Client{API: api}
	err := c.FetchFile(context.Background(), "img", "mem", 0, 3, func(uint64, uint32, []byte) error { return nil })
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("err = %v, want Unavailable", err)
	}
	if len(api.calls) != 4 {
		t.Fatalf("%d attempts, want 4 (one and three retries)", len(api.calls))
	}
	for i, want := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond} {
		if got := api.calls[i+1].Sub(api.calls[i]); got < want {
			t.Errorf("pause before retry %d: %v, want at least %v", i+1, got, want)
		}
	}
}

// TestFetchFileBackoffBounded: however many retries are allowed, the waits
// stop at Backoff.Total.
func TestFetchFileBackoffBounded(t *testing.T) {
	api := &downAPI{}
	c := &imageclient.Client{API: api, Backoff: imageclient.Backoff{First: 10 * time.Millisecond, Max: 40 * time.Millisecond, Total: 200 * time.Millisecond}}
	start := time.Now()
	err := c.FetchFile(context.Background(), "img", "mem", 0, 1000, func(uint64, uint32, []byte) error { return nil })
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("err = %v, want Unavailable", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("gave up after %v; the budget is 200ms", took)
	}
	// 10+20+40+40+40+40 = 190ms fits in 200ms; a seventh wait would not.
	if len(api.calls) != 7 {
		t.Fatalf("%d attempts, want 7", len(api.calls))
	}
}

// offsetsAPI records the offset of every FetchFile call.
type offsetsAPI struct {
	imagev1.ImageServiceClient
	offsets []uint64
}

func (o *offsetsAPI) FetchFile(ctx context.Context, req *imagev1.FetchFileRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[imagev1.FetchFileResponse], error) {
	o.offsets = append(o.offsets, req.Offset)
	return o.ImageServiceClient.FetchFile(ctx, req, opts...)
}

// breakingAPI breaks every FetchFile stream after a number of chunks, as
// an image server killed half way does.
type breakingAPI struct {
	imagev1.ImageServiceClient
	after int
}

type breakingStream struct {
	grpc.ServerStreamingClient[imagev1.FetchFileResponse]
	left int
}

func (b *breakingAPI) FetchFile(ctx context.Context, req *imagev1.FetchFileRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[imagev1.FetchFileResponse], error) {
	st, err := b.ImageServiceClient.FetchFile(ctx, req, opts...)
	return &breakingStream{ServerStreamingClient: st, left: b.after}, err
}

func (b *breakingStream) Recv() (*imagev1.FetchFileResponse, error) {
	if b.left == 0 {
		return nil, errdefs.ErrUnavailable
	}
	b.left--
	return b.ServerStreamingClient.Recv()
}

// publishMem publishes a memory state of six chunks, some of them zero.
func publishMem(t *testing.T, c *imageclient.Client) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	mem := make([]byte, 6*blockproto.ChunkSize-4321)
	for i := range mem[:2*blockproto.ChunkSize] {
		mem[i] = byte(rng.IntN(16))
	}
	copy(mem[4*blockproto.ChunkSize:], bytes.Repeat([]byte("vmgrid"), 1000))
	src := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(src, mem, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := c.Publish(context.Background(), imageclient.PublishSpec{
		Name:  "vm",
		Files: []imageclient.PublishFile{{Name: "mem", Path: src, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return mem
}

// TestFetchToFileResumes: a failed fetch keeps PATH.partial and the next one
// goes on from it (issue 15 item 13: `image fetch` deleted it).
func TestFetchToFileResumes(t *testing.T) {
	s := testutil.StartServer(t, "")
	mem := publishMem(t, s.Client)
	out := filepath.Join(t.TempDir(), "mem")

	broken := &imageclient.Client{API: &breakingAPI{ImageServiceClient: s.Client.API, after: 3}}
	if _, err := broken.FetchToFile(context.Background(), "vm", "mem", out, 0, nil); !errdefs.IsUnavailable(err) {
		t.Fatalf("err = %v, want the Unavailable of the broken stream", err)
	}
	st, err := os.Stat(out + ".partial")
	if err != nil {
		t.Fatalf("the partial file is gone: %v", err)
	}
	if st.Size() < 3*blockproto.ChunkSize {
		t.Fatalf("partial file of %d bytes, want at least 3 chunks", st.Size())
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s exists after a failed fetch: %v", out, err)
	}

	api := &offsetsAPI{ImageServiceClient: s.Client.API}
	c := &imageclient.Client{API: api}
	if _, err := c.FetchToFile(context.Background(), "vm", "mem", out, 3, nil); err != nil {
		t.Fatal(err)
	}
	if len(api.offsets) != 1 || api.offsets[0] < 3*blockproto.ChunkSize {
		t.Fatalf("FetchFile offsets %v, want one resuming at or past 3 chunks", api.offsets)
	}
	checkFile(t, out, mem)
}

// TestFetchToFileOtherVersion: a partial file that is not a prefix of the
// file is detected and fetched again whole.
func TestFetchToFileOtherVersion(t *testing.T) {
	s := testutil.StartServer(t, "")
	mem := publishMem(t, s.Client)
	out := filepath.Join(t.TempDir(), "mem")
	if err := os.WriteFile(out+".partial", bytes.Repeat([]byte{'x'}, 2*blockproto.ChunkSize+5), 0o644); err != nil {
		t.Fatal(err)
	}
	api := &offsetsAPI{ImageServiceClient: s.Client.API}
	c := &imageclient.Client{API: api}
	if _, err := c.FetchToFile(context.Background(), "vm", "mem", out, 0, nil); err != nil {
		t.Fatal(err)
	}
	if want := []uint64{2 * blockproto.ChunkSize, 0}; len(api.offsets) != 2 || api.offsets[0] != want[0] || api.offsets[1] != want[1] {
		t.Fatalf("FetchFile offsets %v, want %v", api.offsets, want)
	}
	checkFile(t, out, mem)
}

func checkFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %d bytes, differs from the %d published", path, len(got), len(want))
	}
	if _, err := os.Stat(path + ".partial"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("partial file left after success: %v", err)
	}
}
