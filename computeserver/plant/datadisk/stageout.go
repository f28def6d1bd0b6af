package datadisk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// StageOut uploads the regular files under guestDir ("" is StageOutDir) of
// the ext4 image diskImage to remotePrefix/RELATIVE-PATH and returns the
// remote paths it stored, sorted. The image is read without mounting it
// (debugfs), so the VM must be stopped; a journal left by an unclean stop
// is replayed first (e2fsck -E journal_only), which writes to the image.
//
// The guest controls the image, so nothing it holds names a host path:
// directories are listed with "ls -p" and each file is streamed from its
// inode with "cat <INO>" straight into an upload (debugfs's rdump would
// follow a crafted name like "../../x" out of its target directory).
// Entries that cannot be staged out (names outside [A-Za-z0-9._-], links,
// devices, files larger than the image itself) are skipped; the error then
// lists them, and the files that were uploaded are still returned. An empty
// or half-written directory stages out what it holds.
func StageOut(ctx context.Context, c *dataclient.Client, diskImage, guestDir, remotePrefix string) ([]string, error) {
	guestDir = strings.Trim(guestDir, "/")
	if guestDir == "" {
		guestDir = StageOutDir
	}
	if err := datav1.ValidatePath("guest directory", guestDir); err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	remotePrefix = strings.TrimSuffix(remotePrefix, "/")
	if remotePrefix != "" {
		if err := datav1.ValidatePath("remote prefix", remotePrefix); err != nil {
			return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
		}
	}
	st, err := os.Stat(diskImage)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("the data disk: %w: %w", err, errdefs.ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	x, err := newImageReader(diskImage)
	if err != nil {
		return nil, err
	}
	if err := x.replayJournal(ctx); err != nil {
		return nil, err
	}
	files, problems, err := x.walk(ctx, guestDir)
	if ctx.Err() != nil {
		return nil, fmt.Errorf("stage-out of %s: %w", diskImage, ctx.Err())
	}
	if err != nil {
		return nil, err
	}
	var uploaded []string
	for _, f := range files {
		remote := f.rel
		if remotePrefix != "" {
			remote = remotePrefix + "/" + f.rel
		}
		if err := datav1.ValidatePath("remote path", remote); err != nil {
			problems = append(problems, fmt.Errorf("/%s/%s: %w", guestDir, f.rel, err))
			continue
		}
		if f.size > uint64(st.Size()) {
			problems = append(problems, fmt.Errorf("/%s/%s: %d bytes, more than the whole image: a sparse file, skipped", guestDir, f.rel, f.size))
			continue
		}
		if err := x.upload(ctx, c, f, remote); err != nil {
			if ctx.Err() != nil {
				return uploaded, fmt.Errorf("stage-out of %s: %w: %w", diskImage, err, ctx.Err())
			}
			problems = append(problems, fmt.Errorf("/%s/%s: %w", guestDir, f.rel, err))
			continue
		}
		uploaded = append(uploaded, remote)
	}
	if len(problems) > 0 {
		err := errors.Join(problems...)
		if errdefs.Code(err) == codes.Unknown {
			// What the guest left cannot be staged out as it is.
			err = fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
		}
		return uploaded, fmt.Errorf("stage-out of %s: %d of %d entries not uploaded: %w", diskImage, len(problems), len(problems)+len(uploaded), err)
	}
	return uploaded, nil
}

// imageReader reads an ext4 image through e2fsprogs, never through a mount.
type imageReader struct {
	image   string
	debugfs string
}

func newImageReader(image string) (*imageReader, error) {
	d, err := tool("debugfs")
	if err != nil {
		return nil, err
	}
	return &imageReader{image: image, debugfs: d}, nil
}

// debugfsEnv keeps debugfs from starting a pager.
var debugfsEnv = append(os.Environ(), "DEBUGFS_PAGER=__none__", "PAGER=__none__")

// run runs one debugfs request in catastrophic mode (read-only, bitmaps not
// read: faster, and tolerant of a file system the guest left half-written).
func (x *imageReader) run(ctx context.Context, request string) ([]byte, string, error) {
	cmd := exec.CommandContext(ctx, x.debugfs, "-c", "-R", request, x.image)
	cmd.Env = debugfsEnv
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	return out, debugfsMessage(stderr.String()), err
}

// debugfsMessage drops debugfs's banner lines from its stderr.
func debugfsMessage(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "debugfs ") || strings.Contains(l, "catastrophic mode") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "; ")
}

func (x *imageReader) replayJournal(ctx context.Context) error {
	dumpe2fs, err := tool("dumpe2fs")
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, dumpe2fs, "-h", x.image).Output()
	if err != nil {
		return fmt.Errorf("%s is not an ext2/3/4 image (dumpe2fs: %v): %w", x.image, err, errdefs.ErrInvalidArgument)
	}
	if !bytes.Contains(out, []byte("needs_recovery")) {
		return nil
	}
	e2fsck, err := tool("e2fsck")
	if err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, e2fsck, "-E", "journal_only", "-p", x.image).CombinedOutput(); err != nil {
		return fmt.Errorf("replay the journal of %s: %v: %s", x.image, err, bytes.TrimSpace(out))
	}
	return nil
}

// imageFile is a regular file found in the image.
type imageFile struct {
	ino  uint64
	rel  string // slash path below the staged-out directory
	size uint64
}

type dirent struct {
	ino  uint64
	mode uint32
	name string
	size uint64
}

const (
	modeType = 0o170000
	modeDir  = 0o040000
	modeReg  = 0o100000
	// maxEntries bounds a walk through a crafted image.
	maxEntries = 1 << 20
)

// list lists one directory, by path ("/out") or inode ("<12>").
func (x *imageReader) list(ctx context.Context, spec string) (ents []dirent, self uint64, bad []string, err error) {
	out, msg, err := x.run(ctx, "ls -p "+spec)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("debugfs ls %s: %v: %s", spec, err, msg)
	}
	// "/INO/MODE/UID/GID/NAME/SIZE/" per entry, SIZE empty for directories.
	// A name holding '/' yields more fields: it is skipped, never parsed.
	for _, line := range strings.Split(string(out), "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(strings.TrimSuffix(strings.TrimPrefix(line, "/"), "/"), "/")
		if len(f) != 6 || !strings.HasPrefix(line, "/") || !strings.HasSuffix(line, "/") {
			bad = append(bad, line)
			continue
		}
		ino, err1 := strconv.ParseUint(f[0], 10, 32)
		mode, err2 := strconv.ParseUint(f[1], 8, 32)
		if err1 != nil || err2 != nil {
			bad = append(bad, line)
			continue
		}
		if ino == 0 {
			// An unused slot (a deleted entry, an htree index block):
			// debugfs lists them once a directory has grown.
			continue
		}
		d := dirent{ino: ino, mode: uint32(mode), name: f[4]}
		if d.mode&modeType != modeDir {
			if d.size, err = strconv.ParseUint(f[5], 10, 64); err != nil {
				bad = append(bad, line)
				continue
			}
		}
		switch d.name {
		case ".":
			self = d.ino
		case "..":
		default:
			ents = append(ents, d)
		}
	}
	if self == 0 {
		return nil, 0, nil, fmt.Errorf("%s has no directory %s (debugfs: %s): %w", x.image, spec, msg, errdefs.ErrNotFound)
	}
	return ents, self, bad, nil
}

// walk lists the regular files under /dir, breadth first, and the entries
// it had to skip.
func (x *imageReader) walk(ctx context.Context, dir string) ([]imageFile, []error, error) {
	ents, self, bad, err := x.list(ctx, "/"+dir)
	if err != nil {
		return nil, nil, err
	}
	type pending struct {
		rel  string
		ents []dirent
		bad  []string
	}
	var files []imageFile
	var problems []error
	seen := map[uint64]bool{self: true}
	queue := []pending{{"", ents, bad}}
	count := 0
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		where := path.Join("/"+dir, d.rel)
		for _, line := range d.bad {
			problems = append(problems, fmt.Errorf("%s: an entry debugfs lists as %q has a name with '/' or is damaged; skipped", where, line))
		}
		for _, e := range d.ents {
			if count++; count > maxEntries {
				return nil, nil, fmt.Errorf("/%s holds more than %d entries: %w", dir, maxEntries, errdefs.ErrResourceExhausted)
			}
			rel := path.Join(d.rel, e.name)
			if err := datav1.ValidatePath("name", e.name); err != nil {
				problems = append(problems, fmt.Errorf("%s: %w; skipped", where, err))
				continue
			}
			switch e.mode & modeType {
			case modeReg:
				files = append(files, imageFile{ino: e.ino, rel: rel, size: e.size})
			case modeDir:
				if seen[e.ino] || strings.Count(rel, "/")+1 >= datav1.MaxDepth {
					problems = append(problems, fmt.Errorf("%s/%s: a directory loop or too deep; skipped", where, e.name))
					continue
				}
				seen[e.ino] = true
				sub, _, bad, err := x.list(ctx, fmt.Sprintf("<%d>", e.ino))
				if err != nil {
					problems = append(problems, fmt.Errorf("%s/%s: %w", where, e.name, err))
					continue
				}
				queue = append(queue, pending{rel, sub, bad})
			default:
				problems = append(problems, fmt.Errorf("%s/%s: not a regular file or directory (mode %06o); skipped", where, e.name, e.mode))
			}
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].rel < files[j].rel })
	return files, problems, nil
}

// upload streams one file out of the image ("cat <INO>") into an upload.
// The upload commits only if debugfs produced exactly the inode's size and
// exited cleanly.
func (x *imageReader) upload(ctx context.Context, c *dataclient.Client, f imageFile, remote string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := exec.CommandContext(ctx, x.debugfs, "-c", "-R", fmt.Sprintf("cat <%d>", f.ino), x.image)
	cmd.Env = debugfsEnv
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	r := &catReader{r: stdout, left: f.size, wait: cmd.Wait, stderr: &stderr}
	_, err = c.UploadReader(ctx, r, int64(f.size), remote, nil)
	if !r.waited {
		cancel()
		_ = cmd.Wait()
	}
	return err
}

// catReader passes on exactly left bytes, then EOF once debugfs exited
// cleanly; anything else is an error, which aborts the upload.
type catReader struct {
	r      io.Reader
	left   uint64
	wait   func() error
	waited bool
	stderr *bytes.Buffer
}

func (r *catReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if uint64(n) > r.left {
		return 0, fmt.Errorf("debugfs produced more bytes than the file's size")
	}
	r.left -= uint64(n)
	if errors.Is(err, io.EOF) {
		r.waited = true
		if werr := r.wait(); werr != nil {
			return n, fmt.Errorf("debugfs cat: %v: %s", werr, debugfsMessage(r.stderr.String()))
		}
		if r.left != 0 {
			return n, fmt.Errorf("debugfs stopped %d bytes short of the file's size: %s", r.left, debugfsMessage(r.stderr.String()))
		}
	}
	return n, err
}
