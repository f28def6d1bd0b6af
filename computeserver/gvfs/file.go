package gvfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// File is an open image file: a read-only golden file (goldenFile) or a
// read-write persistent disk (diskFile). Both read through one block engine
// (blockFile); they differ in what their meta-data says of the blocks, in
// writes, and in how long a view may keep them. A File is also the
// blockproto.BlockSource a cache proxy serves.
type File interface {
	// Image is the image or disk the file belongs to.
	Image() string
	Meta() *imagev1.FileMeta
	// Size is the file's size in bytes.
	Size() uint64
	// Created is when the image was published or the disk created.
	Created() time.Time
	// Writable reports whether the file is a persistent disk.
	Writable() bool
	// Recheck is how long a view may keep the file's entry and attributes.
	Recheck() time.Duration
	// ReadAt reads len(dst) bytes at off (fewer at the end of the file).
	ReadAt(ctx context.Context, dst []byte, off int64) (int, error)
	// WriteAt writes to a disk (golden files: FailedPrecondition).
	WriteAt(ctx context.Context, src []byte, off int64) (int, error)
	// Sync makes the writes so far durable where the disk says they must be.
	Sync(ctx context.Context) error
	// ReadBlock returns one whole block and its digest.
	ReadBlock(ctx context.Context, idx uint64, buf []byte) (blockproto.Block, error)
	// ReadRange reads [off, off+len(buf)) and reports whether it is all zero.
	ReadRange(ctx context.Context, off uint64, buf []byte) (zero bool, err error)
	// Cached reports whether block idx is in the block cache, without
	// reading it or counting a hit (benchmarks use it to see what a clone
	// fetched).
	Cached(idx uint64) bool
	// Prefetch fetches the given blocks in the background, in the prefetch
	// class (working-set profiles), and returns those it asked for.
	Prefetch(idxs []uint64) []uint64
	// StartRun starts fetching the blocks [first, first+count) not yet
	// local in class c, as one upstream request per run rather than one
	// per block (a cache proxy serving a request for a run).
	StartRun(c Class, first uint64, count uint32)
	// Hydrate fetches every block not yet local, in class c, and returns
	// when all are (hydrate.go).
	Hydrate(ctx context.Context, c Class, progress func(local uint64)) error
	// Hold makes reads wait for an absent upstream without a limit (a
	// running guest's RAM file) until the returned func is called.
	Hold() func()
	// LocalBytes is how much of the file is here: zero blocks and cached
	// blocks.
	LocalBytes() uint64
}

var (
	_ File                   = (*goldenFile)(nil)
	_ File                   = (*diskFile)(nil)
	_ blockproto.BlockSource = File(nil)
)

// goldenFile is a file of a golden image: it never changes, its zero blocks
// and block digests are in the manifest, and it is cached under its content
// so equal files of different images share cache frames.
type goldenFile struct{ *blockFile }

func newGoldenFile(b *blockFile) *goldenFile {
	b.key = "f-" + hex.EncodeToString(b.meta.Sha256[:16])
	b.digests, b.zeroMap = b.meta.BlockDigests, b.meta.ZeroMap
	return &goldenFile{b}
}

func (f *goldenFile) Writable() bool         { return false }
func (f *goldenFile) Recheck() time.Duration { return f.p.cfg.GoldenRecheck }
func (f *goldenFile) Sync(context.Context) error {
	return nil
}

func (f *goldenFile) ReadAt(ctx context.Context, dst []byte, off int64) (int, error) {
	dst, err := f.clip(dst, off)
	if err != nil || len(dst) == 0 {
		return 0, err
	}
	if f.meta.Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
		return f.p.files.ReadAt(ctx, f.image, f.meta, dst, off)
	}
	return f.readAt(ctx, dst, off)
}

func (f *goldenFile) ReadRange(ctx context.Context, off uint64, buf []byte) (bool, error) {
	return f.readRange(ctx, off, buf, f.ReadAt)
}

func (f *goldenFile) WriteAt(context.Context, []byte, int64) (int, error) {
	return 0, fmt.Errorf("%s/%s is a golden image file: %w", f.image, f.meta.Name, errdefs.ErrFailedPrecondition)
}

func (f *goldenFile) ReadBlock(ctx context.Context, idx uint64, buf []byte) (blockproto.Block, error) {
	data, zero, err := f.readBlock(ctx, idx, buf)
	if err != nil {
		return blockproto.Block{}, err
	}
	return blockproto.Block{Data: data, Zero: zero, Length: uint32(f.blockLen(idx)), Digest: f.digest(idx)}, nil
}

// diskFile is the file of a persistent disk: read-write, its blocks change,
// so it has no zero map or digests of its own, and fetched zero blocks are
// cached like any other.
type diskFile struct {
	*blockFile
	disk *diskState
}

func newDiskFile(b *blockFile, d *diskState) *diskFile {
	b.key = diskKey(d.name)
	b.cacheZeros = true
	return &diskFile{blockFile: b, disk: d}
}

func diskKey(name string) string { return "d-" + name }

func (f *diskFile) Writable() bool         { return true }
func (f *diskFile) Recheck() time.Duration { return DiskRecheck }

func (f *diskFile) ReadAt(ctx context.Context, dst []byte, off int64) (int, error) {
	dst, err := f.clip(dst, off)
	if err != nil || len(dst) == 0 {
		return 0, err
	}
	return f.readAt(ctx, dst, off)
}

func (f *diskFile) ReadRange(ctx context.Context, off uint64, buf []byte) (bool, error) {
	return f.readRange(ctx, off, buf, f.ReadAt)
}

// ReadBlock answers zeros of a disk as zero blocks (they stay off the wire)
// with the digest a disk has no manifest for.
func (f *diskFile) ReadBlock(ctx context.Context, idx uint64, buf []byte) (blockproto.Block, error) {
	data, zero, err := f.readBlock(ctx, idx, buf)
	if err != nil {
		return blockproto.Block{}, err
	}
	n := int(f.blockLen(idx))
	if zero || blockproto.IsZero(data) {
		d := blockproto.ZeroDigest(n)
		return blockproto.Block{Zero: true, Length: uint32(n), Digest: d[:]}, nil
	}
	d := sha256.Sum256(data)
	return blockproto.Block{Data: data, Length: uint32(n), Digest: d[:]}, nil
}
