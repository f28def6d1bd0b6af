package services

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/internal/testutil/cutproxy"
)

// rawCodec sends []byte as the message, whatever it holds: what an
// attacker's client does.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

func startHealthOnly(t *testing.T) *grpc.ClientConn {
	t.Helper()
	srv, err := NewServer(Options{Name: "test", Listen: "127.0.0.1:0"}, func(*grpc.Server, prometheus.Registerer) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	cc, err := grpc.NewClient(srv.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func rawCall(cc *grpc.ClientConn, method string, msg []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []byte
	return cc.Invoke(ctx, method, &msg, &out)
}

// An unauthenticated caller must not make a server read (allocate) a large
// message: the audit took a process from 195 MB to 3.17 GB with four
// 250 MiB unary calls.
func TestOversizedMessageRefusedUnread(t *testing.T) {
	cc := startHealthOnly(t)
	big := make([]byte, 64<<20)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 4 {
		err := rawCall(cc, "/grpc.health.v1.Health/Check", big)
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("a 64 MiB request: %v, want ResourceExhausted", err)
		}
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 32<<20 {
		t.Fatalf("four refused 64 MiB requests allocated %d MiB in the process", grew>>20)
	}
	// A request within the limit still works.
	if err := rawCall(cc, "/grpc.health.v1.Health/Check", nil); err != nil {
		t.Fatal(err)
	}
}

// A request that is not valid protobuf is the caller's mistake.
func TestMalformedRequestIsInvalidArgument(t *testing.T) {
	cc := startHealthOnly(t)
	bad := []byte{0x0a, 0x05, 'a'} // field 1, 5 bytes announced, 1 sent
	if err := rawCall(cc, "/grpc.health.v1.Health/Check", bad); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("unary: %v, want InvalidArgument", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/grpc.health.v1.Health/Watch")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SendMsg(&bad); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseSend()
	var out []byte
	if err := st.RecvMsg(&out); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("stream: %v, want InvalidArgument", err)
	}
	n := 0
	decodeErrs.Range(func(any, any) bool { n++; return true })
	if n != 0 {
		t.Fatalf("%d decode errors left behind", n)
	}
}

// A client that goes silent mid-stream (a cut network) ends the server's
// side of its streams within Keepalive.Time + Timeout: what lets a
// migration's destination clean up when its source can no longer reach
// it. Without the keepalive the stream would wait for TCP to give up.
func TestSilentClientEndsItsStreams(t *testing.T) {
	defer func(k keepalive.ServerParameters) { Keepalive = k }(Keepalive)
	Keepalive = keepalive.ServerParameters{Time: time.Second, Timeout: time.Second}
	started, ended := make(chan struct{}, 1), make(chan time.Time, 1)
	hold := grpc.ServiceDesc{ServiceName: "test.Hold", HandlerType: (*any)(nil), Streams: []grpc.StreamDesc{{
		StreamName: "Hold", ServerStreams: true, ClientStreams: true,
		Handler: func(_ any, ss grpc.ServerStream) error {
			started <- struct{}{}
			<-ss.Context().Done()
			ended <- time.Now()
			return nil
		},
	}}}
	srv, err := NewServer(Options{Name: "test", Listen: "127.0.0.1:0", ShutdownTimeout: time.Second}, func(gs *grpc.Server, _ prometheus.Registerer) error {
		gs.RegisterService(&hold, struct{}{})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	px := cutproxy.Start(t, srv.Addr())
	cc, err := grpc.NewClient(px.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	sctx, scancel := context.WithCancel(context.Background())
	defer scancel()
	if _, err := cc.NewStream(sctx, &hold.Streams[0], "/test.Hold/Hold"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the stream never reached the server")
	}
	cutAt := time.Now()
	px.Cut()
	select {
	case at := <-ended:
		t.Logf("the server ended the silent client's stream %v after the cut", at.Sub(cutAt).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("the server still holds the stream of a client that went silent 15 s ago")
	}
}
