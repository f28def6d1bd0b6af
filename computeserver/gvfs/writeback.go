package gvfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Write-back (GVFS §3.2.1). Writes to a persistent disk land in the block
// cache as dirty blocks, written durably before the write returns, so a
// crash of the compute server loses nothing. They reach the image server on
// a flush: explicit (the Flush RPC, `vmgrid cache flush`, SIGUSR1), after
// FlushIdle without writes, and when the proxy closes. A flush sends every
// dirty block in one WriteBlocks batch, which the image server makes
// durable and visible at once, then marks the blocks clean unless they were
// written again meanwhile. Flushing twice is harmless.
//
// Session consistency: a disk's generation on the image server increases
// with every batch. The proxy remembers the generation its cached blocks
// belong to; when a disk is opened and the image server is at another
// generation (another plant wrote it), the clean cached blocks are dropped.

type diskState struct {
	name string

	flushMu sync.Mutex // one flush at a time

	mu           sync.Mutex
	locks        [64]sync.Mutex // read-modify-write of partial blocks
	writeThrough bool
	gen          uint64 // generation our clean blocks belong to
	genKnown     bool
	timer        *time.Timer
}

func (p *Proxy) diskLocked(name string) *diskState {
	d := p.disks[name]
	if d == nil {
		d = &diskState{name: name}
		if b, err := os.ReadFile(p.genPath(name)); err == nil {
			if g, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
				d.gen, d.genKnown = g, true
			}
		}
		p.disks[name] = d
	}
	return d
}

func (p *Proxy) genPath(disk string) string { return filepath.Join(p.dir, "disks", disk+".gen") }

// observe reconciles the cached blocks of a disk with the image server's
// generation.
func (d *diskState) observe(gen uint64, p *Proxy) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.genKnown && d.gen == gen {
		return
	}
	key := diskKey(d.name)
	if d.genKnown {
		if len(p.cache.Dirty(key)) > 0 {
			p.log.Warn("disk changed on the image server while this plant holds unflushed writes; ours will win at the next flush",
				zap.String("disk", d.name), zap.Uint64("ours", d.gen), zap.Uint64("theirs", gen))
		}
		n := p.cache.Invalidate(key)
		p.log.Info("disk changed elsewhere; dropped its clean cached blocks", zap.String("disk", d.name), zap.Int("blocks", n))
	}
	d.gen, d.genKnown = gen, true
	p.saveGen(d.name, gen)
}

func (p *Proxy) saveGen(disk string, gen uint64) {
	path := p.genPath(disk)
	if err := os.WriteFile(path+".tmp", []byte(strconv.FormatUint(gen, 10)), 0o644); err == nil {
		_ = os.Rename(path+".tmp", path)
	}
}

// SetWriteThrough makes every write to the disk reach the image server
// before it returns (slow on a WAN; for disks that must never lag).
func (p *Proxy) SetWriteThrough(disk string, on bool) {
	p.mu.Lock()
	d := p.diskLocked(disk)
	p.mu.Unlock()
	d.mu.Lock()
	d.writeThrough = on
	d.mu.Unlock()
}

// WriteAt writes to a persistent disk. Each block is merged with its
// current content when the write covers part of it, and stored durably as a
// dirty block before WriteAt returns.
func (f *diskFile) WriteAt(ctx context.Context, src []byte, off int64) (int, error) {
	if off < 0 || uint64(off)+uint64(len(src)) > f.meta.Size {
		return 0, fmt.Errorf("write at %d..%d is outside disk %s (%d bytes): %w", off, off+int64(len(src)), f.image, f.meta.Size, errdefs.ErrResourceExhausted)
	}
	bs := int64(f.blockSize())
	written := 0
	buf := make([]byte, bs)
	for written < len(src) {
		pos := off + int64(written)
		idx := uint64(pos / bs)
		in := pos - int64(idx)*bs
		n := min(int64(len(src)-written), int64(f.blockLen(idx))-in)
		if err := f.writeBlock(ctx, idx, buf, in, src[written:written+int(n)]); err != nil {
			return written, err
		}
		written += int(n)
	}
	if f.disk.isWriteThrough() {
		if _, err := f.p.Flush(ctx, f.disk.name); err != nil {
			return written, err
		}
	} else {
		f.p.scheduleFlush(f.disk)
	}
	return written, nil
}

// writeBlock writes data at in within block idx, using buf (a block) for
// the merge.
func (f *diskFile) writeBlock(ctx context.Context, idx uint64, buf []byte, in int64, data []byte) error {
	lock := &f.disk.locks[idx%uint64(len(f.disk.locks))]
	lock.Lock()
	defer lock.Unlock()
	block := buf[:f.blockLen(idx)]
	if len(data) != len(block) { // partial: merge with the current content
		cur, zero, err := f.readBlock(ctx, idx, block)
		if err != nil {
			return err
		}
		if zero {
			clear(block)
		} else if &cur[0] != &block[0] {
			copy(block, cur)
		}
	}
	copy(block[in:], data)
	return f.p.cache.Write(f.key, idx, block)
}

// Sync flushes a write-through disk; dirty blocks of a write-back disk are
// already durable in the local cache.
func (f *diskFile) Sync(ctx context.Context) error {
	if !f.disk.isWriteThrough() {
		return nil
	}
	_, err := f.p.Flush(ctx, f.disk.name)
	return err
}

func (d *diskState) isWriteThrough() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.writeThrough
}

func (p *Proxy) scheduleFlush(d *diskState) {
	if p.cfg.FlushIdle < 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Reset(p.cfg.FlushIdle)
		return
	}
	d.timer = time.AfterFunc(p.cfg.FlushIdle, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		if _, err := p.Flush(ctx, d.name); err != nil {
			p.log.Warn("idle write-back failed; will retry at the next write or flush", zap.String("disk", d.name), zap.Error(err))
		}
	})
}

func (d *diskState) stopTimer() {
	d.mu.Lock()
	if d.timer != nil {
		d.timer.Stop()
	}
	d.mu.Unlock()
}

// DiskFlush reports one disk's write-back.
type DiskFlush struct {
	Disk       string
	Blocks     uint64
	Bytes      uint64
	Generation uint64
}

// FlushAll writes back every disk with dirty blocks, including disks
// written before a restart.
func (p *Proxy) FlushAll(ctx context.Context) ([]DiskFlush, error) {
	var out []DiskFlush
	var errs []error
	for _, key := range p.cache.DirtyFiles() {
		name, ok := strings.CutPrefix(key, "d-")
		if !ok {
			continue
		}
		r, err := p.Flush(ctx, name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// Flush writes the dirty blocks of one disk back in one batch.
func (p *Proxy) Flush(ctx context.Context, disk string) (DiskFlush, error) {
	p.mu.Lock()
	d := p.diskLocked(disk)
	p.mu.Unlock()
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	start := time.Now()
	key := diskKey(disk)
	blocks := p.cache.Dirty(key)
	if len(blocks) == 0 {
		d.mu.Lock()
		defer d.mu.Unlock()
		return DiskFlush{Disk: disk, Generation: d.gen}, nil
	}
	sort.Slice(blocks, func(i, j int) bool { return blocks[i] < blocks[j] })
	res, seqs, err := p.writeBack(ctx, disk, blocks)
	if err != nil {
		return res, err
	}
	for i, idx := range blocks {
		if seqs[i] != 0 {
			if err := p.cache.MarkClean(key, idx, seqs[i]); err != nil {
				p.log.Warn("mark clean", zap.String("disk", disk), zap.Uint64("block", idx), zap.Error(err))
			}
		}
	}
	d.mu.Lock()
	d.gen, d.genKnown = res.Generation, true
	p.saveGen(disk, res.Generation)
	d.mu.Unlock()
	p.committed(disk, res.Generation)
	took := time.Since(start)
	p.stats.Flushes.Add(1)
	p.stats.FlushedBlocks.Add(res.Blocks)
	p.stats.FlushNanos.Add(int64(took))
	p.flushHist.Observe(took.Seconds())
	p.log.Info("disk written back", zap.String("disk", disk), zap.Uint64("blocks", res.Blocks), zap.Uint64("generation", res.Generation), zap.Duration("took", took))
	return res, nil
}

// writeBack sends the dirty blocks of a disk in one committed WriteBlocks
// batch and returns the write sequence of each block it sent (0: cleaned
// meanwhile, not sent).
func (p *Proxy) writeBack(ctx context.Context, disk string, blocks []uint64) (DiskFlush, []uint64, error) {
	res := DiskFlush{Disk: disk}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // without a commit the image server drops the batch
	stream, err := p.up.Client.API.WriteBlocks(ctx)
	if err != nil {
		return res, nil, err
	}
	seqs := make([]uint64, len(blocks))
	bs := p.cache.BlockSize()
	// A message stays within what servers read of one request
	// (services.DefaultMaxRecvMsgSize): at most 4 MiB of blocks.
	perMsg := max(1, min(64, (4<<20)/int(bs)))
	msg := &imagev1.WriteBlocksRequest{Disk: disk}
	for i, idx := range blocks {
		buf := make([]byte, bs)
		n, seq, ok, err := p.cache.ReadDirty(diskKey(disk), idx, buf)
		if err != nil {
			return res, nil, err
		}
		if !ok { // cleaned meanwhile (cannot happen under flushMu, but be safe)
			continue
		}
		seqs[i] = seq
		msg.Writes = append(msg.Writes, &imagev1.BlockWrite{Block: idx, Data: buf[:n]})
		res.Blocks++
		res.Bytes += uint64(n)
		if len(msg.Writes) == perMsg {
			if err := stream.Send(msg); err != nil {
				return res, nil, sendErr(stream, err)
			}
			msg = &imagev1.WriteBlocksRequest{}
		}
	}
	msg.Commit = true
	if err := stream.Send(msg); err != nil {
		return res, nil, sendErr(stream, err)
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return res, nil, fmt.Errorf("write-back of disk %s: %w", disk, err)
	}
	res.Generation = resp.Generation
	return res, seqs, nil
}

func sendErr(stream imagev1.ImageService_WriteBlocksClient, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			return rerr
		}
	}
	return err
}
