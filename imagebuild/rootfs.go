package imagebuild

import (
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// DeviceNode is a device special file to create in a disk image.
type DeviceNode struct {
	Path         string      // guest path, e.g. /dev/console
	Char         bool        // character (true) or block (false) device
	Major, Minor uint32      //
	Perm         os.FileMode // permission bits
}

// BaseDeviceNodes are the nodes a root file system needs before devtmpfs is
// mounted: the kernel opens /dev/console for init's stdin/stdout/stderr, and
// without /dev/null a shell on a read-only root silently skips every
// `cmd 2>/dev/null` (the redirection fails, so cmd never runs).
var BaseDeviceNodes = []DeviceNode{
	{Path: "/dev/console", Char: true, Major: 5, Minor: 1, Perm: 0o600},
	{Path: "/dev/null", Char: true, Major: 1, Minor: 3, Perm: 0o666},
}

// MakeExt4 writes an ext4 file system of size bytes holding the tree rootDir
// to the file disk (a sparse raw image), then adds device nodes. The nodes
// are created with debugfs inside the image rather than with mknod in
// rootDir, so building needs no privilege for them. 4 KiB blocks match the
// block size of the image server's meta-data.
func MakeExt4(ctx context.Context, rootDir, disk string, size int64, nodes []DeviceNode) error {
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if _, err := run(ctx, "", "mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "vmgrid-root", "-E", "root_owner=0:0", "-d", rootDir, disk); err != nil {
		return err
	}
	if len(nodes) == 0 {
		return nil
	}
	var script strings.Builder
	for _, n := range nodes {
		kind, typ := "b", 0o060000
		if n.Char {
			kind, typ = "c", 0o020000
		}
		p := path.Clean("/" + n.Path)
		// debugfs's mknod takes a name in the current directory (a name with
		// a slash becomes a corrupt directory entry), hence the cd. It fails
		// if the name exists; rm first so a caller's file of the same name is
		// replaced, as a node is what was asked for.
		fmt.Fprintf(&script, "cd %s\n", path.Dir(p))
		fmt.Fprintf(&script, "rm %s\n", path.Base(p))
		fmt.Fprintf(&script, "mknod %s %s %d %d\n", path.Base(p), kind, n.Major, n.Minor)
		fmt.Fprintf(&script, "sif %s mode 0%o\n", p, typ|int(n.Perm.Perm()))
	}
	cmdFile := disk + ".debugfs"
	if err := os.WriteFile(cmdFile, []byte(script.String()), 0o644); err != nil {
		return err
	}
	defer os.Remove(cmdFile)
	cmd := exec.CommandContext(ctx, "debugfs", "-w", "-f", cmdFile, disk)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("add device nodes: debugfs: %w: %s", err, tail(stderr.String(), 2000))
	}
	// debugfs exits 0 even when a command fails; it says so on stderr. Only
	// its banner and the rm of a name that did not exist are expected there.
	for _, line := range strings.Split(stderr.String(), "\n") {
		if line == "" || strings.HasPrefix(line, "debugfs ") || strings.HasPrefix(line, "rm: File not found") {
			continue
		}
		return fmt.Errorf("add device nodes: debugfs: %s", line)
	}
	return nil
}

// InstallBusybox copies a static busybox to rootDir/bin/busybox and links
// every applet it has (busybox --list-full) to it, so the read-only root
// needs no `busybox --install` at boot. Existing files are kept: a recipe's
// own /sbin/init wins over busybox's init applet.
func InstallBusybox(ctx context.Context, rootDir, busybox string) error {
	if err := requireStatic(busybox); err != nil {
		return err
	}
	if err := copyFile(busybox, filepath.Join(rootDir, "bin", "busybox"), 0o755); err != nil {
		return fmt.Errorf("install busybox: %w", err)
	}
	out, err := run(ctx, "", busybox, "--list-full")
	if err != nil {
		return fmt.Errorf("list busybox applets: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "bin/busybox" {
			continue
		}
		link := filepath.Join(rootDir, applet)
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			return err
		}
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink("/bin/busybox", link); err != nil {
			return fmt.Errorf("link applet %s: %w", applet, err)
		}
	}
	return nil
}

// requireStatic fails unless busybox is a statically linked executable: a
// dynamic one (Debian's "busybox" package) would find no libc in the guest,
// and init would fail with a bare "not found".
func requireStatic(busybox string) error {
	f, err := elf.Open(busybox)
	if err != nil {
		return fmt.Errorf("busybox %s: %w (install busybox-static)", busybox, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked; the guest needs a static one (install busybox-static)", busybox)
		}
	}
	return nil
}

// copyFile copies src to dst (creating parent directories) with mode perm.
func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(tmp)
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Chmod(tmp, perm); err != nil { // umask-proof
		return err
	}
	return os.Rename(tmp, dst)
}

// writeFile writes data to rootDir/guestPath with mode perm, creating parents.
func writeFile(rootDir, guestPath string, data []byte, perm os.FileMode) error {
	p := filepath.Join(rootDir, filepath.FromSlash(guestPath))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(p, data, perm); err != nil {
		return err
	}
	return os.Chmod(p, perm)
}
