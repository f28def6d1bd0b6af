package gvfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"go.uber.org/zap"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// The FUSE view: MOUNT/IMAGE/FILE for every image and persistent disk the
// upstream knows. Golden files are read-only and keep the kernel page cache
// across opens (a file never changes; a name published again gets a new
// inode); disk files are read-write. A VM monitor
// opens them as ordinary files.
const (
	// MaxIO is the largest read or write the kernel sends (max_read).
	MaxIO = 1 << 20
	// ReadAheadKB is set on the mount's backing device so the kernel reads
	// large sequential runs in few requests (reset to 128 on every mount).
	ReadAheadKB    = 8192
	diskTimeout    = time.Second
	missingTimeout = time.Second
)

// MountOptions configure Mount.
type MountOptions struct {
	// Debug logs every FUSE request.
	Debug bool
}

// Mount mounts the view of p on dir and returns the server; call Unmount on
// it (or Proxy.Close) when done. A stale mount left by a killed process is
// unmounted first.
func Mount(dir string, p *Proxy, o MountOptions) (*fuse.Server, error) {
	if staleMount(dir) {
		p.log.Warn("unmounting a stale FUSE mount left by a killed process", zap.String("dir", dir))
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			return nil, fmt.Errorf("unmount stale %s: %w", dir, err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	root := &rootNode{p: p}
	// The kernel keeps golden entries and attributes as long as the proxy
	// keeps their manifest: a name published again shows its new files as
	// soon as the proxy knows.
	gt := p.goldenRecheck
	nt := missingTimeout
	server, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:        "vmgrid",
			Name:          "vmgrid",
			MaxWrite:      MaxIO,
			MaxReadAhead:  MaxIO,
			AllowOther:    os.Geteuid() == 0,
			DirectMount:   true,
			DisableSplice: true, // replies of MaxIO plus a header do not fit a pipe
			Debug:         o.Debug,
		},
		EntryTimeout:    &gt,
		AttrTimeout:     &gt,
		NegativeTimeout: &nt,
	})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if err := setReadAhead(dir, ReadAheadKB); err != nil {
		p.log.Warn("could not raise read-ahead of the FUSE mount", zap.Error(err))
	}
	p.mu.Lock()
	p.servers = append(p.servers, server)
	p.roots = append(p.roots, &root.Inode)
	p.mu.Unlock()
	return server, nil
}

// staleMount reports whether dir is a FUSE mount whose server is gone. A
// stat is not enough: the kernel answers it from the root's cached
// attributes (kept for an hour) without asking the dead server; statfs
// always asks, and gets ENOTCONN.
func staleMount(dir string) bool {
	var st syscall.Statfs_t
	return errors.Is(syscall.Statfs(dir, &st), syscall.ENOTCONN)
}

func setReadAhead(dir string, kb int) error {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return err
	}
	major, minor := (st.Dev>>8)&0xfff, (st.Dev&0xff)|((st.Dev>>12)&0xfff00)
	path := filepath.Join("/sys/class/bdi", fmt.Sprintf("%d:%d", major, minor), "read_ahead_kb")
	return os.WriteFile(path, []byte(strconv.Itoa(kb)), 0o644)
}

func toErrno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errdefs.IsNotFound(err):
		return syscall.ENOENT
	case errdefs.IsOutOfRange(err), errdefs.IsInvalidArgument(err):
		return syscall.EINVAL
	case errdefs.IsPermissionDenied(err), errdefs.IsFailedPrecondition(err):
		return syscall.EROFS
	case errors.Is(err, errdefs.ErrResourceExhausted):
		return syscall.ENOSPC
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	default:
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return errno
		}
		return syscall.EIO
	}
}

type rootNode struct {
	fs.Inode
	p *Proxy
}

var (
	_ fs.NodeLookuper  = (*rootNode)(nil)
	_ fs.NodeReaddirer = (*rootNode)(nil)
)

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	m, err := r.p.Image(ctx, name)
	if err != nil {
		return nil, toErrno(err)
	}
	out.Mode = syscall.S_IFDIR | 0o555
	if ch := r.GetChild(name); ch != nil {
		return ch, 0
	}
	return r.NewInode(ctx, &imageNode{p: r.p, name: m.Name}, fs.StableAttr{Mode: syscall.S_IFDIR}), 0
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	ms, err := r.p.up.List(ctx)
	if err != nil {
		return nil, toErrno(err)
	}
	ents := make([]fuse.DirEntry, 0, len(ms))
	for _, m := range ms {
		ents = append(ents, fuse.DirEntry{Name: m.Name, Mode: syscall.S_IFDIR})
	}
	return fs.NewListDirStream(ents), 0
}

type imageNode struct {
	fs.Inode
	p    *Proxy
	name string
}

var (
	_ fs.NodeLookuper  = (*imageNode)(nil)
	_ fs.NodeReaddirer = (*imageNode)(nil)
)

func (d *imageNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	f, err := d.p.Open(ctx, d.name, name)
	if err != nil {
		return nil, toErrno(err)
	}
	fillAttr(f, &out.Attr)
	if !f.Writable() {
		out.SetEntryTimeout(d.p.goldenRecheck)
		out.SetAttrTimeout(d.p.goldenRecheck)
	} else {
		out.SetEntryTimeout(diskTimeout)
		out.SetAttrTimeout(diskTimeout)
	}
	if ch := d.GetChild(name); ch != nil {
		n := ch.Operations().(*fileNode)
		// A golden file whose content changed (its image was deleted and
		// published again) gets a new inode: the kernel's cached pages of
		// the old one must not answer for it.
		if old := n.file(); f.Writable() || old.meta == f.meta || bytes.Equal(old.meta.Sha256, f.meta.Sha256) {
			n.set(f)
			return ch, 0
		}
	}
	return d.NewInode(ctx, &fileNode{f: f}, fs.StableAttr{Mode: syscall.S_IFREG}), 0
}

func (d *imageNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	m, err := d.p.Image(ctx, d.name)
	if err != nil {
		return nil, toErrno(err)
	}
	ents := make([]fuse.DirEntry, 0, len(m.Files))
	for _, f := range m.Files {
		ents = append(ents, fuse.DirEntry{Name: f.Name, Mode: syscall.S_IFREG})
	}
	return fs.NewListDirStream(ents), 0
}

func fillAttr(f *File, a *fuse.Attr) {
	a.Size = f.Size()
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = f.meta.BlockSize
	a.Mode = syscall.S_IFREG | 0o444
	if f.Writable() {
		a.Mode = syscall.S_IFREG | 0o644
	}
	t := uint64(f.created.Unix())
	a.Mtime, a.Ctime, a.Atime = t, t, t
	a.Nlink = 1
}

type fileNode struct {
	fs.Inode
	mu sync.Mutex
	f  *File
}

var (
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeWriter    = (*fileNode)(nil)
	_ fs.NodeFsyncer   = (*fileNode)(nil)
	_ fs.NodeSetattrer = (*fileNode)(nil)
	_ fs.NodeFlusher   = (*fileNode)(nil)
)

func (n *fileNode) file() *File {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.f
}

func (n *fileNode) set(f *File) {
	n.mu.Lock()
	n.f = f
	n.mu.Unlock()
}

func (n *fileNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f := n.file()
	fillAttr(f, &out.Attr)
	if f.Writable() {
		out.SetTimeout(diskTimeout)
	} else {
		out.SetTimeout(f.p.goldenRecheck)
	}
	return 0
}

// Open accepts read-write opens of golden files too: QEMU opens a
// memory-backend-file read-write even when it maps it privately. Writes to a
// golden file fail with EROFS.
func (n *fileNode) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.file().Writable() {
		return nil, 0, 0
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *fileNode) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	got, err := n.file().ReadAt(ctx, dest, off)
	if err != nil {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:got]), 0
}

func (n *fileNode) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	f := n.file()
	if !f.Writable() {
		return 0, syscall.EROFS
	}
	got, err := f.WriteAt(ctx, data, off)
	if err != nil {
		return uint32(got), toErrno(err)
	}
	return uint32(got), 0
}

// Fsync makes a disk's writes durable: they already are in the local cache
// (dirty blocks are written durably); write-through disks are flushed to the
// image server.
func (n *fileNode) Fsync(ctx context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	return toErrno(n.file().Sync(ctx))
}

func (n *fileNode) Flush(context.Context, fs.FileHandle) syscall.Errno { return 0 }

// Setattr refuses size changes: images and disks have fixed sizes.
func (n *fileNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != n.file().Size() {
		return syscall.EPERM
	}
	return n.Getattr(ctx, fh, out)
}

// dropPageCache asks the kernel to forget the cached pages of every file in
// the view.
func dropPageCache(root *fs.Inode) {
	for _, img := range root.Children() {
		for _, f := range img.Children() {
			f.NotifyContent(0, 0)
		}
	}
}

var _ = imagev1.View_VIEW_FULL
