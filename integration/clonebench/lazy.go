package clonebench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vmgrid/vmgrid/computeserver"
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Lazy memory rows: a cold lazy clone of the image without a profile (it
// records one), a cold lazy clone that prefetches that profile, and a
// demand block read on a plant that is copying a RAM file in bulk.

// memoryRestore sets a node's --memory-restore; hydration waits past the
// measurement, so what the clone's caches hold is what its guest touched.
func memoryRestore(m plant.MemoryRestore) func(*computeserver.Config) {
	return func(c *computeserver.Config) {
		c.MemoryRestore, c.HydrateAfter = string(m), 10*time.Minute
	}
}

// runLazy measures RowLazy and RowLazyProfile.
func (b *bench) runLazy(ctx context.Context, rep int) error {
	for _, key := range []string{RowLazy, RowLazyProfile} {
		dir := filepath.Join(b.work, fmt.Sprintf("cs-%s-%d", key, rep))
		n, err := startNode(ctx, b.id, fmt.Sprintf("%s-%d", key, rep), dir, b.imagesWAN, b.opts.Compress, b.driver, b.srvLog, memoryRestore(plant.RestoreLazy))
		if err != nil {
			return err
		}
		err = b.lazyClone(ctx, n, key, rep)
		n.Close()
		os.RemoveAll(dir)
		if err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	return nil
}

func (b *bench) lazyClone(ctx context.Context, n *node, key string, rep int) error {
	api := n.Proxy.Upstream().Client.API
	if key == RowLazy {
		// No profile: this clone records it.
		if _, err := api.PutProfile(ctx, &imagev1.PutProfileRequest{Image: image}); err != nil {
			return err
		}
	} else if err := waitProfile(ctx, api); err != nil {
		return err
	}
	before := n.stats()
	r, id, link, err := b.tracedClone(ctx, n, key, rep)
	if err != nil {
		return err
	}
	d := n.stats().minus(before)
	r.Plane, r.Link = &d, link
	if r.Needed, err = neededBytes(ctx, n.Proxy, image, b.goldenPath); err != nil {
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

func waitProfile(ctx context.Context, api imagev1.ImageServiceClient) error {
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
