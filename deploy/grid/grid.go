// Package grid starts a whole vmgrid on one machine (`vmgrid up`): an
// embedded etcd, an image server, N compute servers, the shop, and builds
// and publishes the tiny golden image when the warehouse lacks it.
//
// By default the grid is secure: a CA and a certificate per service in
// Dir/pki (services/pki), mutual TLS on every gRPC server and every hop
// between them, and an etcd that serves TLS only, requires client
// certificates and lets only the shop's and the plants' identities (their
// certificates' CNs) read and write the grid's keys. Config.Insecure keeps
// the plaintext mode of old (tests and benchmarks).
package grid

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/dataserver"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/pki"
	"github.com/vmgrid/vmgrid/shop"
)

// Config configures Up.
type Config struct {
	// Dir holds everything (keep it short: unix sockets live below it).
	Dir string
	// Plants is the number of compute servers (default 2).
	Plants int
	// Host is the address every server listens on (default 127.0.0.1);
	// ports are picked free unless the fixed ones below are set.
	Host string
	// Fixed ports (0: any free port). HTTPPort is the shop's HTTP/JSON API
	// and dashboard.
	ShopPort, ImagesPort, HTTPPort int
	// Golden is the image built and published when missing ("" skips).
	Golden string
	// AgentPath is the static guest agent put into golden images.
	AgentPath string
	// GuestMemoryMiB is what the guests of all plants may use together
	// (0: 80% of the host's RAM); each plant gets an equal share, so plants
	// on one host do not each count on the same memory.
	GuestMemoryMiB uint64
	// NoFsync runs etcd without fsync (tests).
	NoFsync bool
	// Insecure serves everything in plaintext, etcd without
	// authentication (tests and benchmarks); the default is mutual TLS.
	Insecure bool
	Logger   *zap.Logger
}

// Grid is a running grid.
type Grid struct {
	Etcd          *shop.EmbeddedEtcd
	Images        *imageserver.Server
	Plants        []*computeserver.Server
	Shop          *shop.Server
	Data          *dataserver.Server
	Token         string // a token of the owner "demo"
	OperatorToken string // a token of the operator (images, caches)
	// ServiceToken is the identity of the grid's services to one another
	// (plants, shop, cache proxies), in ServiceTokenFile.
	ServiceToken     string
	ServiceTokenFile string
	// TaskKeyFile signs task credentials (the shop) and checks them (the
	// data server): plants stage with those, not with a token of theirs.
	TaskKeyFile string
	TokensFile  string
	log         *zap.Logger
	tokens      *auth.Tokens
	undo        services.Undo // Close runs it: the start, backwards

	// PKI holds the CA and the services' certificates, ClientTLS the
	// client's (the CLI's): both zero when the grid is insecure.
	PKI       pki.Dir
	ClientTLS services.TLSFiles
}

func freeAddr(host string, port int) (string, error) {
	if port != 0 {
		return net.JoinHostPort(host, fmt.Sprint(port)), nil
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Up starts a grid. Stop it with Close.
func Up(ctx context.Context, cfg Config) (g *Grid, err error) {
	if cfg.Plants == 0 {
		cfg.Plants = 2
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	g = &Grid{log: services.LoggerOr(cfg.Logger)}
	defer g.undo.OnError(&err)
	for _, step := range []func(context.Context, Config) error{g.makePKI, g.startTokens, g.startEtcd, g.startImages, g.startData, g.startPlants, g.startShop} {
		if err := step(ctx, cfg); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// serve serves r until Close.
func (g *Grid) serve(r interface{ Serve(context.Context) error }) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Serve(ctx) }()
	g.undo.Push(func() { cancel(); <-done })
}

// clientName is the identity of the CLI (and of the grid's own calls, such
// as publishing the golden image); rootName is etcd's administrator.
const (
	clientName = "client"
	rootName   = "root"
)

// plantName is the name, and the identity, of the i-th plant.
func plantName(i int) string { return fmt.Sprintf("plant%d", i) }

// etcdUsers are the identities allowed into etcd: the shop and the plants.
func etcdUsers(cfg Config) []string {
	users := []string{"shop"}
	for i := range cfg.Plants {
		users = append(users, plantName(i))
	}
	return users
}

// makePKI makes (or keeps) the CA and a certificate for every service,
// valid for the grid's host and the loopback names.
func (g *Grid) makePKI(_ context.Context, cfg Config) error {
	dir := filepath.Join(cfg.Dir, "pki")
	if cfg.Insecure {
		// A secure grid's etcd keeps authentication on: plaintext clients
		// could not register there.
		if _, err := os.Stat(dir); err == nil {
			return fmt.Errorf("%s held a secure grid (its etcd requires certificates): start an insecure one in another directory", cfg.Dir)
		}
		return nil
	}
	g.PKI = pki.Dir(dir)
	hosts := []string{cfg.Host, "127.0.0.1", "::1", "localhost"}
	if h, err := os.Hostname(); err == nil {
		hosts = append(hosts, h)
	}
	names := append([]string{"etcd", rootName, "imageserver", "dataserver", clientName}, etcdUsers(cfg)...)
	if err := pki.Ensure(g.PKI, hosts, names...); err != nil {
		return err
	}
	g.ClientTLS = g.tls(clientName)
	return nil
}

// tls is what the service name serves and dials with: its certificate as
// both server and client, and the CA (none when the grid is insecure).
func (g *Grid) tls(name string) services.TLSFiles {
	if g.PKI == "" {
		return services.TLSFiles{}
	}
	return g.PKI.TLS(name)
}

func (g *Grid) startEtcd(_ context.Context, cfg Config) (err error) {
	ca, _ := freeAddr(cfg.Host, 0)
	pa, _ := freeAddr(cfg.Host, 0)
	ec := shop.EtcdServerConfig{Dir: filepath.Join(cfg.Dir, "etcd"), ClientAddr: ca, PeerAddr: pa, NoFsync: cfg.NoFsync, Logger: g.log}
	if !cfg.Insecure {
		ec.TLS, ec.Users, ec.Root = g.tls("etcd"), etcdUsers(cfg), g.tls(rootName)
	}
	if g.Etcd, err = shop.StartEtcdServer(ec); err != nil {
		return err
	}
	g.undo.Push(g.Etcd.Close)
	return nil
}

// startImages starts the image server and builds the golden image into it
// when it lacks it.
func (g *Grid) startImages(ctx context.Context, cfg Config) error {
	ia, err := freeAddr(cfg.Host, cfg.ImagesPort)
	if err != nil {
		return err
	}
	if g.Images, err = imageserver.Start(ctx, imageserver.Config{
		Server: services.Options{Name: "imageserver", Listen: ia, Logger: g.log.Named("imageserver"), TLS: g.tls("imageserver")},
		Store:  imageserver.StoreConfig{DataDir: filepath.Join(cfg.Dir, "images")}, Tokens: g.tokens,
	}); err != nil {
		return err
	}
	g.serve(g.Images)
	if cfg.Golden == "" {
		return nil
	}
	return ensureGolden(ctx, cfg, g.Images.Addr(), g.ClientTLS, g.OperatorToken, g.log)
}

// startTokens keeps the grid's tokens file, service token file and task
// key in cfg.Dir (made on the first start, reused on the next).
func (g *Grid) startTokens(_ context.Context, cfg Config) (err error) {
	if g.TokensFile, err = g.tokensFile(cfg.Dir); err != nil {
		return err
	}
	if g.tokens, err = auth.Load(g.TokensFile); err != nil {
		return err
	}
	g.ServiceTokenFile = filepath.Join(cfg.Dir, "service.token")
	if err := os.WriteFile(g.ServiceTokenFile, []byte(g.ServiceToken+"\n"), 0o600); err != nil {
		return err
	}
	g.TaskKeyFile, err = taskKeyFile(cfg.Dir)
	return err
}

func (g *Grid) startData(ctx context.Context, cfg Config) (err error) {
	if g.Data, err = dataserver.Start(ctx, dataserver.Config{
		Server: services.Options{Name: "dataserver", Listen: net.JoinHostPort(cfg.Host, "0"), Logger: g.log.Named("dataserver"), TLS: g.tls("dataserver")},
		Store:  dataserver.StoreConfig{DataDir: filepath.Join(cfg.Dir, "data")}, Tokens: g.tokens, TaskKeyFile: g.TaskKeyFile,
	}); err != nil {
		return err
	}
	g.serve(g.Data)
	return nil
}

func (g *Grid) startPlants(ctx context.Context, cfg Config) error {
	memory, err := plantMemoryMiB(cfg)
	if err != nil {
		return err
	}
	for i := range cfg.Plants {
		name := plantName(i)
		// The plant's certificate serves its API and is its client
		// certificate to the image server, the data server and etcd.
		pl, err := computeserver.Start(ctx, computeserver.Config{
			DataServer: g.Data.Addr(),
			Server:     services.Options{Name: "computeserver", Listen: net.JoinHostPort(cfg.Host, "0"), Logger: g.log.Named(name), TLS: g.tls(name)},
			Upstream:   g.Images.Addr(), UpstreamTLS: g.tls(name), DataDir: filepath.Join(cfg.Dir, fmt.Sprintf("p%d", i)),
			Name: name, Etcd: g.etcdConfig(name), GuestMemoryMiB: memory,
			Tokens: g.tokens, ServiceTokenFile: g.ServiceTokenFile,
		})
		if err != nil {
			return fmt.Errorf("plant %d: %w", i, err)
		}
		g.Plants = append(g.Plants, pl)
		g.serve(pl)
	}
	return nil
}

// plantMemoryMiB is each plant's share of the guest memory of the host.
func plantMemoryMiB(cfg Config) (uint64, error) {
	total := cfg.GuestMemoryMiB
	if total == 0 {
		total = plant.DefaultMemoryMiB()
	}
	return max(total/uint64(cfg.Plants), 1), nil
}

func (g *Grid) startShop(ctx context.Context, cfg Config) error {
	sa, err := freeAddr(cfg.Host, cfg.ShopPort)
	if err != nil {
		return err
	}
	ha, err := freeAddr(cfg.Host, cfg.HTTPPort)
	if err != nil {
		return err
	}
	if g.Shop, err = shop.Start(ctx, shop.RunConfig{
		Server: services.Options{Name: "shop", Listen: sa, Logger: g.log.Named("shop"), TLS: g.tls("shop")},
		Etcd:   g.etcdConfig("shop"), Images: g.Images.Addr(), Tokens: g.tokens, DataServer: g.Data.Addr(), HTTPListen: ha,
		ServiceTokenFile: g.ServiceTokenFile, TaskKeyFile: g.TaskKeyFile,
	}); err != nil {
		return err
	}
	g.serve(g.Shop)
	return nil
}

// etcdConfig is how the service name reaches etcd: with its certificate,
// whose CN is its etcd user.
func (g *Grid) etcdConfig(name string) services.EtcdConfig {
	c := services.DefaultEtcdConfig()
	c.Endpoints, c.TLS = []string{g.Etcd.Endpoint}, g.tls(name)
	return c
}

// tokensFile keeps a tokens file in dir with a token for the owner
// "demo", one for the operator and the services' token (and reuses them on
// the next start).
func (g *Grid) tokensFile(dir string) (string, error) {
	path := filepath.Join(dir, "tokens")
	if b, err := os.ReadFile(path); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			switch f := strings.Fields(line); {
			case len(f) == 2 && f[1] == "demo" || len(f) == 3 && f[1] == "demo" && f[2] == "owner":
				g.Token = f[0]
			case len(f) == 3 && f[2] == "operator":
				g.OperatorToken = f[0]
			case len(f) == 3 && f[2] == "service":
				g.ServiceToken = f[0]
			}
		}
		if g.Token != "" && g.OperatorToken != "" && g.ServiceToken != "" {
			return path, nil
		}
	}
	g.Token, g.OperatorToken, g.ServiceToken = randomToken(), randomToken(), randomToken()
	content := "# TOKEN NAME [owner|operator|publisher|service] (see vmgrid README, \"Who may call what\")\n" +
		g.Token + " demo owner\n" + g.OperatorToken + " operator operator\n" + g.ServiceToken + " vmgrid service\n"
	return path, os.WriteFile(path, []byte(content), 0o600)
}

// taskKeyFile keeps the task key in dir (and reuses it on the next start).
func taskKeyFile(dir string) (string, error) {
	path := filepath.Join(dir, "task.key")
	if _, err := auth.LoadTaskKey(path); err == nil {
		return path, nil
	}
	return path, auth.NewTaskKeyFile(path)
}

func randomToken() string {
	var r [16]byte
	_, _ = rand.Read(r[:])
	return hex.EncodeToString(r[:])
}

// ensureGolden builds and publishes the golden image unless the warehouse
// has it.
func ensureGolden(ctx context.Context, cfg Config, images string, tlsFiles services.TLSFiles, token string, log *zap.Logger) error {
	cc, err := services.Dial(images, tlsFiles, services.WithToken(token, tlsFiles))
	if err != nil {
		return err
	}
	defer cc.Close()
	cl := imageclient.NewClient(cc)
	if _, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: cfg.Golden}); err == nil {
		return nil
	} else if !errdefs.IsNotFound(err) {
		return err
	}
	if cfg.AgentPath == "" {
		return errors.New("no guest agent binary to build the golden image with")
	}
	log.Info("building the golden image (first start only)", zap.String("image", cfg.Golden))
	work := filepath.Join(cfg.Dir, "build")
	defer os.RemoveAll(work)
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	_, err = plant.BuildGolden(bctx, plant.GoldenOptions{
		Name: cfg.Golden, WorkDir: work, Driver: &vmm.QEMU{Logger: log}, Publish: cl, Logger: log,
		Recipe: &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": cfg.AgentPath}, Logger: log},
	})
	return err
}

// URL is the shop's dashboard and HTTP/JSON API.
func (g *Grid) URL() string { return g.Shop.HTTP.URL() }

// Close stops everything: the shop, the plants (their VMs are stopped and
// views unmounted), the data and image servers, etcd.
func (g *Grid) Close() { g.undo.Run() }
