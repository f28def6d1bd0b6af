package clonebench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Lazy memory rows: a cold auto clone and a cold lazy clone of the image
// without a profile (each records one), a cold lazy clone that prefetches
// the profile and a warm one after it on the same plant; the same two cold rows for the image
// built with 4x the guest RAM; a workload that touches most of the
// guest's memory right after an eager and after a lazy restore; and a
// demand block read on a plant that is copying a RAM file in bulk.

// memoryRestore sets a node's --memory-restore; hydration waits past the
// measurement, so what the clone's caches hold is what its guest touched.
func memoryRestore(m plant.MemoryRestore) func(*computeserver.Config) {
	return func(c *computeserver.Config) {
		c.MemoryRestore, c.HydrateAfter = string(m), 10*time.Minute
	}
}

// lazyRows are the rows of one image's lazy clones: auto and lazy
// without a profile, lazy with it, and warm after that ("": not measured).
type lazyRows struct {
	image                       string
	paths                       map[string]string // the image's files on the image side
	auto, noProfile, with, warm string
}

// runLazy measures RowAuto, RowLazy, RowLazyProfile and RowWarmLazy.
func (b *bench) runLazy(ctx context.Context, rep int) error {
	return b.lazyRows(ctx, rep, lazyRows{image: image, paths: b.goldenPath, auto: RowAuto, noProfile: RowLazy, with: RowLazyProfile, warm: RowWarmLazy})
}

// runLazy4x measures RowLazy4x and RowLazyProfile4x on the image built
// with 4x the RAM (setup4x).
func (b *bench) runLazy4x(ctx context.Context, rep int) error {
	if b.golden4x == nil {
		return nil // --image: no recipe to build it from
	}
	return b.lazyRows(ctx, rep, lazyRows{image: image4x, paths: b.golden4xPath, noProfile: RowLazy4x, with: RowLazyProfile4x})
}

// lazyRows clones the image on fresh plants: with auto and with lazy
// without a profile (each records one), then lazy with the profile and
// warm on that plant.
func (b *bench) lazyRows(ctx context.Context, rep int, rows lazyRows) error {
	for _, key := range []string{rows.auto, rows.noProfile, rows.with} {
		if key == "" {
			continue
		}
		mode := plant.RestoreLazy
		if key == rows.auto {
			mode = plant.RestoreAuto
		}
		dir := filepath.Join(b.work, fmt.Sprintf("cs-%s-%d", key, rep))
		n, err := startNode(ctx, b.id, fmt.Sprintf("%s-%d", key, rep), dir, b.imagesWAN, b.opts.Compress, b.driver, b.srvLog, memoryRestore(mode))
		if err != nil {
			return err
		}
		err = b.lazyClone(ctx, n, rows, key, rep)
		if err == nil && key == rows.with && rows.warm != "" {
			err = b.warmClone(ctx, n, rows, rep)
		}
		n.Close()
		os.RemoveAll(dir)
		if err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	return nil
}

func (b *bench) lazyClone(ctx context.Context, n *node, rows lazyRows, key string, rep int) error {
	api := n.Proxy.Upstream().Client.API
	if key != rows.with {
		// No profile: this clone records it.
		if _, err := api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: rows.image}); err != nil {
			return err
		}
	} else if err := waitProfile(ctx, api, rows.image); err != nil {
		return err
	}
	before := n.stats()
	r, id, link, err := b.tracedClone(ctx, n, rows.image, key, rep)
	if err != nil {
		return err
	}
	d := n.stats().minus(before)
	r.Plane, r.Link = &d, link
	if r.Needed, err = neededBytes(ctx, n.Proxy, rows.image, rows.paths); err != nil {
		return fmt.Errorf("what the lazy clone needed: %w", err)
	}
	// The profile is recorded until 2 s after ready (plant/profile.go):
	// the VM lives that long, so the next row finds it.
	time.Sleep(3 * time.Second)
	d = n.stats().minus(before)
	r.Plane.ProfileFetched, r.Plane.ProfileUsed, r.Plane.ProfileMissed = d.ProfileFetched, d.ProfileUsed, d.ProfileMissed
	if err := n.destroy(ctx, id); err != nil {
		return err
	}
	b.record(key, r)
	return nil
}

// warmClone clones again on the plant of the lazy + profile row: the
// blocks the first clone read are in its block cache.
func (b *bench) warmClone(ctx context.Context, n *node, rows lazyRows, rep int) error {
	before := n.stats()
	r, id, _, err := b.tracedClone(ctx, n, rows.image, rows.warm, rep)
	if err != nil {
		return err
	}
	d := n.stats().minus(before)
	r.Plane = &d
	if err := n.destroy(ctx, id); err != nil {
		return err
	}
	b.record(rows.warm, r)
	return nil
}

// setup4x builds the run's recipe again with 4x the guest RAM and
// publishes it as image4x (not with --image: there is no recipe).
func (b *bench) setup4x(ctx context.Context, cc *grpc.ClientConn, agentPath string) error {
	if b.opts.Golden != nil {
		b.log.Info("no 4x RAM rows: the image was fetched (--image), not built")
		return nil
	}
	dir, err := b.dir("golden4x")
	if err != nil {
		return err
	}
	mib := 4 * int(b.golden.Attrs.GetMemoryMib())
	b.log.Info("building the golden image with 4x the RAM", zap.String("image", image4x), zap.Int("memory_mib", mib))
	if b.golden4x, err = b.buildRecipe(ctx, image4x, mib, dir, cc, agentPath); err != nil {
		return fmt.Errorf("golden image with 4x the RAM: %w", err)
	}
	b.golden4xPath = map[string]string{}
	for _, f := range b.golden4x.Files {
		b.golden4xPath[f.Name] = f.Path
	}
	return nil
}

// workload touches most of a guest's memory: every running program's
// binary (pages the golden guest had), then 70% of the available memory
// written and read back in a tmpfs of its own (pages that were free, zero
// in the RAM file). It prints the MiB written.
const workload = `set -e
d=/run/vmgrid-touch
mkdir -p $d
mount -t tmpfs -o size=90% tmpfs $d
for p in /proc/[0-9]*/exe; do cat "$p" 2>/dev/null || true; done > /dev/null
n=$(awk '/^MemAvailable:/ {print int($2*7/10/1024)}' /proc/meminfo)
dd if=/dev/zero of=$d/heap bs=1M count=$n 2>/dev/null
cat $d/heap > /dev/null
umount $d
rmdir $d
echo $n`

// runWorkload measures RowWorkEager and RowWorkLazy: the workload run
// right after a cold clone is ready, restored eagerly and lazily (with the
// profile, when the lazy rows made one), on fresh plants hydrating as
// they do by default.
func (b *bench) runWorkload(ctx context.Context, rep int) error {
	for _, w := range []struct {
		key  string
		mode plant.MemoryRestore
	}{{RowWorkEager, plant.RestoreEager}, {RowWorkLazy, plant.RestoreLazy}} {
		dir := filepath.Join(b.work, fmt.Sprintf("cs-%s-%d", w.key, rep))
		n, err := startNode(ctx, b.id, fmt.Sprintf("%s-%d", w.key, rep), dir, b.imagesWAN, b.opts.Compress, b.driver, b.srvLog,
			func(c *computeserver.Config) { c.MemoryRestore = string(w.mode) })
		if err != nil {
			return err
		}
		err = b.workloadAfterClone(ctx, n, w.key, rep)
		n.Close()
		os.RemoveAll(dir)
		if err != nil {
			return fmt.Errorf("%s: %w", w.key, err)
		}
	}
	return nil
}

func (b *bench) workloadAfterClone(ctx context.Context, n *node, key string, rep int) error {
	ad, err := n.clone(ctx, image, fmt.Sprintf("%s-%d", key, rep), nil)
	if err != nil {
		return err
	}
	var out string
	r, err := b.timed(func(Phases) error {
		resp, err := n.client.ExecVM(ctx, &computev1.ExecVMRequest{VmId: ad.VmId, Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", workload}}})
		if err != nil {
			return err
		}
		if out = strings.TrimSpace(string(resp.Stdout)); resp.ExitCode != 0 {
			return fmt.Errorf("the workload exited %d: %s%s", resp.ExitCode, resp.Stdout, resp.Stderr)
		}
		return nil
	})
	if err != nil {
		return err
	}
	b.log.Info("workload after the clone", zap.String("row", key), zap.String("memory_restore", ad.MemoryRestore), zap.String("mib_written", out))
	if err := n.destroy(ctx, ad.VmId); err != nil {
		return err
	}
	b.record(key, r)
	return nil
}

func waitProfile(ctx context.Context, api imagev1.ImageServiceClient, image string) error {
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		resp, err := api.GetProfile(ctx, &imagev1.GetProfileRequest{Image: image})
		if err != nil {
			return err
		}
		if len(resp.Entries) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the lazy clone stored no working-set profile of %s", image)
		}
	}
}

// demandReads is how many blocks each demand row reads (one at a time).
const demandReads = 5

// runDemand measures RowDemandIdle and RowDemandBulk: single reads of
// uncached root-disk blocks through a fresh plant's data plane, first
// with the link idle, then while the plant copies the image's RAM file in
// bulk (as an eager restore of another clone does).
func (b *bench) runDemand(ctx context.Context, rep int) error {
	dir := filepath.Join(b.work, fmt.Sprintf("cs-demand-%d", rep))
	n, err := startNode(ctx, b.id, fmt.Sprintf("demand-%d", rep), dir, b.imagesWAN, b.opts.Compress, b.driver, b.srvLog)
	if err != nil {
		return err
	}
	defer func() { n.Close(); os.RemoveAll(dir) }()
	root, err := n.Proxy.Open(ctx, image, plant.RootFile)
	if err != nil {
		return err
	}
	blocks := nonZeroBlocks(root, 2*demandReads)
	if len(blocks) < 2*demandReads {
		return fmt.Errorf("the root disk has only %d non-zero blocks", len(blocks))
	}
	if err := b.demandRow(ctx, RowDemandIdle, root, blocks[:demandReads]); err != nil {
		return err
	}
	ram, err := n.Proxy.Open(ctx, image, plant.RAMFile)
	if err != nil {
		return err
	}
	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go ram.Hydrate(bctx, gvfs.Prefetch, nil) //nolint:errcheck // canceled when the row is done
	time.Sleep(500 * time.Millisecond)       // the bulk copy is under way
	return b.demandRow(ctx, RowDemandBulk, root, blocks[demandReads:])
}

func (b *bench) demandRow(ctx context.Context, key string, f gvfs.File, blocks []uint64) error {
	buf := make([]byte, 4096)
	for _, idx := range blocks {
		r, err := b.timed(func(Phases) error {
			_, err := f.ReadAt(ctx, buf, int64(idx)*int64(f.Meta().BlockSize))
			return err
		})
		if err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
		b.record(key, r)
	}
	return nil
}

// nonZeroBlocks picks up to n non-zero blocks of f spread over the file.
func nonZeroBlocks(f gvfs.File, n int) []uint64 {
	var all []uint64
	bs := uint64(f.Meta().BlockSize)
	for idx := uint64(0); idx*bs < f.Size(); idx++ {
		if !f.Cached(idx) && !zeroBlock(f.Meta(), idx) {
			all = append(all, idx)
		}
	}
	if len(all) <= n {
		return all
	}
	out := make([]uint64, 0, n)
	for i := range n {
		out = append(out, all[i*len(all)/n])
	}
	return out
}

func zeroBlock(m *imagev1.FileMeta, idx uint64) bool {
	bs := uint64(m.BlockSize)
	return blockproto.IsZeroRange(m.ZeroMap, idx*bs, min(bs, m.Size-idx*bs))
}
