package services

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Dial connects to a vmgrid service. Errors returned by calls on the
// connection wrap errdefs sentinels (errdefs.IsNotFound works).
func Dial(target string, tlsFiles TLSFiles, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if tlsFiles.Enabled() {
		cfg, err := tlsFiles.clientConfig()
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(cfg)
	}
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// No service config from DNS TXT records (vmgrid publishes none): a
		// resolver that never answers TXT queries — Docker's, on a compose
		// network — held every new connection for 10 s.
		grpc.WithDisableServiceConfig(),
		grpc.WithInitialWindowSize(initialWindowSize),
		grpc.WithInitialConnWindowSize(initialConnWindowSize),
		grpc.WithWriteBufferSize(bufferSize),
		grpc.WithReadBufferSize(bufferSize),
		// A server that went silent (a cut network) fails the calls in
		// flight within Time + Timeout instead of holding them; idle
		// connections do not ping.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: Keepalive.Time, Timeout: Keepalive.Timeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize), grpc.ForceCodecV2(Codec)),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return errdefs.FromGRPC(invoker(ctx, method, req, reply, cc, opts...))
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			cs, err := streamer(ctx, desc, cc, method, opts...)
			if err != nil {
				return nil, errdefs.FromGRPC(err)
			}
			return errStream{cs}, nil
		}),
	}, extra...)
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", target, err)
	}
	return cc, nil
}

type errStream struct{ grpc.ClientStream }

func (s errStream) SendMsg(m any) error { return errdefs.FromGRPC(s.ClientStream.SendMsg(m)) }
func (s errStream) RecvMsg(m any) error {
	return errdefs.FromGRPC(s.ClientStream.RecvMsg(m)) // io.EOF passes through
}
func (s errStream) CloseSend() error { return s.ClientStream.CloseSend() }
