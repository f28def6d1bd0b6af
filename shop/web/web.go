package web

import (
	"context"
	"crypto/tls"
	"embed"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
)

//go:embed static
var static embed.FS

// maxBody bounds a request body (the gRPC server bounds the message).
const maxBody = 16 << 20

// Config configures the HTTP side of a shop.
type Config struct {
	// Listen is the HTTP address (host:port; port 0 picks one).
	Listen string
	// Shop is the shop's gRPC address the API gateway dials, with TLS;
	// with a certificate in TLS the HTTP side serves HTTPS with it too
	// (no client certificates: HTTP callers bring bearer tokens).
	Shop string
	TLS  services.TLSFiles
	// Auth authenticates the events stream (the API is authenticated by
	// the shop itself).
	Auth   *auth.Authenticator
	Source Source
	// StatsInterval is how often the plants' caches are asked (default 2s).
	StatsInterval time.Duration
	Logger        *zap.Logger
}

// Server is a running HTTP side.
type Server struct {
	cfg Config
	log *zap.Logger
	ln  net.Listener
	srv *http.Server
	cc  *grpc.ClientConn
	hub *hub
	// https: the listener speaks TLS.
	https bool
	done  chan struct{}
	undo  services.Undo // Close runs it
}

// Start listens and serves until Close.
func Start(ctx context.Context, cfg Config) (_ *Server, err error) {
	if cfg.StatsInterval <= 0 {
		cfg.StatsInterval = 2 * time.Second
	}
	s := &Server{cfg: cfg, log: services.LoggerOr(cfg.Logger), done: make(chan struct{})}
	undo := &s.undo
	defer undo.OnError(&err)
	if s.cc, err = services.Dial(cfg.Shop, cfg.TLS); err != nil {
		return nil, err
	}
	undo.Push(func() { s.cc.Close() })
	gw, err := newGateway(ctx, s.cc)
	if err != nil {
		return nil, err
	}
	s.hub = startHub(cfg.Source, cfg.StatsInterval, s.log)
	undo.Push(s.hub.close)
	if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, err
	}
	tc, err := cfg.TLS.HTTPSConfig()
	if err != nil {
		s.ln.Close()
		return nil, err
	}
	if tc != nil {
		s.ln, s.https = tls.NewListener(s.ln, tc), true
	}
	s.srv = &http.Server{Handler: s.routes(gw), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: zap.NewStdLog(s.log.Named("http"))}
	// Event streams never go idle: they end when the hub closes.
	s.srv.RegisterOnShutdown(s.hub.close)
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("http server", zap.Error(err))
		}
	}()
	undo.Push(s.shutdown)
	return s, nil
}

func (s *Server) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	<-s.done
}

func (s *Server) routes(gw http.Handler) http.Handler {
	assets, _ := fs.Sub(static, "static")
	mux := http.NewServeMux()
	mux.Handle("/v1/", gw)
	mux.HandleFunc("GET /v1/events", s.events)
	mux.Handle("/", http.FileServerFS(assets))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		mux.ServeHTTP(w, r)
	})
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// URL is the dashboard's (and the API's) base URL.
func (s *Server) URL() string {
	if s.https {
		return "https://" + s.Addr() + "/"
	}
	return "http://" + s.Addr() + "/"
}

// Close stops serving: open event streams end, the gateway's connection
// closes. It is safe to call more than once.
func (s *Server) Close() { s.undo.Run() }
