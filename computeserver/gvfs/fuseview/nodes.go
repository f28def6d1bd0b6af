package fuseview

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// toErrno maps the core's errors to what the kernel answers.
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

// rootNode is MOUNT: a directory per image and disk of the upstream.
type rootNode struct {
	fs.Inode
	p *gvfs.Proxy
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
	ms, err := r.p.List(ctx)
	if err != nil {
		return nil, toErrno(err)
	}
	ents := make([]fuse.DirEntry, 0, len(ms))
	for _, m := range ms {
		ents = append(ents, fuse.DirEntry{Name: m.Name, Mode: syscall.S_IFDIR})
	}
	return fs.NewListDirStream(ents), 0
}

// imageNode is MOUNT/IMAGE: the files of one image or disk.
type imageNode struct {
	fs.Inode
	p    *gvfs.Proxy
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
	out.SetEntryTimeout(f.Recheck())
	out.SetAttrTimeout(f.Recheck())
	if ch := d.GetChild(name); ch != nil {
		n := ch.Operations().(*fileNode)
		// A golden file whose content changed (its image was deleted and
		// published again) gets a new inode: the kernel's cached pages of
		// the old one must not answer for it.
		if old := n.file(); f.Writable() || old.Meta() == f.Meta() || bytes.Equal(old.Meta().Sha256, f.Meta().Sha256) {
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

func fillAttr(f gvfs.File, a *fuse.Attr) {
	a.Size = f.Size()
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = f.Meta().BlockSize
	a.Mode = syscall.S_IFREG | 0o444
	if f.Writable() {
		a.Mode = syscall.S_IFREG | 0o644
	}
	t := uint64(f.Created().Unix())
	a.Mtime, a.Ctime, a.Atime = t, t, t
	a.Nlink = 1
}

// fileNode is MOUNT/IMAGE/FILE: every operation is one call on the core's
// file.
type fileNode struct {
	fs.Inode
	mu sync.Mutex
	f  gvfs.File
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

func (n *fileNode) file() gvfs.File {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.f
}

func (n *fileNode) set(f gvfs.File) {
	n.mu.Lock()
	n.f = f
	n.mu.Unlock()
}

func (n *fileNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f := n.file()
	fillAttr(f, &out.Attr)
	out.SetTimeout(f.Recheck())
	return 0
}

// Open accepts read-write opens of golden files too: QEMU opens a
// memory-backend-file read-write even when it maps it privately. Writes to a
// golden file fail with EROFS. Golden files keep the kernel's pages across
// opens (they never change; a name published again gets a new inode).
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
	got, err := n.file().WriteAt(ctx, data, off)
	return uint32(got), toErrno(err)
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
