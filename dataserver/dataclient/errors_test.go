package dataclient_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

const token = "test-token-1234"

// startServer runs a real data server on 127.0.0.1 and returns its address.
func startServer(t *testing.T) string {
	t.Helper()
	tokens := &auth.Tokens{}
	if err := tokens.Add(token, "alice"); err != nil {
		t.Fatal(err)
	}
	srv, err := dataserver.Start(context.Background(), dataserver.Config{
		Server: services.Options{Name: "dataserver", Listen: "127.0.0.1:0"},
		Store:  dataserver.StoreConfig{DataDir: t.TempDir()},
		Tokens: tokens,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv.Addr()
}

func dial(t *testing.T, addr string) *dataclient.Client {
	t.Helper()
	cc, err := dataclient.Dial(addr, services.TLSFiles{}, token)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return dataclient.NewClient(cc)
}

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("debugfs: inode 12 unreadable") }

// TestClientErrorsAreTyped: every error of the client carries a code the
// plant can map, local failures too (issue 15 item 11: stage-out failures
// came back as Unknown).
func TestClientErrorsAreTyped(t *testing.T) {
	c := dial(t, startServer(t))
	ctx := context.Background()
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		err  error
		want codes.Code
	}{
		{"missing local file", second(c.Upload(ctx, filepath.Join(dir, "nope"), "x", nil)), codes.NotFound},
		{"local directory", second(c.Upload(ctx, dir, "x", nil)), codes.InvalidArgument},
		{"reader fails", second(c.UploadReader(ctx, failingReader{}, 10, "x", nil)), codes.Internal},
		{"bad remote path", second(c.UploadReader(ctx, bytes.NewReader(nil), 0, "../x", nil)), codes.InvalidArgument},
		{"missing remote file", second(c.Stat(ctx, "nope")), codes.NotFound},
		{"download into a missing directory", second(c.Download(ctx, "nope", filepath.Join(dir, "no", "such"), nil)), codes.NotFound},
	} {
		if got := errdefs.Code(tc.err); got != tc.want {
			t.Errorf("%s: %v has code %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// TestClientErrorsTypedWithoutDial: a connection made without Dial (so
// without its error-mapping interceptors) still yields errdefs sentinels.
func TestClientErrorsTypedWithoutDial(t *testing.T) {
	addr := startServer(t)
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(auth.Credentials{Token: token, Insecure: true}), grpc.WithDefaultCallOptions(grpc.ForceCodecV2(services.Codec)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	c := dataclient.NewClient(cc)
	if _, err := c.Stat(context.Background(), "nope"); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat of a missing file: %v, want errdefs.ErrNotFound", err)
	}
	if _, err := c.ReadRange(context.Background(), "nope", 0, 0, io.Discard); !errdefs.IsNotFound(err) {
		t.Fatalf("ReadRange of a missing file: %v, want errdefs.ErrNotFound", err)
	}
}

func second[T any](_ T, err error) error { return err }
