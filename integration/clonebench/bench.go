package clonebench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/services"
)

// Options configure Run.
type Options struct {
	// RTT is the WAN's round trip, half each way (toxiproxy's latency
	// toxic works in whole milliseconds).
	RTT time.Duration
	// BandwidthMbit is the WAN's bandwidth in Mbit/s, each direction.
	BandwidthMbit float64
	// Repeats of every row (at least 1).
	Repeats int
	// Plants that clone at once in the parallel rows (at least 1).
	Plants int
	// Compress makes the plants and the cache proxy ask for zstd blocks on
	// the WAN (computeserver.Config.Compress).
	Compress bool
	// Agent is the static guest agent (cmd/vmgrid-agent) put into the
	// golden image; empty builds it with the go tool.
	Agent string
	// WorkDir is where the run's temporary directory is made (default: the
	// system's). Keep it short: unix sockets live below it.
	WorkDir string
	// Logger receives progress; ServerLogger the logs of the servers and guests
	// the run starts (nil: Log at warn level).
	Logger, ServerLogger *zap.Logger
	// Rows to measure, by key (RowLocal, …; RowWarm comes with RowCold,
	// RowLimit needs both RowLocal and RowCold); empty means every row.
	Rows []string
	// GuestCmdline is appended to the golden image's kernel command line
	// (experiments; the tiny recipe already boots with init_on_free=1).
	GuestCmdline []string
	// Keep leaves the run's directory (golden image, logs) in place.
	Keep bool
	// Command is recorded in the results.
	Command string
	// Recipe builds the golden image: RecipeTiny (the default) or
	// RecipeDebian, with Packages on top of its base set.
	Recipe   string
	Packages []string
	// Golden, when set, supplies the golden image instead of a recipe
	// (vmgrid bench clone --image: a published image fetched into dir);
	// Image names it in the results.
	Golden func(ctx context.Context, dir string) (*plant.Golden, error)
	Image  string
}

// Recipes of Options.Recipe.
const (
	RecipeTiny   = "tiny"
	RecipeDebian = "debian"
)

// Defaults of Options.
const (
	DefaultRTT           = 40 * time.Millisecond
	DefaultBandwidthMbit = 100
	DefaultRepeats       = 3
	DefaultPlants        = 4
)

// Row keys, in table order.
const (
	RowLocal         = "local"
	RowFullCopy      = "full_copy"
	RowNBD           = "qemu_nbd"
	RowCold          = "vmgrid_cold"
	RowWarm          = "vmgrid_warm"
	RowL2            = "vmgrid_l2"
	RowParallel      = "vmgrid_parallel"
	RowLimit         = "limit"
	RowParallelLocal = "parallel_local"
	RowParallelL2    = "parallel_l2"
	// Lazy memory (lazy.go).
	RowLazy        = "vmgrid_lazy"
	RowLazyProfile = "vmgrid_lazy_profile"
	RowDemandIdle  = "demand_read_idle"
	RowDemandBulk  = "demand_read_bulk"
	RowWarmLazy    = "vmgrid_warm_lazy"
	RowAuto        = "vmgrid_auto"
	// The image built with 4x the guest RAM.
	RowLazy4x        = "vmgrid_lazy_4x"
	RowLazyProfile4x = "vmgrid_lazy_profile_4x"
	// The run-time cost of a lazy restore.
	RowWorkEager = "workload_eager"
	RowWorkLazy  = "workload_lazy"
)

// image is the golden image's name on the run's own image server; image4x
// the same recipe built with 4x the guest RAM (the 4x rows).
const (
	image   = "golden"
	image4x = "golden4x"
)

// bench is one run in progress.
type bench struct {
	opts   Options
	log    *zap.Logger
	srvLog *zap.Logger
	driver vmm.Driver
	work   string

	golden     *plant.Golden
	goldenPath map[string]string // image file name → image-side path
	// The image with 4x the RAM (nil with --image) and its files.
	golden4x     *plant.Golden
	golden4xPath map[string]string
	localDir     string // the golden files on the compute side's disk
	wan          *WAN
	imagesWAN    string // the image server, across the WAN
	copyWAN      string // the file server, across the WAN
	nbdURL       string // qemu-nbd, across the WAN
	l2           *cacheProxy
	id           identity // the servers' tokens (startImageServer makes them)

	rows map[string]*Row

	undo services.Undo // what the run started, stopped in reverse
}

func (b *bench) defer_(f func()) { b.undo.Push(f) }

// Run runs the benchmark and returns its results. Everything it started is
// stopped and removed when it returns.
func Run(ctx context.Context, opts Options) (res *Results, err error) {
	if opts.RTT < 0 || opts.BandwidthMbit < 0 {
		return nil, fmt.Errorf("negative RTT (%v) or bandwidth (%v Mbit/s)", opts.RTT, opts.BandwidthMbit)
	}
	if opts.Recipe == "" {
		opts.Recipe = RecipeTiny
	}
	if opts.Recipe != RecipeTiny && opts.Recipe != RecipeDebian {
		return nil, fmt.Errorf("unknown recipe %q: the recipes are %s and %s", opts.Recipe, RecipeTiny, RecipeDebian)
	}
	opts.Repeats, opts.Plants = max(opts.Repeats, 1), max(opts.Plants, 1)
	for _, k := range opts.Rows {
		if !slices.ContainsFunc(rowInfo, func(r rowDesc) bool { return r.key == k }) {
			return nil, fmt.Errorf("no row %q", k)
		}
	}
	opts.Logger = services.LoggerOr(opts.Logger)
	if opts.ServerLogger == nil {
		opts.ServerLogger = services.Quieter(opts.Logger, zap.WarnLevel)
	}
	for _, bin := range []string{"qemu-system-x86_64", "qemu-img", "qemu-nbd"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s is not installed (qemu-system-x86, qemu-utils): %w", bin, err)
		}
	}
	b := &bench{opts: opts, log: opts.Logger, srvLog: opts.ServerLogger, rows: map[string]*Row{}}
	b.driver = &vmm.QEMU{Logger: b.srvLog}
	defer b.undo.Run()
	started := time.Now()
	if b.work, err = os.MkdirTemp(opts.WorkDir, "vgcb"); err != nil {
		return nil, err
	}
	b.defer_(func() {
		if opts.Keep {
			b.log.Info("kept the run's directory", zap.String("dir", b.work))
			return
		}
		os.RemoveAll(b.work)
	})
	res = &Results{Command: opts.Command, Started: started.UTC(), Machine: describeMachine()}
	if err := b.setup(ctx, res); err != nil {
		return nil, err
	}
	for rep := range opts.Repeats {
		if err := b.repeat(ctx, rep); err != nil {
			return nil, fmt.Errorf("repeat %d: %w", rep+1, err)
		}
	}
	b.finish(res)
	res.Machine.Load[1] = loadAvg()
	res.TookSeconds = time.Since(started).Seconds()
	return res, nil
}

func (b *bench) dir(name string) (string, error) {
	d := filepath.Join(b.work, name)
	return d, os.MkdirAll(d, 0o755)
}

// setup builds and publishes the golden image, copies it to the compute
// side's disk, and starts the image side (image server, file server,
// qemu-nbd), the WAN and the warm cache proxy.
func (b *bench) setup(ctx context.Context, res *Results) error {
	agentPath := b.opts.Agent
	if agentPath == "" {
		var err error
		if agentPath, err = BuildAgent(ctx, b.work); err != nil {
			return err
		}
	}
	images, cc, err := b.startImageServer(ctx)
	if err != nil {
		return err
	}
	if err := b.buildGolden(ctx, cc, agentPath, res); err != nil {
		return err
	}
	if b.wants(RowLazyProfile4x) {
		if err := b.setup4x(ctx, cc, agentPath); err != nil {
			return err
		}
	}
	if err := b.startImageSide(ctx, images); err != nil {
		return err
	}
	if !b.wants(RowL2) {
		return nil
	}
	return b.startL2(ctx)
}

// startImageServer starts the in-process image server and a connection
// to it.
func (b *bench) startImageServer(ctx context.Context) (addr string, cc *grpc.ClientConn, err error) {
	isDir, err := b.dir("is")
	if err != nil {
		return "", nil, err
	}
	if b.id, err = newIdentity(isDir); err != nil {
		return "", nil, err
	}
	srv, err := imageserver.Start(ctx, imageserver.Config{
		Server: services.Options{Name: "imageserver", Listen: "127.0.0.1:0", Logger: b.srvLog.Named("imageserver"), ShutdownTimeout: 5 * time.Second},
		Store:  imageserver.StoreConfig{DataDir: filepath.Join(isDir, "store")}, Tokens: b.id.tokens,
	})
	if err != nil {
		return "", nil, fmt.Errorf("image server: %w", err)
	}
	sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	served := make(chan struct{})
	go func() { srv.Serve(sctx); close(served) }() //nolint:errcheck // logged by the server
	b.defer_(func() { stop(); <-served })
	if cc, err = b.id.dial(srv.Addr()); err != nil {
		return "", nil, err
	}
	b.defer_(func() { cc.Close() })
	return srv.Addr(), cc, nil
}

// buildGolden builds and publishes the golden image and copies its files
// to the compute side's disk (the local row's).
func (b *bench) buildGolden(ctx context.Context, cc *grpc.ClientConn, agentPath string, res *Results) error {
	b.log.Info("building the golden image", zap.String("image", image))
	start := time.Now()
	gdir, err := b.dir("golden")
	if err != nil {
		return err
	}
	if b.golden, err = b.makeGolden(ctx, gdir, cc, agentPath); err != nil {
		return fmt.Errorf("golden image: %w", err)
	}
	res.Golden.BuildSeconds = time.Since(start).Seconds()
	b.goldenPath = map[string]string{}
	if b.localDir, err = b.dir("local"); err != nil {
		return err
	}
	for _, f := range b.golden.Files {
		b.goldenPath[f.Name] = f.Path
		size, nonZero, err := copySparse(f.Path, filepath.Join(b.localDir, f.Name))
		if err != nil {
			return err
		}
		res.Golden.Files = append(res.Golden.Files, GoldenFile{Name: f.Name, Kind: f.Kind.String(), Size: size, NonZero: nonZero})
		res.Golden.Size += size
	}
	res.Golden.Recipe, res.Golden.Image = b.opts.Recipe, b.opts.Image
	if res.Golden.MemoryZstd, err = zstdSize(b.goldenPath[plant.MemoryFile]); err != nil {
		return err
	}
	b.log.Info("golden image published", zap.Duration("took", time.Since(start)), zap.Uint64("bytes", res.Golden.Size))
	return nil
}

// startImageSide starts the WAN and exposes through it the image server,
// a plain file server (the full copy row) and qemu-nbd (the NBD row).
func (b *bench) startImageSide(ctx context.Context, images string) (err error) {
	b.wan = NewWAN(b.opts.RTT, b.opts.BandwidthMbit*1e6)
	b.defer_(b.wan.Close)
	if b.imagesWAN, err = b.wan.Expose("images", images); err != nil {
		return err
	}
	fs, err := startFileServer(b.goldenPath)
	if err != nil {
		return err
	}
	b.defer_(fs.Close)
	if b.copyWAN, err = b.wan.Expose("copy", fs.Addr()); err != nil {
		return err
	}
	nbd, err := startNBD(ctx, b.goldenPath[plant.RootFile], filepath.Join(b.work, "golden"))
	if err != nil {
		return err
	}
	b.defer_(nbd.Close)
	nbdWAN, err := b.wan.Expose("nbd", nbd.addr)
	if err != nil {
		return err
	}
	b.nbdURL = "nbd://" + nbdWAN + "/" + nbdExport
	return nil
}

// startL2 starts the second-level cache and warms it by one clone
// through it.
func (b *bench) startL2(ctx context.Context) (err error) {
	l2Dir, err := b.dir("l2")
	if err != nil {
		return err
	}
	if b.l2, err = startCacheProxy(ctx, b.id, l2Dir, b.imagesWAN, b.opts.Compress, b.srvLog); err != nil {
		return err
	}
	b.defer_(b.l2.Close)
	up0, down0 := b.wan.Bytes()
	if _, _, err := b.vmgridClones(ctx, "l2warmup", b.l2.Addr(), false, 1); err != nil {
		return fmt.Errorf("warming the cache proxy: %w", err)
	}
	up1, down1 := b.wan.Bytes()
	b.log.Info("cache proxy warm", zap.Uint64("wan_bytes", up1-up0+down1-down0))
	return nil
}

// repeat runs every row once.
func (b *bench) repeat(ctx context.Context, rep int) error {
	type step struct {
		name string
		fn   func(context.Context, int) error
	}
	for _, s := range []step{
		{RowLocal, b.runLocal},
		{RowFullCopy, b.runFullCopy},
		{RowNBD, b.runNBD},
		{RowCold, b.runColdWarm},
		{RowLazy, b.runLazy},
		{RowLazyProfile4x, b.runLazy4x},
		{RowWorkLazy, b.runWorkload},
		{RowDemandBulk, b.runDemand},
		{RowL2, b.runL2},
		{RowParallel, b.runParallel},
		{RowParallelL2, b.runParallelL2},
		{RowParallelLocal, b.runParallelLocal},
	} {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !b.wants(s.name) {
			continue
		}
		if err := s.fn(ctx, rep); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// companions are the rows measured together with a row key (--rows names
// any of them).
var companions = map[string][]string{
	RowCold:          {RowWarm},
	RowLazy:          {RowAuto, RowLazyProfile, RowWarmLazy},
	RowLazyProfile4x: {RowLazy4x},
	RowWorkLazy:      {RowWorkEager},
	RowDemandBulk:    {RowDemandIdle},
}

// wants reports whether the row of key is to be measured.
func (b *bench) wants(key string) bool {
	if len(b.opts.Rows) == 0 {
		return true
	}
	for _, k := range b.opts.Rows {
		if k == key || slices.Contains(companions[key], k) {
			return true
		}
	}
	return false
}

func (b *bench) record(key string, r Sample) {
	row := b.rows[key]
	if row == nil {
		row = &Row{Key: key}
		b.rows[key] = row
	}
	row.Runs = append(row.Runs, r)
	b.log.Info("clone", zap.String("row", key), zap.Int("repeat", len(row.Runs)), zap.Float64("seconds", r.Seconds),
		zap.Uint64("wan_bytes", r.WANUp+r.WANDown), zap.Any("phases", r.Phases))
}

// timed runs fn and returns a Sample with its time and the WAN bytes it moved.
func (b *bench) timed(fn func(ph Phases) error) (Sample, error) {
	ph := Phases{}
	up0, down0 := b.wan.Bytes()
	start := time.Now()
	err := fn(ph)
	r := Sample{Seconds: time.Since(start).Seconds(), Phases: ph}
	up1, down1 := b.wan.Bytes()
	r.WANUp, r.WANDown = up1-up0, down1-down0
	return r, err
}

func (b *bench) localFiles() []string {
	var ps []string
	for _, f := range b.golden.Files {
		ps = append(ps, filepath.Join(b.localDir, f.Name))
	}
	return ps
}

func (b *bench) runLocal(ctx context.Context, rep int) error {
	if err := dropPageCache(b.localFiles()...); err != nil {
		return err
	}
	return b.copyAndClone(ctx, RowLocal, rep, nil, b.localDir, filepath.Join(b.localDir, plant.RootFile))
}

// runFullCopy copies every file, then clones locally.
func (b *bench) runFullCopy(ctx context.Context, rep int) error {
	return b.copyAndClone(ctx, RowFullCopy, rep, b.fileNames(""), "", plant.RootFile)
}

// runNBD copies every file but the root disk, which the clone reads from
// qemu-nbd.
func (b *bench) runNBD(ctx context.Context, rep int) error {
	return b.copyAndClone(ctx, RowNBD, rep, b.fileNames(plant.RootFile), "", b.nbdURL)
}

func (b *bench) fileNames(except string) []string {
	var names []string
	for _, f := range b.golden.Files {
		if f.Name != except {
			names = append(names, f.Name)
		}
	}
	return names
}

// copyAndClone times one clone made outside vmgrid: the named files are
// first copied across the WAN into a fresh directory (none for the local
// row, whose files are in dir already), then the clone is made from them
// with its redo log over backing (a path relative to the files' directory,
// or a URL).
func (b *bench) copyAndClone(ctx context.Context, key string, rep int, names []string, dir, backing string) error {
	name := fmt.Sprintf("%s-%d", key, rep)
	if dir == "" {
		var err error
		if dir, err = b.dir(name); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	if !filepath.IsAbs(backing) && !strings.Contains(backing, "://") {
		backing = filepath.Join(dir, backing)
	}
	var c *localClone
	r, err := b.timed(func(ph Phases) (err error) {
		if len(names) > 0 {
			start := time.Now()
			if _, err := fetchFiles(ctx, b.copyWAN, names, dir); err != nil {
				return err
			}
			ph.lap("copy", start)
		}
		c, err = cloneLocal(ctx, b.driver, dir, backing, filepath.Join(b.work, "vm-"+name), name, ph)
		return err
	})
	if err != nil {
		return err
	}
	c.Close()
	b.record(key, r)
	return nil
}

// runColdWarm clones twice on a fresh plant: cold, then warm.
func (b *bench) runColdWarm(ctx context.Context, rep int) error {
	dir := filepath.Join(b.work, fmt.Sprintf("cs-cold-%d", rep))
	n, err := startNode(ctx, b.id, fmt.Sprintf("cold-%d", rep), dir, b.imagesWAN, b.opts.Compress, b.driver, b.srvLog, memoryRestore(plant.RestoreEager))
	if err != nil {
		return err
	}
	defer func() { n.Close(); os.RemoveAll(dir) }()
	for i, key := range []string{RowCold, RowWarm} {
		before := n.stats()
		r, id, link, err := b.tracedClone(ctx, n, image, key, rep)
		if err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
		d := n.stats().minus(before)
		r.Plane = &d
		if i == 0 {
			r.Link = link
			if r.Needed, err = neededBytes(ctx, n.Proxy, image, b.goldenPath); err != nil {
				return fmt.Errorf("what the cold clone needed: %w", err)
			}
		}
		if err := n.destroy(ctx, id); err != nil {
			return err
		}
		b.record(key, r)
	}
	return nil
}

// tracedClone times one clone on n with the WAN traced: its sample, VM
// id and what the link did.
func (b *bench) tracedClone(ctx context.Context, n *node, img, key string, rep int) (Sample, string, *LinkUse, error) {
	var id string
	var link *LinkUse
	r, err := b.timed(func(ph Phases) error {
		stop := b.wan.trace()
		ad, err := n.clone(ctx, img, fmt.Sprintf("%s-%d", key, rep), ph)
		link = stop()
		if ad != nil {
			id = ad.VmId
		}
		return err
	})
	return r, id, link, err
}

func (b *bench) runL2(ctx context.Context, rep int) error {
	r, _, err := b.vmgridClones(ctx, fmt.Sprintf("l2-%d", rep), b.l2.Addr(), false, 1)
	if err != nil {
		return err
	}
	b.record(RowL2, r)
	return nil
}

func (b *bench) runParallel(ctx context.Context, rep int) error {
	r, _, err := b.vmgridClones(ctx, fmt.Sprintf("par-%d", rep), b.imagesWAN, b.opts.Compress, b.opts.Plants)
	if err != nil {
		return err
	}
	b.record(RowParallel, r)
	return nil
}

func (b *bench) runParallelL2(ctx context.Context, rep int) error {
	dir := filepath.Join(b.work, fmt.Sprintf("l2par-%d", rep))
	cp, err := startCacheProxy(ctx, b.id, dir, b.imagesWAN, b.opts.Compress, b.srvLog)
	if err != nil {
		return err
	}
	defer func() { cp.Close(); os.RemoveAll(dir) }()
	r, _, err := b.vmgridClones(ctx, fmt.Sprintf("l2par-%d", rep), cp.Addr(), false, b.opts.Plants)
	if err != nil {
		return err
	}
	b.record(RowParallelL2, r)
	return nil
}

func (b *bench) runParallelLocal(ctx context.Context, rep int) error {
	if err := dropPageCache(b.localFiles()...); err != nil {
		return err
	}
	clones := make([]*localClone, b.opts.Plants)
	defer func() {
		for _, c := range clones {
			if c != nil {
				c.Close()
			}
		}
	}()
	r, err := b.timed(func(ph Phases) error {
		start := time.Now()
		per := make([]float64, len(clones))
		errs := make([]error, len(clones))
		var wg sync.WaitGroup
		for i := range clones {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("plocal-%d-%d", rep, i)
				clones[i], errs[i] = cloneLocal(ctx, b.driver, b.localDir, filepath.Join(b.localDir, plant.RootFile), filepath.Join(b.work, name), name, nil)
				per[i] = time.Since(start).Seconds()
			}()
		}
		wg.Wait()
		for i, p := range per {
			ph[fmt.Sprintf("clone %d", i+1)] = p
		}
		return errors.Join(errs...)
	})
	if err != nil {
		return err
	}
	b.record(RowParallelLocal, r)
	return nil
}

// vmgridClones starts count fresh plants reading from upstream, then has
// them clone at once; the Sample's time is the makespan. The plants are
// stopped and their directories removed before it returns.
func (b *bench) vmgridClones(ctx context.Context, name, upstream string, compress bool, count int) (Sample, []float64, error) {
	nodes := make([]*node, count)
	defer func() {
		var wg sync.WaitGroup
		for i, n := range nodes {
			if n != nil {
				wg.Add(1)
				go func() { defer wg.Done(); n.Close(); os.RemoveAll(b.nodeDir(name, i)) }()
			}
		}
		wg.Wait()
	}()
	for i := range nodes {
		var err error
		if nodes[i], err = startNode(ctx, b.id, fmt.Sprintf("%s-%d", name, i), b.nodeDir(name, i), upstream, compress, b.driver, b.srvLog); err != nil {
			return Sample{}, nil, err
		}
	}
	before := make([]Plane, count)
	for i, n := range nodes {
		before[i] = n.stats()
	}
	per := make([]float64, count)
	r, err := b.timed(func(ph Phases) error {
		start := time.Now()
		errs := make([]error, count)
		plantPh := make([]Phases, count)
		var wg sync.WaitGroup
		for i, n := range nodes {
			plantPh[i] = Phases{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = n.clone(ctx, image, fmt.Sprintf("%s-%d", name, i), plantPh[i])
				per[i] = time.Since(start).Seconds()
			}()
		}
		wg.Wait()
		// Phases of a parallel run: the mean over the plants.
		for _, p := range plantPh {
			for k, v := range p {
				ph[k] += v / float64(count)
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		return r, nil, err
	}
	var plane Plane
	for i, n := range nodes {
		plane = plane.plus(n.stats().minus(before[i]))
	}
	r.Plane = &plane
	if count > 1 {
		r.PerPlant = per
	}
	return r, per, nil
}

func (b *bench) nodeDir(name string, i int) string {
	return filepath.Join(b.work, fmt.Sprintf("cs-%s-%d", name, i))
}

func (s Plane) minus(o Plane) Plane {
	return Plane{s.Requests - o.Requests, s.BlockBytes - o.BlockBytes, s.Prefetched - o.Prefetched, s.FileBytes - o.FileBytes,
		s.ProfileFetched - o.ProfileFetched, s.ProfileUsed - o.ProfileUsed, s.ProfileMissed - o.ProfileMissed}
}

func (s Plane) plus(o Plane) Plane {
	return Plane{s.Requests + o.Requests, s.BlockBytes + o.BlockBytes, s.Prefetched + o.Prefetched, s.FileBytes + o.FileBytes,
		s.ProfileFetched + o.ProfileFetched, s.ProfileUsed + o.ProfileUsed, s.ProfileMissed + o.ProfileMissed}
}

// copySparse copies src to dst leaving zero 4 KiB pages as holes (as the
// golden root disk was built) and returns its size and non-zero bytes.
func copySparse(src, dst string) (size, nonZero uint64, err error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, 0, err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return 0, 0, err
	}
	defer out.Close()
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, rerr := io.ReadFull(in, buf)
		for p := 0; p < n; p += 4096 {
			page := buf[p:min(p+4096, n)]
			if blockproto.IsZero(page) {
				continue
			}
			if _, err := out.WriteAt(page, off+int64(p)); err != nil {
				return 0, 0, err
			}
			nonZero += uint64(len(page))
		}
		off += int64(n)
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return 0, 0, rerr
		}
	}
	if err := out.Truncate(off); err != nil {
		return 0, 0, err
	}
	return uint64(off), nonZero, out.Close()
}

// BuildAgent builds the static guest agent (cmd/vmgrid-agent) into dir with
// the go tool; it needs the vmgrid module (run from inside it).
func BuildAgent(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "vmgrid-agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "github.com/vmgrid/vmgrid/cmd/vmgrid-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the guest agent (run from the vmgrid module, or pass a static vmgrid-agent): %v: %s", err, b)
	}
	return out, nil
}

// describeMachine records what the numbers were measured on.
func describeMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Accel: "tcg", GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				if kb, err := strconv.ParseUint(f[1], 10, 64); err == nil {
					m.MemoryGiB = float64(kb) / (1 << 20)
				}
			}
		}
	}
	m.Load[0] = loadAvg()
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		m.QEMU, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	}
	return m
}

func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return f
}

// median of xs (not empty), and min and max.
func stats(xs []float64) (med, lo, hi float64) {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	n := len(s)
	med = s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return med, s[0], s[n-1]
}
