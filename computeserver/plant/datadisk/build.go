package datadisk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// The data disk a plant attaches to a VM (Goiri §3): an ext4 file system
// labelled Label holding the task's inputs under in/ and an empty,
// world-writable out/ where the task leaves its outputs.
const (
	Label       = "vmgrid-data"
	StageInDir  = "in"
	StageOutDir = "out"
)

// DefaultSizeMiB is the size of a data disk for inputs of inputBytes:
// twice the inputs (room for outputs of the same order) plus 64 MiB.
func DefaultSizeMiB(inputBytes uint64) uint64 {
	return (2*inputBytes+(1<<20)-1)>>20 + 64
}

// Build downloads files (remote paths, read with c: the owner's
// client, or one from ForOwner for shared files) and makes dest an ext4
// image holding them as in/PATH, plus an empty out/ directory every guest
// user may write. sizeMiB is the image size; 0 picks DefaultSizeMiB.
//
// The image has no journal: stage-out reads it without mounting it
// (debugfs), which would not see writes a journal still held. dest appears
// only when complete.
func Build(ctx context.Context, c *dataclient.Client, files []string, sizeMiB uint64, dest string) error {
	set := map[string]bool{}
	for _, p := range files {
		if err := datav1.ValidatePath("stage-in file", p); err != nil {
			return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
		}
		set[p] = true
	}
	paths := make([]string, 0, len(set))
	for p := range set {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if set[d] {
				return fmt.Errorf("stage-in files %q and %q: a path cannot be both a file and a directory: %w", d, p, errdefs.ErrInvalidArgument)
			}
		}
		paths = append(paths, p)
	}
	sort.Strings(paths)
	mkfs, err := tool("mkfs.ext4")
	if err != nil {
		return err
	}
	stage, err := os.MkdirTemp(filepath.Dir(dest), ".datadisk-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	// The root of the new file system takes the mode of stage (0700).
	if err := os.Chmod(stage, 0o755); err != nil {
		return err
	}
	var total uint64
	for _, p := range paths {
		local := filepath.Join(stage, StageInDir, filepath.FromSlash(p))
		if err := mkdirAll755(stage, filepath.Dir(local)); err != nil {
			return err
		}
		info, err := c.Download(ctx, p, local, nil)
		if err != nil {
			return fmt.Errorf("stage in %s: %w", p, err)
		}
		if err := os.Chmod(local, 0o644); err != nil {
			return err
		}
		total += info.Size
	}
	if err := mkdirAll755(stage, filepath.Join(stage, StageInDir)); err != nil {
		return err
	}
	out := filepath.Join(stage, StageOutDir)
	if err := os.Mkdir(out, 0o777); err != nil {
		return err
	}
	if err := os.Chmod(out, 0o777); err != nil { // past the umask
		return err
	}
	if sizeMiB == 0 {
		sizeMiB = DefaultSizeMiB(total)
	}
	// Files take whole 4 KiB blocks; inode tables, bitmaps and directories
	// take a few MiB more.
	if need := total + uint64(len(paths))*4096 + 4<<20; sizeMiB<<20 < need {
		return fmt.Errorf("a data disk of %d MiB cannot hold %d bytes of inputs; give at least %d MiB: %w", sizeMiB, total, (need+(1<<20)-1)>>20, errdefs.ErrInvalidArgument)
	}
	tmp := dest + ".tmp-" + fsutil.RandomSuffix()
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-d", stage, "-L", Label,
		"-m", "0", "-O", "^has_journal", tmp, strconv.FormatUint(sizeMiB, 10)+"M")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("mkfs.ext4 of %d MiB: %v: %s", sizeMiB, err, bytes.TrimSpace(out))
	}
	if err := os.Rename(tmp, dest); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// mkdirAll755 creates dir and its parents up to root with mode 0755,
// whatever the umask, so a guest user can read the inputs.
func mkdirAll755(root, dir string) error {
	if dir == root {
		return nil
	}
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		return nil
	}
	if err := mkdirAll755(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return os.Chmod(dir, 0o755)
}

// tool finds an e2fsprogs program, also in the sbin directories a non-root
// PATH often lacks.
func tool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: install e2fsprogs: %w", name, errdefs.ErrFailedPrecondition)
}
