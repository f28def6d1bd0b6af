package imageserver_test

// Benchmarks over real gRPC on 127.0.0.1 (services.NewServer and
// services.Dial, as in production). They run only with -bench, e.g.
//
//	go test -run '^$' -bench . -benchtime 3x ./imageserver/
//
// One iteration moves a whole file, so -benchtime Nx is meaningful.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

func benchPublish(b *testing.B, c *imageclient.Client, name string, kind imagev1.FileKind, path string) {
	b.Helper()
	_, err := c.Publish(context.Background(), imageclient.PublishSpec{
		Name:  name,
		Files: []imageclient.PublishFile{{Name: "f", Path: path, Kind: kind}},
	}, nil)
	if err != nil {
		b.Fatal(err)
	}
}

// cpuPerGB reports, when called at the end of a benchmark, the CPU time
// (user + system, client and server together: both live in this process)
// spent per GB of b.SetBytes since start was taken. Throughput swings with
// whatever else the machine runs; CPU per byte much less, and it bounds what
// the machine can do: cores / (cpu-s/GB) GB/s.
func cpuPerGB(b *testing.B, bytesPerOp int64) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() {
		b.ReportMetric((cpu()-start).Seconds()/(float64(b.N)*float64(bytesPerOp)/1e9), "cpu-s/GB")
	}
}

// BenchmarkReadBlocks reads a 256 MiB file of random data (in the page
// cache: it was just published) in 64 KiB blocks with 32 blocks in flight
// on one shared BlockStream. One iteration reads the whole file.
func BenchmarkReadBlocks(b *testing.B) {
	const size = 256 << 20
	s := testutil.StartServer(b, "")
	data := make([]byte, size)
	testutil.RandomData(rand.New(rand.NewPCG(1, 1)), data)
	path := filepath.Join(b.TempDir(), "disk")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.Fatal(err)
	}
	data = nil
	benchPublish(b, s.Client, "disk", imagev1.FileKind_FILE_KIND_DISK, path)
	const nb = size / blockproto.DefaultBlockSize

	// 32 blocks in flight in every case: 32 single-block requests, or fewer
	// requests of several blocks (less per-request work on both sides).
	for _, bc := range []struct {
		count    uint32 // blocks per request
		inflight int    // goroutines sharing the stream, one request each
	}{{1, 32}, {4, 8}, {16, 2}} {
		b.Run(fmt.Sprintf("count=%d/inflight=%d", bc.count, bc.inflight), func(b *testing.B) {
			ctx := context.Background()
			stream, err := s.Client.OpenBlockStream(ctx, false)
			if err != nil {
				b.Fatal(err)
			}
			defer stream.Close()
			b.SetBytes(size)
			b.ReportAllocs()
			b.ResetTimer()
			defer cpuPerGB(b, size)()
			for range b.N {
				var next atomic.Uint64
				var wg sync.WaitGroup
				for range bc.inflight {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for {
							first := next.Add(uint64(bc.count)) - uint64(bc.count)
							if first >= nb {
								return
							}
							res, err := stream.Read(ctx, "disk", "f", first, bc.count)
							if err != nil {
								b.Error(err)
								return
							}
							for _, r := range res {
								if r.Zero || len(r.Data) != blockproto.DefaultBlockSize {
									b.Errorf("block %d: zero=%v, %d bytes", r.Block, r.Zero, len(r.Data))
									return
								}
							}
						}
					}()
				}
				wg.Wait()
			}
		})
	}
}

// BenchmarkFetchFile fetches a 100 MB memory-state-like file (zstd ratio
// about 2.3, reported as "ratio") through the compressed whole-file channel,
// decompression included.
func BenchmarkFetchFile(b *testing.B) {
	const size = 100 << 20
	s := testutil.StartServer(b, "")
	data := testutil.MemoryLike(rand.New(rand.NewPCG(2, 2)), size, 0.22, 0.05)
	path := filepath.Join(b.TempDir(), "mem")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.Fatal(err)
	}
	data = nil
	benchPublish(b, s.Client, "vm", imagev1.FileKind_FILE_KIND_MEMORY_STATE, path)

	// What crosses the wire: the server's compressed frames.
	ctx := context.Background()
	stream, err := s.Client.API.FetchFile(ctx, &imagev1.FetchFileRequest{Image: "vm", File: "f"})
	if err != nil {
		b.Fatal(err)
	}
	var wire, plain int
	for {
		resp, err := stream.Recv()
		if err != nil {
			break
		}
		wire += len(resp.Data)
		plain += int(resp.Length)
	}
	if plain != size {
		b.Fatalf("fetched %d bytes, want %d", plain, size)
	}

	b.SetBytes(size)
	b.ReportAllocs()
	b.ResetTimer()
	report := cpuPerGB(b, size)
	for range b.N {
		var got uint64
		err := s.Client.FetchFile(ctx, "vm", "f", 0, 0, func(_ uint64, n uint32, _ []byte) error {
			got += uint64(n)
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		if got != size {
			b.Fatalf("fetched %d bytes", got)
		}
	}
	report()
	b.ReportMetric(float64(plain)/float64(wire), "ratio")
}

// BenchmarkPublish publishes a 1 GiB sparse disk with about 10% random data
// in regions of up to 512 KiB. Throughput is per logical (apparent) byte.
func BenchmarkPublish(b *testing.B) {
	const size = 1 << 30
	s := testutil.StartServer(b, "")
	path := filepath.Join(b.TempDir(), "disk")
	regions := testutil.SparseFile(b, path, size, 400, 512<<10, rand.New(rand.NewPCG(3, 3)))
	var data uint64
	for _, r := range regions {
		data += r.Len
	}
	ctx := context.Background()
	b.SetBytes(size)
	b.ResetTimer()
	report := cpuPerGB(b, size)
	for i := range b.N {
		name := fmt.Sprintf("img-%d", i)
		benchPublish(b, s.Client, name, imagev1.FileKind_FILE_KIND_DISK, path)
		b.StopTimer()
		if _, err := s.Client.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: name}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	report()
	b.ReportMetric(float64(data)/size*100, "%data")
}
