package services

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/validator"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/encoding/gzip" // clients on slow links ask for FULL manifests gzipped (gvfs.Upstream.Manifest)
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Transport tuning shared by servers and clients: large flow-control windows
// and buffers so one stream carries bulk block traffic at memory speed.
const (
	initialWindowSize     = 16 << 20
	initialConnWindowSize = 64 << 20
	bufferSize            = 1 << 20
	// MaxMessageSize bounds what a client accepts from the servers it chose
	// to dial (a full manifest of a large image is tens of MiB).
	MaxMessageSize = 256 << 20
	// DefaultMaxRecvMsgSize bounds what a server reads of one request
	// message. gRPC reads a unary request whole before any interceptor (so
	// before authentication) runs: a large limit lets anyone who can
	// connect make the server allocate it. Streams carry data in chunks of
	// at most 4 MiB (PublishData, UploadRequest), so 4 MiB and room for the
	// envelope is enough for every method but WriteBlocks (see
	// Options.MaxRecvMsgSize). Requests carry tighter limits in Validate.
	DefaultMaxRecvMsgSize = 4<<20 + 64<<10
)

// Options configure a Server.
type Options struct {
	// Name of the service in logs, e.g. "imageserver".
	Name string
	// Listen is the gRPC address, e.g. "127.0.0.1:7070" (port 0 picks one).
	Listen string
	// MetricsListen is the Prometheus /metrics HTTP address; empty disables it.
	MetricsListen string
	TLS           TLSFiles
	Logger        *zap.Logger
	// ShutdownTimeout bounds GracefulStop (default 10s).
	ShutdownTimeout time.Duration
	// UnaryInterceptors and StreamInterceptors run after logging and before
	// validation (authentication, for instance).
	UnaryInterceptors  []grpc.UnaryServerInterceptor
	StreamInterceptors []grpc.StreamServerInterceptor
	// Registry receives the gRPC metrics and the service's own; a new one is
	// made when nil (so several servers can live in one process).
	Registry *prometheus.Registry
	// MaxRecvMsgSize bounds one received message (0: DefaultMaxRecvMsgSize);
	// raise it only for a server with a method that needs it.
	MaxRecvMsgSize int
}

// AddFlags registers --listen and --metrics-listen with o's values as
// defaults.
func (o *Options) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Listen, "listen", o.Listen, "gRPC address to listen on")
	fs.StringVar(&o.MetricsListen, "metrics-listen", o.MetricsListen, "Prometheus /metrics address (empty: off)")
}

// AddShutdownFlag registers --shutdown-timeout.
func (o *Options) AddShutdownFlag(fs *pflag.FlagSet) {
	fs.DurationVar(&o.ShutdownTimeout, "shutdown-timeout", o.ShutdownTimeout, "how long a graceful stop waits for running calls (0: 10s)")
}

// Server is a gRPC server with everything every vmgrid service has.
type Server struct {
	GRPC     *grpc.Server
	Health   *health.Server
	Registry *prometheus.Registry

	log      *zap.Logger
	lis      net.Listener
	mlis     net.Listener
	httpSrv  *http.Server
	timeout  time.Duration
	stopOnce sync.Once
	stopping atomic.Bool // Shutdown began: Accept errors are expected
}

// NewServer listens on opts.Listen (and opts.MetricsListen), assembles the
// interceptor chain and calls register to add the service implementations
// and their metrics; an error from register is returned as it is.
func NewServer(opts Options, register func(s *grpc.Server, reg prometheus.Registerer) error) (*Server, error) {
	log := LoggerOr(opts.Logger).With(zap.String("service", opts.Name))
	reg := opts.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	metrics := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram())
	if err := reg.Register(metrics); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	serverOpts, err := serverOptions(opts, metrics, log)
	if err != nil {
		return nil, err
	}
	gs := grpc.NewServer(serverOpts...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	if err := register(gs, reg); err != nil {
		return nil, err
	}
	metrics.InitializeMetrics(gs)
	for name := range gs.GetServiceInfo() {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	s := &Server{GRPC: gs, Health: hs, Registry: reg, log: log, timeout: opts.ShutdownTimeout}
	if s.timeout <= 0 {
		s.timeout = 10 * time.Second
	}
	if err := s.listen(opts.Listen, opts.MetricsListen); err != nil {
		return nil, err
	}
	return s, nil
}

// serverOptions is the interceptor chain (metrics, logging, errors, the
// caller's, decode errors, validation, recovery) and the transport tuning.
func serverOptions(opts Options, metrics *grpcprom.ServerMetrics, log *zap.Logger) ([]grpc.ServerOption, error) {
	recoveryOpt := recovery.WithRecoveryHandler(func(p any) error {
		log.Error("panic in handler", zap.Any("panic", p), zap.Stack("stack"))
		return status.Errorf(codes.Internal, "internal error: %v", p)
	})
	logOpts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithLevels(codeToLevel),
		logging.WithErrorFields(func(error) logging.Fields { return nil }),
	}
	zl := InterceptorLogger(log)
	maxRecv := opts.MaxRecvMsgSize
	if maxRecv <= 0 {
		maxRecv = DefaultMaxRecvMsgSize
	}
	serverOpts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(append(append([]grpc.UnaryServerInterceptor{
			metrics.UnaryServerInterceptor(),
			logging.UnaryServerInterceptor(zl, logOpts...),
			unaryErrors,
			unaryDecodeErrors,
		}, opts.UnaryInterceptors...),
			validator.UnaryServerInterceptor(),
			recovery.UnaryServerInterceptor(recoveryOpt),
		)...),
		grpc.ChainStreamInterceptor(append(append([]grpc.StreamServerInterceptor{
			metrics.StreamServerInterceptor(),
			logging.StreamServerInterceptor(zl, logOpts...),
			streamErrors,
			streamDecodeErrors,
		}, opts.StreamInterceptors...),
			validator.StreamServerInterceptor(),
			recovery.StreamServerInterceptor(recoveryOpt),
		)...),
		grpc.InitialWindowSize(initialWindowSize),
		grpc.InitialConnWindowSize(initialConnWindowSize),
		grpc.WriteBufferSize(bufferSize),
		grpc.ReadBufferSize(bufferSize),
		grpc.MaxRecvMsgSize(maxRecv),
		grpc.MaxSendMsgSize(MaxMessageSize),
		grpc.ForceServerCodecV2(serverCodec{}),
	}
	serverOpts = append(serverOpts, KeepaliveOptions()...)
	if opts.TLS.Enabled() {
		cfg, err := opts.TLS.serverConfig()
		if err != nil {
			return nil, err
		}
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewTLS(cfg)))
	}
	return serverOpts, nil
}

// Keepalive is how a server finds a client that went silent: a cut
// network sends no reset, and TCP alone gives up only after its
// retransmissions (about 15 min). After Time without a frame the server
// pings; a ping unanswered within Timeout closes the connection, and its
// streams end: a migration's destination then removes the machine it was
// preparing, a cache proxy's reads stop. Clients (Dial) ping as often,
// which the server permits. Tests shorten it.
var Keepalive = keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 20 * time.Second}

// KeepaliveOptions are the keepalive options of a vmgrid server: it pings
// silent clients (Keepalive) and lets clients ping it as often as Dial's
// do. A gRPC server without them (a test's fake) would take Dial's pings
// for abuse and send GOAWAY.
func KeepaliveOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveParams(Keepalive),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	}
}

// listen opens the gRPC listener and, when metricsAddr is set, the
// /metrics one.
func (s *Server) listen(addr, metricsAddr string) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	s.lis = lis
	if metricsAddr == "" {
		return nil
	}
	mlis, err := net.Listen("tcp", metricsAddr)
	if err != nil {
		lis.Close()
		return fmt.Errorf("listen %s (metrics): %w", metricsAddr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{Registry: s.Registry}))
	s.mlis = mlis
	s.httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return nil
}

// Addr is the address the gRPC server listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// MetricsAddr is the /metrics address, or "" when metrics are off.
func (s *Server) MetricsAddr() string {
	if s.mlis == nil {
		return ""
	}
	return s.mlis.Addr().String()
}

// Serve serves until ctx ends, then shuts down gracefully. It returns nil
// after a shutdown and the serve error otherwise.
func (s *Server) Serve(ctx context.Context) error {
	if s.httpSrv != nil {
		go func() {
			if err := s.httpSrv.Serve(s.mlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Warn("metrics server stopped", zap.Error(err))
			}
		}()
	}
	s.log.Info("serving", zap.String("addr", s.Addr()), zap.String("metrics", s.MetricsAddr()))
	errc := make(chan error, 1)
	go func() { errc <- s.GRPC.Serve(s.lis) }()
	select {
	case <-ctx.Done():
		s.Shutdown()
		<-errc
		return nil
	case err := <-errc:
		// Shutdown closes the listener under a running Serve: that is a stop,
		// not a failure.
		stopped := s.stopping.Load()
		s.Shutdown()
		if stopped {
			return nil
		}
		return err
	}
}

// Shutdown reports NOT_SERVING, drains running calls for up to the
// shutdown timeout, then stops hard. It is safe to call more than once.
func (s *Server) Shutdown() {
	s.stopOnce.Do(func() {
		s.stopping.Store(true)
		s.Health.Shutdown()
		s.lis.Close() // in case Serve never ran; GracefulStop closes it otherwise
		done := make(chan struct{})
		go func() { s.GRPC.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(s.timeout):
			s.log.Warn("graceful stop timed out; stopping", zap.Duration("timeout", s.timeout))
			s.GRPC.Stop()
			<-done
		}
		if s.httpSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = s.httpSrv.Shutdown(ctx)
			cancel()
		}
		s.log.Info("stopped")
	})
}

func unaryErrors(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	return resp, errdefs.ToGRPC(err)
}

func streamErrors(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return errdefs.ToGRPC(h(srv, ss))
}
