package dataserver_test

// Throughput of the data path over real gRPC on 127.0.0.1 (Start and Dial,
// as in production; client and server share this process and its cores).
// They run only with -bench, e.g.
//
//	go test -run '^$' -bench . -benchtime 2x ./dataserver/
//
// One iteration moves the whole 1 GiB file; the source is in the page cache
// (written just before). Upload and Download include what production does:
// SHA-256 on both sides of an upload, fsync of the stored file, and for a
// download the client's SHA-256 check and fsync; DownloadDiscard is the
// transfer alone.
//
// The store, the source and the download target live in a temporary
// directory, under $VMGRID_BENCH_DIR when set: a durable upload cannot be
// faster than the disk's write bandwidth, so point it at a tmpfs
// (VMGRID_BENCH_DIR=/dev/shm) to measure the software path alone.

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

const benchSize = 1 << 30

func benchServer(b *testing.B) *dataclient.Client {
	b.Helper()
	tokens := &auth.Tokens{}
	if err := tokens.Add("bench-token-1234", "bench"); err != nil {
		b.Fatal(err)
	}
	srv, err := dataserver.Start(context.Background(), dataserver.Config{
		Server: services.Options{Name: "dataserver", Listen: "127.0.0.1:0"},
		Store:  dataserver.StoreConfig{DataDir: benchDir(b)},
		Tokens: tokens,
	})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx); close(done) }()
	cc, err := dataclient.Dial(srv.Addr(), services.TLSFiles{}, "bench-token-1234")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cc.Close(); cancel(); <-done })
	return dataclient.NewClient(cc)
}

func benchDir(b *testing.B) string {
	b.Helper()
	root := os.Getenv("VMGRID_BENCH_DIR")
	if root == "" {
		return b.TempDir()
	}
	d, err := os.MkdirTemp(root, "dataserver-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// benchFile writes benchSize random bytes and reads them back once, so
// they are in the page cache.
func benchFile(b *testing.B) string {
	b.Helper()
	p := filepath.Join(benchDir(b), "src")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, benchSize); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	f, _ = os.Open(p)
	_, _ = io.Copy(io.Discard, f)
	f.Close()
	return p
}

// cpuPerGB reports, when called at the end of a benchmark, the CPU time
// (user + system, client and server together) per GB moved: it bounds what
// the machine can do (cores / (cpu-s/GB) GB/s) and swings less than
// throughput.
func cpuPerGB(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() {
		b.ReportMetric((cpu()-start).Seconds()/(float64(b.N)*benchSize/1e9), "cpu-s/GB")
	}
}

func BenchmarkUpload(b *testing.B) {
	c := benchServer(b)
	src := benchFile(b)
	ctx := context.Background()
	b.SetBytes(benchSize)
	b.ResetTimer()
	defer cpuPerGB(b)()
	for range b.N {
		info, err := c.Upload(ctx, src, "bench/file", nil)
		if err != nil {
			b.Fatal(err)
		}
		if info.Size != benchSize {
			b.Fatalf("stored %d bytes", info.Size)
		}
	}
}

func BenchmarkDownload(b *testing.B) {
	c := benchServer(b)
	ctx := context.Background()
	if _, err := c.Upload(ctx, benchFile(b), "bench/file", nil); err != nil {
		b.Fatal(err)
	}
	dst := filepath.Join(benchDir(b), "dst")
	b.Run("File", func(b *testing.B) {
		b.SetBytes(benchSize)
		defer cpuPerGB(b)()
		for range b.N {
			info, err := c.Download(ctx, "bench/file", dst, nil)
			if err != nil {
				b.Fatal(err)
			}
			if info.Size != benchSize {
				b.Fatalf("fetched %d bytes", info.Size)
			}
			b.StopTimer()
			os.Remove(dst)
			b.StartTimer()
		}
	})
	b.Run("Discard", func(b *testing.B) {
		b.SetBytes(benchSize)
		defer cpuPerGB(b)()
		for range b.N {
			if _, err := c.ReadRange(ctx, "bench/file", 0, 0, io.Discard); err != nil {
				b.Fatal(err)
			}
		}
	})
}
