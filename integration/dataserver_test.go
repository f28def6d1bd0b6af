package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vmgrid/vmgrid/computeserver/plant/datadisk"
	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

const (
	aliceToken = "alice-token-0001"
	bobToken   = "bob-token-0002"
)

// dataServer is a real data server on 127.0.0.1 and clients of two owners.
type dataServer struct {
	dir        string
	tokens     *auth.Tokens
	srv        *dataserver.Server
	alice, bob *dataclient.Client
}

func startDataServer(t *testing.T) *dataServer {
	t.Helper()
	tokens := &auth.Tokens{}
	if err := tokens.Add(aliceToken, "alice"); err != nil {
		t.Fatal(err)
	}
	if err := tokens.Add(bobToken, "bob"); err != nil {
		t.Fatal(err)
	}
	d := &dataServer{dir: t.TempDir(), tokens: tokens}
	d.serve(t, "127.0.0.1:0")
	d.alice = d.client(t, aliceToken)
	d.bob = d.client(t, bobToken)
	return d
}

// serve starts a server on addr over the test's data directory; it is
// stopped when the test ends.
func (d *dataServer) serve(t *testing.T, addr string) {
	t.Helper()
	srv, err := dataserver.Start(context.Background(), dataserver.Config{
		Server: services.Options{Name: "dataserver", Listen: addr, Logger: zaptest.NewLogger(t, zaptest.Level(zapcore.InfoLevel)), ShutdownTimeout: 5 * time.Second},
		Store:  dataserver.StoreConfig{DataDir: d.dir},
		Tokens: d.tokens,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.srv = srv
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
}

// client dials the server with token ("" sends none); closed when the test ends.
func (d *dataServer) client(t *testing.T, token string) *dataclient.Client {
	t.Helper()
	cc, err := dataclient.Dial(d.srv.Addr(), services.TLSFiles{}, token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return dataclient.NewClient(cc)
}

func (d *dataServer) tmpEntries(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(d.dir, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func randomFile(t *testing.T, seed uint64, n int) (string, []byte) {
	t.Helper()
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed^0x5eed))
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := i; j < min(i+8, n); j++ {
			b[j] = byte(v)
			v >>= 8
		}
	}
	return writeFile(t, fmt.Sprintf("random-%d", seed), b), b
}

func TestDataRoundTrip(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	const size = 24<<20 + 12345
	local, data := randomFile(t, 1, size)

	var last, calls uint64
	info, err := d.alice.Upload(ctx, local, "in/video.raw", func(done, total uint64) {
		if done < last || total != size {
			t.Errorf("progress %d/%d after %d", done, total, last)
		}
		last, calls = done, calls+1
	})
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if info.Owner != "alice" || info.Path != "in/video.raw" || info.Size != size || !bytes.Equal(info.Sha256, sum[:]) {
		t.Fatalf("upload info %v", info)
	}
	if last != size || calls < size/datav1.ChunkSize {
		t.Fatalf("progress ended at %d after %d calls", last, calls)
	}
	st, err := d.alice.Stat(ctx, "in/video.raw")
	if err != nil || !bytes.Equal(st.Sha256, sum[:]) || st.Size != size {
		t.Fatalf("stat %v %v", st, err)
	}
	if files, err := d.alice.List(ctx, ""); err != nil || len(files) != 1 || files[0].Path != "in/video.raw" {
		t.Fatalf("list %v %v", files, err)
	}

	out := filepath.Join(t.TempDir(), "video.raw")
	last = 0
	info, err = d.alice.Download(ctx, "in/video.raw", out, func(done, total uint64) { last = done })
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) || last != size || !bytes.Equal(info.Sha256, sum[:]) {
		t.Fatalf("download: %d bytes (equal %v), progress %d", len(got), bytes.Equal(got, data), last)
	}
	if _, err := os.Stat(out + ".partial"); !os.IsNotExist(err) {
		t.Fatalf("partial file left: %v", err)
	}

	// An empty file round-trips too.
	empty := writeFile(t, "empty", nil)
	if _, err := d.alice.Upload(ctx, empty, "empty", nil); err != nil {
		t.Fatal(err)
	}
	if info, err := d.alice.Download(ctx, "empty", filepath.Join(t.TempDir(), "e"), nil); err != nil || info.Size != 0 {
		t.Fatalf("empty download %v %v", info, err)
	}

	// Bytes in and out are counted.
	mfs, _ := d.srv.Registry.Gather()
	for _, mf := range mfs {
		switch mf.GetName() {
		case "vmgrid_dataserver_bytes_received_total", "vmgrid_dataserver_bytes_sent_total":
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != size {
				t.Errorf("%s = %v, want %d", mf.GetName(), v, size)
			}
		}
	}
	// Health needs no token.
	hc := healthpb.NewHealthClient(mustDial(t, d.srv.Addr(), ""))
	if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "vmgrid.data.v1.DataService"}); err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v %v", resp, err)
	}
}

func mustDial(t *testing.T, addr, token string) *grpc.ClientConn {
	t.Helper()
	cc, err := dataclient.Dial(addr, services.TLSFiles{}, token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func TestDataByteRanges(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	const size = 3<<20 + 7
	local, data := randomFile(t, 2, size)
	if _, err := d.alice.Upload(ctx, local, "f", nil); err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ off, n, want uint64 }{
		{0, 1, 1}, {0, 0, size}, {1<<20 - 1, 3, 3}, {1 << 20, 1 << 20, 1 << 20}, {12345, 2<<20 + 99, 2<<20 + 99},
		{size - 5, 0, 5}, {size - 5, 100, 5}, {size, 0, 0}, {size, 10, 0},
	} {
		var buf bytes.Buffer
		info, err := d.alice.ReadRange(ctx, "f", r.off, r.n, &buf)
		if err != nil {
			t.Fatalf("range %d+%d: %v", r.off, r.n, err)
		}
		if info.Size != size || uint64(buf.Len()) != r.want || !bytes.Equal(buf.Bytes(), data[r.off:r.off+r.want]) {
			t.Fatalf("range %d+%d: %d bytes, want %d", r.off, r.n, buf.Len(), r.want)
		}
	}
	_, err := d.alice.ReadRange(ctx, "f", size+1, 0, io.Discard)
	wantCode(t, err, errdefs.IsOutOfRange, codes.OutOfRange, "past the end")

	// Raw: data messages are in order, each at most one chunk, and only the
	// first carries the file's info.
	stream, err := d.alice.API.Download(ctx, &datav1.DownloadRequest{Path: "f", Offset: 100, Length: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	next := uint64(100)
	for i := 0; ; i++ {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if (resp.File != nil) != (i == 0) || resp.Offset != next || len(resp.Data) > datav1.ChunkSize {
			t.Fatalf("message %d: info %v, offset %d (want %d), %d bytes", i, resp.File != nil, resp.Offset, next, len(resp.Data))
		}
		next += uint64(len(resp.Data))
	}
	if next != 100+2<<20 {
		t.Fatalf("stream ended at %d", next)
	}
	// A resumed download of a file that changed meanwhile is refused.
	stream, err = d.alice.API.Download(ctx, &datav1.DownloadRequest{Path: "f", Offset: 10, IfSha256: make([]byte, 32)})
	if err == nil {
		_, err = stream.Recv()
	}
	wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "changed")
}

func TestDataDownloadResumes(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	const size = 16 << 20
	local, data := randomFile(t, 3, size)
	if _, err := d.alice.Upload(ctx, local, "big", nil); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "big")

	// Interrupt after about 5 MiB.
	cctx, cancel := context.WithCancel(ctx)
	_, err := d.alice.Download(cctx, "big", out, func(done, _ uint64) {
		if done >= 5<<20 {
			cancel()
		}
	})
	cancel()
	if err == nil {
		t.Fatal("an interrupted download succeeded")
	}
	st, err := os.Stat(out + ".partial")
	if err != nil {
		t.Fatal(err)
	}
	have := uint64(st.Size())
	if have < 5<<20 || have >= size {
		t.Fatalf("partial file of %d bytes", have)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatal("an interrupted download is visible")
	}

	// Run again: only the rest is fetched. The server's handler of the
	// interrupted stream may still be sending its last chunk; wait until it
	// has returned so its bytes are not counted against the resume.
	waitHandled(t, d, "Download", 1)
	sentBefore := sent(t, d)
	var first uint64
	if _, err := d.alice.Download(ctx, "big", out, func(done, _ uint64) {
		if first == 0 {
			first = done
		}
	}); err != nil {
		t.Fatal(err)
	}
	if first <= have || first > have+datav1.ChunkSize {
		t.Fatalf("resumed download started at %d, the partial file had %d", first, have)
	}
	if n := sent(t, d) - sentBefore; n != size-have {
		t.Fatalf("the server sent %d bytes to resume, want %d", n, size-have)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("resumed download differs")
	}

	// A partial file left by another version of the remote file is caught
	// by the digest and fetched again whole.
	if err := os.WriteFile(out+".partial", bytes.Repeat([]byte{'x'}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := d.alice.Download(ctx, "big", out, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("download over a stale partial file differs")
	}
	// And one longer than the remote file.
	if err := os.WriteFile(out+".partial", make([]byte, size+10), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := d.alice.Download(ctx, "big", out, nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatal("download over a long partial file differs")
	}
}

// A download whose server goes away mid-stream resumes, within the same
// call, from the last byte received once a server is back.
func TestDataDownloadSurvivesServerRestart(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	const size = 24 << 20
	local, data := randomFile(t, 11, size)
	if _, err := d.alice.Upload(ctx, local, "big", nil); err != nil {
		t.Fatal(err)
	}
	addr := d.srv.Addr()
	restarted := false
	var got bytes.Buffer
	info, err := d.alice.Read(ctx, "big", 0, 0, func(_ *datav1.FileInfo, off uint64, b []byte) error {
		got.Write(b)
		if !restarted && off >= 4<<20 {
			restarted = true
			d.srv.GRPC.Stop() // cut every connection and stream at once
			d.serve(t, addr)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !restarted || info.Size != size || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("restarted %v, got %d bytes (equal %v)", restarted, got.Len(), bytes.Equal(got.Bytes(), data))
	}
	if n := sent(t, d); n == 0 || n >= size {
		t.Fatalf("the second server sent %d of %d bytes: the download did not resume where it broke", n, size)
	}
}

func sent(t *testing.T, d *dataServer) uint64 {
	t.Helper()
	mfs, err := d.srv.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "vmgrid_dataserver_bytes_sent_total" {
			return uint64(mf.GetMetric()[0].GetCounter().GetValue())
		}
	}
	return 0
}

// waitHandled waits until the server has finished n calls of method.
func waitHandled(t *testing.T, d *dataServer, method string, n float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs, err := d.srv.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var got float64
		for _, mf := range mfs {
			if mf.GetName() != "grpc_server_handled_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "grpc_method" && l.GetValue() == method {
						got += m.GetCounter().GetValue()
					}
				}
			}
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server finished %v %s calls, want %v", got, method, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDataOwnerIsolation(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	local, _ := randomFile(t, 4, 1<<20)
	for _, p := range []string{"secret/key", "shared/in/a", "shared/in/b"} {
		if _, err := d.alice.Upload(ctx, local, p, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.bob.Upload(ctx, local, "mine", nil); err != nil {
		t.Fatal(err)
	}

	// Bob's namespace is his own: alice's paths do not exist there.
	_, err := d.bob.Stat(ctx, "secret/key")
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	files, err := d.bob.List(ctx, "")
	if err != nil || len(files) != 1 || files[0].Path != "mine" || files[0].Owner != "bob" {
		t.Fatalf("bob lists %v %v", files, err)
	}
	// Addressing alice's namespace is denied, existing file or not.
	asAlice := d.bob.ForOwner("alice")
	_, err = asAlice.Stat(ctx, "secret/key")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied, "alice", "bob")
	_, err = asAlice.Stat(ctx, "no/such/file")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	_, err = asAlice.Download(ctx, "secret/key", filepath.Join(t.TempDir(), "k"), nil)
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	_, err = asAlice.List(ctx, "")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	_, err = asAlice.Upload(ctx, local, "secret/key", nil)
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	err = asAlice.Delete(ctx, "secret/key")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	if _, err := d.alice.Stat(ctx, "secret/key"); err != nil {
		t.Fatal(err)
	}

	// Sharing: alice grants bob "shared".
	if err := d.alice.Grant(ctx, "bob", "shared"); err != nil {
		t.Fatal(err)
	}
	files, err = asAlice.List(ctx, "")
	if err != nil || len(files) != 2 || files[0].Path != "shared/in/a" || files[0].Owner != "alice" {
		t.Fatalf("bob lists alice's shared files: %v %v", files, err)
	}
	if _, err := asAlice.Download(ctx, "shared/in/b", filepath.Join(t.TempDir(), "b"), nil); err != nil {
		t.Fatal(err)
	}
	_, err = asAlice.Stat(ctx, "secret/key")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	err = asAlice.Delete(ctx, "shared/in/a")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
	_, received, err := d.bob.Grants(ctx)
	if err != nil || len(received) != 1 || received[0].Owner != "alice" {
		t.Fatalf("bob's grants %v %v", received, err)
	}
	if err := d.alice.Revoke(ctx, "bob", "shared"); err != nil {
		t.Fatal(err)
	}
	_, err = asAlice.Stat(ctx, "shared/in/a")
	wantCode(t, err, errdefs.IsPermissionDenied, codes.PermissionDenied)
}

func TestDataUnauthenticated(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	local, _ := randomFile(t, 5, 1000)
	for _, c := range []*dataclient.Client{d.client(t, ""), d.client(t, "wrong-token-123")} {
		_, err := c.List(ctx, "")
		wantCode(t, err, errdefs.IsUnauthenticated, codes.Unauthenticated)
		_, err = c.Upload(ctx, local, "x", nil)
		wantCode(t, err, errdefs.IsUnauthenticated, codes.Unauthenticated)
		_, err = c.ReadRange(ctx, "x", 0, 0, io.Discard)
		wantCode(t, err, errdefs.IsUnauthenticated, codes.Unauthenticated)
	}
	if files, _ := d.alice.List(ctx, ""); len(files) != 0 {
		t.Fatalf("an unauthenticated upload stored %v", files)
	}
}

func TestDataBadNames(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	api := d.alice.API
	for _, c := range []struct{ path, word string }{
		{"../etc/passwd", `".."`}, {"/abs", "absolute"}, {"a//b", "empty component"}, {"a/", "empty component"},
		{"a\x00b", "control character"}, {"a b", "' '"}, {"", "required"}, {strings.Repeat("x/", 600) + "x", "long"},
	} {
		// The server checks (the raw API), and so does the client before sending.
		stream, err := api.Upload(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Header{Header: &datav1.UploadHeader{Path: c.path}}})
		_, err = stream.CloseAndRecv()
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "path", c.word)
		_, err = api.Stat(ctx, &datav1.StatRequest{Path: c.path})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "path", c.word)
		_, err = api.Delete(ctx, &datav1.DeleteRequest{Path: c.path})
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "path")
		ds, err := api.Download(ctx, &datav1.DownloadRequest{Path: c.path})
		if err == nil {
			_, err = ds.Recv()
		}
		wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "path")
		if _, err := d.alice.Upload(ctx, writeFile(t, "x", []byte("x")), c.path, nil); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("client upload to %q: %v", c.path, err)
		}
	}
	_, err := api.List(ctx, &datav1.ListRequest{Prefix: "/x"})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "prefix")
	_, err = api.Stat(ctx, &datav1.StatRequest{Owner: "a/b", Path: "x"})
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "owner")
	err = d.alice.Grant(ctx, "", "x")
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "grantee")
	if files, _ := d.alice.List(ctx, ""); len(files) != 0 {
		t.Fatalf("stored %v", files)
	}
}

// slowReader yields data and calls hook after every read.
type slowReader struct {
	r    io.Reader
	n    int
	hook func(n int)
}

func (s *slowReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.n += n
	s.hook(s.n)
	return n, err
}

func TestDataInterruptedUploadLeavesNothing(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	_, data := randomFile(t, 6, 20<<20)

	// Cancelled mid-stream.
	cctx, cancel := context.WithCancel(ctx)
	r := &slowReader{r: bytes.NewReader(data), hook: func(n int) {
		if n >= 8<<20 {
			cancel()
		}
	}}
	_, err := d.alice.UploadReader(cctx, r, int64(len(data)), "out/result", nil)
	cancel()
	if !errors.Is(err, context.Canceled) && errdefs.Code(err) != codes.Canceled {
		t.Fatalf("cancelled upload: %v", err)
	}
	// A reader that fails mid-way aborts the upload too.
	r = &slowReader{r: io.MultiReader(bytes.NewReader(data[:3<<20]), iotestErr{}), hook: func(int) {}}
	if _, err := d.alice.UploadReader(ctx, r, -1, "out/result", nil); err == nil {
		t.Fatal("an upload from a failing reader succeeded")
	}
	// A stream that ends without a commit.
	stream, err := d.alice.API.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Header{Header: &datav1.UploadHeader{Path: "out/result"}}})
	_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Data{Data: data[:1<<20]}})
	_, err = stream.CloseAndRecv()
	wantCode(t, err, errdefs.IsInvalidArgument, codes.InvalidArgument, "without a commit")
	// A commit with the wrong digest: DataLoss.
	stream, err = d.alice.API.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Header{Header: &datav1.UploadHeader{Path: "out/result"}}})
	_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Data{Data: data[:1<<20]}})
	sum := sha256.Sum256(data[:1<<20-1])
	_ = stream.Send(&datav1.UploadRequest{Msg: &datav1.UploadRequest_Commit{Commit: &datav1.UploadCommit{Size: 1 << 20, Sha256: sum[:]}}})
	_, err = stream.CloseAndRecv()
	wantCode(t, err, nil, codes.DataLoss, "sha256")

	_, err = d.alice.Stat(ctx, "out/result")
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	if files, err := d.alice.List(ctx, ""); err != nil || len(files) != 0 {
		t.Fatalf("list %v %v", files, err)
	}
	eventually(t, "staging files removed", func() bool { return len(d.tmpEntries(t)) == 0 })
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("disk read error") }

func TestDataDeleteThenNotFound(t *testing.T) {
	d := startDataServer(t)
	ctx := ctxT(t)
	local, _ := randomFile(t, 7, 1000)
	if _, err := d.alice.Upload(ctx, local, "a/b/c", nil); err != nil {
		t.Fatal(err)
	}
	if err := d.alice.Delete(ctx, "a/b/c"); err != nil {
		t.Fatal(err)
	}
	_, err := d.alice.Stat(ctx, "a/b/c")
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound, "a/b/c")
	_, err = d.alice.ReadRange(ctx, "a/b/c", 0, 0, io.Discard)
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	err = d.alice.Delete(ctx, "a/b/c")
	wantCode(t, err, errdefs.IsNotFound, codes.NotFound)
	if files, _ := d.alice.List(ctx, "a"); len(files) != 0 {
		t.Fatalf("listed %v", files)
	}
	// The emptied directories are gone: "a" can be a file now.
	if _, err := d.alice.Upload(ctx, local, "a", nil); err != nil {
		t.Fatal(err)
	}
	_, err = d.alice.Upload(ctx, local, "a/x", nil)
	wantCode(t, err, errdefs.IsFailedPrecondition, codes.FailedPrecondition, "is a file")
}

// debugfs runs a debugfs request on image and returns its output.
func debugfs(t *testing.T, image string, args ...string) string {
	t.Helper()
	out, err := exec.Command("debugfs", append(args, image)...).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %v: %v: %s", args, err, out)
	}
	return string(out)
}

func needE2fsprogs(t *testing.T) {
	t.Helper()
	for _, p := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (e2fsprogs)", p)
		}
	}
}

func TestStageInAndOut(t *testing.T) {
	needE2fsprogs(t)
	d := startDataServer(t)
	ctx := ctxT(t)
	big, bigData := randomFile(t, 8, 3<<20+5)
	small := writeFile(t, "small", []byte("task parameters\n"))
	for p, l := range map[string]string{"job/video.raw": big, "job/conf/params.txt": small, "other": small} {
		if _, err := d.alice.Upload(ctx, l, p, nil); err != nil {
			t.Fatal(err)
		}
	}
	work := t.TempDir()
	disk := filepath.Join(work, "data.img")
	if err := datadisk.Build(ctx, d.alice, []string{"job/video.raw", "job/conf/params.txt"}, 0, disk); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(datadisk.DefaultSizeMiB(uint64(len(bigData)+16))) << 20; st.Size() != want {
		t.Fatalf("disk of %d bytes, want %d", st.Size(), want)
	}
	if ents, _ := os.ReadDir(work); len(ents) != 1 {
		t.Fatalf("left in the work directory: %v", ents)
	}
	if out := debugfs(t, disk, "-R", "cat /in/job/conf/params.txt"); !strings.Contains(out, "task parameters\n") {
		t.Fatalf("params.txt: %q", out)
	}
	dumped := filepath.Join(t.TempDir(), "video.raw")
	debugfs(t, disk, "-R", "dump /in/job/video.raw "+dumped)
	if got, _ := os.ReadFile(dumped); !bytes.Equal(got, bigData) {
		t.Fatal("video.raw differs on the data disk")
	}
	if ls := debugfs(t, disk, "-R", "ls -p /"); !strings.Contains(ls, "/040777/0/0/out//") || !strings.Contains(ls, "/040755/0/0/in//") {
		t.Fatalf("root of the data disk: %s", ls)
	}
	if ls := debugfs(t, disk, "-R", "ls -p /in/job/conf"); !strings.Contains(ls, "/100644/0/0/params.txt/16/") {
		t.Fatalf("in/job/conf: %s", ls)
	}
	if out, _ := exec.Command("dumpe2fs", "-h", disk).CombinedOutput(); !bytes.Contains(out, []byte("vmgrid-data")) {
		t.Fatalf("label: %s", out)
	}

	// Nothing written yet: nothing staged out.
	got, err := datadisk.StageOut(ctx, d.alice, disk, "out", "job/results")
	if err != nil || len(got) != 0 {
		t.Fatalf("empty stage-out: %v %v", got, err)
	}

	// The "guest" writes outputs.
	result, resultData := randomFile(t, 9, 2<<20+3)
	logf := writeFile(t, "log", []byte("done\n"))
	empty := writeFile(t, "empty", nil)
	debugfs(t, disk, "-w", "-R", "write "+result+" /out/result.raw")
	debugfs(t, disk, "-w", "-R", "mkdir /out/logs")
	debugfs(t, disk, "-w", "-R", "write "+logf+" /out/logs/run.log")
	debugfs(t, disk, "-w", "-R", "write "+empty+" /out/logs/empty")
	// A file the task left with a hole (written at an offset, never filled).
	sparse := filepath.Join(t.TempDir(), "sparse")
	sparseData := append(make([]byte, 3<<20), "tail"...)
	if err := os.WriteFile(sparse, sparseData, 0o644); err != nil {
		t.Fatal(err)
	}
	debugfs(t, disk, "-w", "-R", "write "+sparse+" /out/sparse")
	got, err = datadisk.StageOut(ctx, d.alice, disk, "out", "job/results/")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"job/results/logs/empty", "job/results/logs/run.log", "job/results/result.raw", "job/results/sparse"}
	if !slices.Equal(got, want) {
		t.Fatalf("staged out %v, want %v", got, want)
	}
	var buf bytes.Buffer
	if _, err := d.alice.ReadRange(ctx, "job/results/result.raw", 0, 0, &buf); err != nil || !bytes.Equal(buf.Bytes(), resultData) {
		t.Fatalf("result.raw: %v", err)
	}
	buf.Reset()
	if _, err := d.alice.ReadRange(ctx, "job/results/logs/run.log", 0, 0, &buf); err != nil || buf.String() != "done\n" {
		t.Fatalf("run.log %q %v", buf.String(), err)
	}
	buf.Reset()
	if _, err := d.alice.ReadRange(ctx, "job/results/sparse", 0, 0, &buf); err != nil || !bytes.Equal(buf.Bytes(), sparseData) {
		t.Fatalf("sparse: %d bytes, %v", buf.Len(), err)
	}

	// Stage-out as another owner stays in that owner's namespace.
	if got, err := datadisk.StageOut(ctx, d.bob, disk, "/out/logs/", ""); err != nil || !slices.Equal(got, []string{"empty", "run.log"}) {
		t.Fatalf("bob's stage-out: %v %v", got, err)
	}
	if files, _ := d.bob.List(ctx, ""); len(files) != 2 || files[0].Owner != "bob" {
		t.Fatalf("bob's files %v", files)
	}
	if _, err = datadisk.StageOut(ctx, d.alice, disk, "nope", "x"); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "/nope") {
		t.Fatalf("stage-out of a missing directory: %v", err)
	}
}

func TestStageInRejects(t *testing.T) {
	needE2fsprogs(t)
	d := startDataServer(t)
	ctx := ctxT(t)
	l, _ := randomFile(t, 10, 2<<20)
	for _, p := range []string{"a", "b/c"} {
		if _, err := d.alice.Upload(ctx, l, p, nil); err != nil {
			t.Fatal(err)
		}
	}
	disk := filepath.Join(t.TempDir(), "d.img")
	for _, c := range []struct {
		files []string
		size  uint64
		is    func(error) bool
	}{
		{[]string{"a", "a/x"}, 0, errdefs.IsInvalidArgument},
		{[]string{"../a"}, 0, errdefs.IsInvalidArgument},
		{[]string{"a", "b/c"}, 3, errdefs.IsInvalidArgument},
		{[]string{"missing"}, 0, errdefs.IsNotFound},
		{[]string{"a"}, 0, nil}, // shared with nobody: bob reads alice's namespace below
	} {
		client := d.alice
		if c.is == nil {
			client, c.is = d.bob.ForOwner("alice"), errdefs.IsPermissionDenied
		}
		err := datadisk.Build(ctx, client, c.files, c.size, disk)
		if !c.is(err) {
			t.Fatalf("%v (%d MiB): %v", c.files, c.size, err)
		}
		if _, err := os.Stat(disk); !os.IsNotExist(err) {
			t.Fatalf("%v: a disk was left", c.files)
		}
	}
	// With a grant, bob builds a disk from alice's files.
	if err := d.alice.Grant(ctx, "bob", "b"); err != nil {
		t.Fatal(err)
	}
	if err := datadisk.Build(ctx, d.bob.ForOwner("alice"), []string{"b/c"}, 16, disk); err != nil {
		t.Fatal(err)
	}
}

// A guest controls its data disk: names that would climb out of a
// directory, links and odd names must never reach the host's file system
// nor the repository.
func TestStageOutHostileImage(t *testing.T) {
	needE2fsprogs(t)
	d := startDataServer(t)
	ctx := ctxT(t)
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "out"), 0o777); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"abcdefg": "escape", "ok.txt": "fine", "bad name": "space"} {
		if err := os.WriteFile(filepath.Join(src, "out", name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/etc/passwd", filepath.Join(src, "out", "link")); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	disk := filepath.Join(work, "evil.img")
	// Without metadata checksums, so the test can edit a directory block.
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-O", "^has_journal,^metadata_csum", "-d", src, disk, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	img, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Count(img, []byte("abcdefg")) != 1 {
		t.Fatal("the name to rewrite is not unique in the image")
	}
	img = bytes.Replace(img, []byte("abcdefg"), []byte("../../z"), 1)
	if err := os.WriteFile(disk, img, 0o644); err != nil {
		t.Fatal(err)
	}
	if ls := debugfs(t, disk, "-R", "ls -p /out"); !strings.Contains(ls, "/../../z/") {
		t.Fatalf("the crafted name is not in the image: %s", ls)
	}

	got, err := datadisk.StageOut(ctx, d.alice, disk, "out", "res")
	if !slices.Equal(got, []string{"res/ok.txt"}) {
		t.Fatalf("staged out %v", got)
	}
	if err == nil || !strings.Contains(err.Error(), "3 of 4 entries") || !strings.Contains(err.Error(), "link") || !strings.Contains(err.Error(), "bad name") {
		t.Fatalf("error %v", err)
	}
	files, _ := d.alice.List(ctx, "")
	if len(files) != 1 {
		t.Fatalf("stored %v", files)
	}
	for _, p := range []string{filepath.Join(work, "z"), filepath.Join(filepath.Dir(work), "z"), filepath.Join(os.TempDir(), "z")} {
		if _, err := os.Lstat(p); err == nil {
			t.Fatalf("%s was written", p)
		}
	}
}
