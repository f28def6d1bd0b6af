package plant

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Lazy memory. Golden images built here carry the guest's RAM as a file
// (RAMFile): the builder runs the guest on a shared memory-backend-file and
// suspends with x-ignore-shared, so the memory state (Memory) is the
// devices' state alone, about a megabyte, and the RAM file is published
// block by block with zero-block meta-data (most of a guest's RAM is zero
// pages, which never cross the wire). A lazy clone maps the RAM file from
// the FUSE view privately (share=off): the guest's first touch of a page
// is a read through the page cache, the block cache and the upstream; its
// writes stay in its own copy-on-write pages; clones of one image on one
// plant share the golden pages in the page cache. Once the guest is ready
// the plant hydrates the rest of the file (and of the root disk) in the
// background class, so after a bounded time the VM no longer needs the
// image server. Images with only a memory state (published before) restore
// eagerly, as they always did.

// RAMFile is the guest-RAM file of golden images built here.
const RAMFile = "mem.ram"

// ramBlockSize is the block size the RAM file is published with: a page
// fault's read costs a block, and a 2 GiB guest's digests stay 1 MiB.
const ramBlockSize = 64 << 10

// MemoryRestore is how a clone of an image with a RAM file gets the
// guest's memory.
type MemoryRestore string

const (
	// RestoreLazy maps the RAM file from the FUSE view: pages come on
	// first touch, the rest is hydrated in the background.
	RestoreLazy MemoryRestore = "lazy"
	// RestoreEager copies the RAM file to the VM's directory first (its
	// non-zero blocks), then maps the copy.
	RestoreEager MemoryRestore = "eager"
	// RestoreAuto restores lazily and, when the image has no working-set
	// profile and the RAM file is not local, streams the whole RAM file
	// from the restore on (autorestore.go).
	RestoreAuto MemoryRestore = "auto"
)

// memoryMigrated is the classad's memory_restore of a VM that migrated in:
// its RAM came whole from the source plant.
const memoryMigrated = "migrated"

// ParseMemoryRestore checks a --memory-restore value ("" is auto).
func ParseMemoryRestore(s string) (MemoryRestore, error) {
	switch m := MemoryRestore(s); m {
	case RestoreLazy, RestoreEager, RestoreAuto:
		return m, nil
	case "":
		return RestoreAuto, nil
	}
	return "", fmt.Errorf("memory restore %q: want lazy, eager or auto", s)
}

// goldenRAM is the golden builder's guest RAM: a file shared with the
// guest, so the suspend leaves RAM out of the state stream.
func goldenRAM(workDir string) *vmm.MemoryFile {
	return &vmm.MemoryFile{Path: filepath.Join(workDir, RAMFile), Share: true}
}

// ramPublishFile is the RAM file as an image file: block by block, so a
// clone fetches only the pages its guest touches.
func ramPublishFile(path string) imageclient.PublishFile {
	return imageclient.PublishFile{Name: RAMFile, Path: path, Kind: imagev1.FileKind_FILE_KIND_MEMORY_STATE,
		Policy: imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS, BlockSize: ramBlockSize}
}

// memoryTemplate is what vm.json keeps of a machine's memory backend: that
// it has one (a restore needs QEMU's RAM block of the same name), without
// its host path.
func memoryTemplate(mf *vmm.MemoryFile) *vmm.MemoryFile {
	if mf == nil {
		return nil
	}
	return &vmm.MemoryFile{}
}

// lazyMem is a lazily restored guest's RAM on its plant.
type lazyMem struct {
	ram, root gvfs.File // root: the golden disk under the redo log (nil for a persistent root)
	profile   *profile  // its working-set recording and prefetch (profile.go)
	// The fetch of the rest (hydrate.go): nil until it starts; err is why
	// it ended, once done is closed. stopStream ends a stream of the RAM
	// file started at the restore (nil: none).
	cancel     context.CancelFunc
	done       chan struct{}
	err        error
	stopStream func()
	release    func() // of the RAM file's Hold, while the guest runs
	once       sync.Once
}

// stop ends the fetch of the rest (a destroyed VM, a failed creation) and
// the Hold; nil or stopped already does nothing.
func (m *lazyMem) stop() {
	if m == nil {
		return
	}
	m.once.Do(func() {
		if m.stopStream != nil {
			m.stopStream()
		}
		if m.cancel != nil {
			m.cancel()
			<-m.done
		}
		if m.release != nil {
			m.release()
		}
	})
}

// memory chooses the restore of the image's memory and sets the spec's
// memory backend for it: what the restore step hands vmm.Restore.
func (l *line) memory(ctx context.Context) (vmm.Incoming, error) {
	mnt := filepath.Join(l.p.cfg.Mountpoint, l.src.image)
	in := vmm.Incoming{Path: filepath.Join(mnt, l.src.config.Memory)}
	if l.src.config.RAM == "" {
		if l.spec.MemoryFile != nil {
			// Saved from a machine with a file backend (a suspended lazy
			// clone): RAM is in the stream; the backend is a private file.
			l.spec.MemoryFile = &vmm.MemoryFile{Path: filepath.Join(l.v.dir, RAMFile)}
		}
		l.setRestore(RestoreEager, 0, "the memory state holds the RAM")
		return in, nil
	}
	in.IgnoreShared = true
	ram, err := l.p.cfg.Proxy.Open(ctx, l.src.image, l.src.config.RAM)
	if err != nil {
		return in, err
	}
	mode, why, stream := l.p.memoryMode(ram, l.prof)
	l.setRestore(mode, ram.Size(), why)
	if mode == RestoreEager {
		l.prof.abandon() // nothing of the RAM file is read through the view
		local := filepath.Join(l.v.dir, RAMFile)
		if err := copyRAM(ctx, ram, local); err != nil {
			return in, fmt.Errorf("copy the guest's RAM: %w", err)
		}
		l.spec.MemoryFile = &vmm.MemoryFile{Path: local}
		return in, nil
	}
	memMnt := l.p.cfg.MemoryMountpoint
	if memMnt == "" {
		memMnt = l.p.cfg.Mountpoint
	}
	l.spec.MemoryFile = &vmm.MemoryFile{Path: filepath.Join(memMnt, l.src.image, l.src.config.RAM)}
	l.v.mem = &lazyMem{ram: ram, profile: l.prof}
	if l.cloned() {
		if root, err := l.p.cfg.Proxy.Open(ctx, l.src.image, l.src.config.Root); err == nil {
			l.v.mem.root = root
		}
	}
	if stream {
		l.v.mem.streamRAM(l.v) // hydrate.go; the restore step's undo stops it
	}
	return in, nil
}

func (l *line) setRestore(mode MemoryRestore, size uint64, why string) {
	l.v.mu.Lock()
	l.v.ad.MemoryRestore, l.v.ad.MemoryBytes = string(mode), size
	l.v.mu.Unlock()
	l.log.Info("memory restore", zap.String("mode", string(mode)), zap.String("why", why), zap.Uint64("ram_bytes", size))
}

// copyRAM copies the RAM file's bytes into a sparse local file: zero
// blocks are holes, as in the golden file. The blocks come in the prefetch
// class, on the bulk connection: a bulk copy must not hold up running
// guests' demand reads. They are read block by block (ReadBlock), which
// no working-set recording sees: another clone of the image recording its
// profile on this plant must not take the copy for its guest's reads.
func copyRAM(ctx context.Context, ram gvfs.File, path string) error {
	if err := ram.Hydrate(ctx, gvfs.Prefetch, nil); err != nil {
		return err
	}
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(int64(ram.Size())); err != nil {
		return err
	}
	buf := make([]byte, imagev1.MaxBlockSize)
	bs := uint64(ram.Meta().BlockSize)
	for idx := uint64(0); idx*bs < ram.Size(); idx++ {
		b, err := ram.ReadBlock(ctx, idx, buf)
		if err != nil {
			return err
		}
		if b.Zero || blockproto.IsZero(b.Data) {
			continue
		}
		if _, err := out.WriteAt(b.Data, int64(idx*bs)); err != nil {
			return err
		}
	}
	return out.Close()
}

// hydrate starts fetching the rest of a lazily restored guest's RAM file
// and root disk in the background (hydrate.go).
func (l *line) hydrate(context.Context) (func(), error) {
	l.p.finishProfile(l.src.image, l.v.mem.profile, l.log)
	l.p.startHydration(l.v, l.log)
	return nil, nil
}

func (l *line) lazy() bool { return l.v.mem != nil }
