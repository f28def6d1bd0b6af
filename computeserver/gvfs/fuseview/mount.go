package fuseview

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/services"
)

const (
	// MaxIO is the largest read or write the kernel sends (max_read).
	MaxIO = 1 << 20
	// missingTimeout is how long the kernel remembers that a name is not
	// there.
	missingTimeout = time.Second
)

// MountOptions configure Mount.
type MountOptions struct {
	// Debug logs every FUSE request.
	Debug bool
	// Logger receives warnings about the mount; nil means no logging.
	Logger *zap.Logger
	// ReadAheadKB is the kernel's read-ahead on the mount (0:
	// gvfs.ReadAheadKB). A view of guest RAM files takes a small one: a
	// page fault on a mapped file reads this much around the page.
	ReadAheadKB int
}

// View is a mounted FUSE view of a proxy.
type View struct {
	server *fuse.Server
	root   *fs.Inode
}

var _ gvfs.View = (*View)(nil)

// Mount mounts the view of p on dir and registers it with p, which unmounts
// it when it closes (Close unmounts it earlier). A mount left on dir by a
// killed process is aborted and detached first.
func Mount(dir string, p *gvfs.Proxy, o MountOptions) (*View, error) {
	log := services.LoggerOr(o.Logger)
	if err := clearDeadMount(dir, log); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	root := &rootNode{p: p}
	// The kernel keeps golden entries and attributes as long as the proxy
	// keeps their manifest: a name published again shows its new files as
	// soon as the proxy knows.
	gt, nt := p.GoldenRecheck(), missingTimeout
	server, err := mountPrivate(dir, root, &fs.Options{
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
	ra := o.ReadAheadKB
	if ra == 0 {
		ra = gvfs.ReadAheadKB
	}
	if err := setReadAhead(dir, ra); err != nil {
		log.Warn("could not raise read-ahead of the FUSE mount", zap.Error(err))
	}
	v := &View{server: server, root: &root.Inode}
	p.AddView(v)
	return v, nil
}

// Close unmounts the view; closing it again does nothing.
func (v *View) Close() error { return v.server.Unmount() }

// Invalidate asks the kernel to forget the cached pages of a file of the
// view ("" matches every image or file).
func (v *View) Invalidate(image, file string) {
	for name, img := range v.root.Children() {
		if image != "" && name != image {
			continue
		}
		for fname, f := range img.Children() {
			if file == "" || fname == file {
				f.NotifyContent(0, 0)
			}
		}
	}
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
