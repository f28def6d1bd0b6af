// Package testutil starts a real imageserver for tests and benchmarks: a
// Store in a directory, the ImageService on services.NewServer listening on
// 127.0.0.1:0, and a client connection made with services.Dial. Server logs
// are kept in memory and printed only when the test fails.
package testutil

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/services"
)

// Server is a running imageserver and a client connected to it.
type Server struct {
	Dir    string // the Store's directory
	Store  *imageserver.Store
	Srv    *services.Server
	Conn   *grpc.ClientConn
	Client *imageclient.Client

	tb       testing.TB
	cancel   context.CancelFunc
	served   chan error
	stopOnce sync.Once
}

// StartServer opens a Store in dir (a new temporary directory when dir is
// empty) and serves it on 127.0.0.1 with a port picked by the kernel. The
// server is stopped when the test ends; Stop stops it earlier.
func StartServer(tb testing.TB, dir string) *Server {
	tb.Helper()
	if dir == "" {
		dir = tb.TempDir()
	}
	buf := &lockedBuffer{}
	log := zap.New(zapcore.NewCore(
		zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig()),
		zapcore.AddSync(buf), zap.InfoLevel))

	store, err := imageserver.OpenStore(dir, log)
	if err != nil {
		tb.Fatalf("open store: %v", err)
	}
	srv, err := services.NewServer(services.Options{
		Name:            "imageserver",
		Listen:          "127.0.0.1:0",
		Logger:          log,
		ShutdownTimeout: 5 * time.Second,
	}, func(gs *grpc.Server, reg prometheus.Registerer) error {
		svc, err := imageserver.NewService(store, log, reg)
		if err == nil {
			svc.Register(gs)
		}
		return err
	})
	if err != nil {
		tb.Fatalf("new server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{Dir: dir, Store: store, Srv: srv, tb: tb, cancel: cancel, served: make(chan error, 1)}
	go func() { s.served <- srv.Serve(ctx) }()

	cc, err := services.Dial(srv.Addr(), services.TLSFiles{})
	if err != nil {
		s.Stop()
		tb.Fatalf("dial: %v", err)
	}
	s.Conn = cc
	s.Client = imageclient.NewClient(cc)
	tb.Cleanup(func() {
		s.Stop()
		if tb.Failed() {
			tb.Logf("imageserver log:\n%s", buf.String())
		}
	})
	return s
}

// Stop closes the client connection and shuts the server down gracefully.
// It is safe to call more than once.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		if s.Conn != nil {
			s.Conn.Close()
		}
		s.cancel()
		if err := <-s.served; err != nil {
			s.tb.Errorf("serve: %v", err)
		}
	})
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
