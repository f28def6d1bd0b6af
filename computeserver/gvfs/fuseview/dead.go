package fuseview

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"go.uber.org/zap"
)

// fsType is the type a view's mounts have in /proc/self/mountinfo.
const fsType = "fuse.vmgrid"

// clearDeadMount removes a view's mount left on dir by a process that is
// gone. It never stats dir: the kernel may send a stat of a mount whose
// server died to that server and wait for ever, when the dead server's
// /dev/fuse descriptor lives on in its children. It reads
// /proc/self/mountinfo instead, aborts the connection through
// /sys/fs/fuse/connections/N/abort (which fails every request waiting on
// it, so hung readers go on with ENOTCONN), and detaches the mount.
//
// A vmgrid mount found on dir is taken to be dead: a view is mounted once,
// by the compute server that holds the lock on the caches of its data dir.
func clearDeadMount(dir string, log *zap.Logger) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for {
		conn, found, err := mountAt(abs)
		if err != nil || !found {
			return err
		}
		log.Warn("aborting and unmounting a FUSE view left by a killed process", zap.String("dir", abs), zap.Uint64("connection", conn))
		abortConnection(conn, log)
		if err := syscall.Unmount(abs, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount dead view %s: %w", abs, err)
		}
	}
}

// mountAt finds the topmost view mounted on dir in /proc/self/mountinfo
// and returns its FUSE connection number (its device number).
func mountAt(dir string) (conn uint64, found bool, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPEROPTIONS
		fields := strings.Fields(sc.Text())
		sep := indexOf(fields, "-")
		if sep < 5 || sep+1 >= len(fields) || unescape(fields[4]) != dir || fields[sep+1] != fsType {
			continue
		}
		if c, ok := connectionOf(fields[2]); ok {
			conn, found = c, true // later lines are mounted on top
		}
	}
	return conn, found, sc.Err()
}

// connectionOf turns a mountinfo device (MAJOR:MINOR) into the number of
// its FUSE connection: the kernel's dev_t, major<<20 | minor.
func connectionOf(dev string) (uint64, bool) {
	maj, mnr, ok := strings.Cut(dev, ":")
	if !ok {
		return 0, false
	}
	a, err1 := strconv.ParseUint(maj, 10, 32)
	b, err2 := strconv.ParseUint(mnr, 10, 32)
	return a<<20 | b, err1 == nil && err2 == nil
}

// connectionsDir is where the fusectl file system shows FUSE connections.
const connectionsDir = "/sys/fs/fuse/connections"

func abortConnection(conn uint64, log *zap.Logger) {
	if err := mountFusectl(); err != nil {
		log.Warn("could not mount fusectl to abort a dead FUSE connection", zap.Error(err))
	}
	path := filepath.Join(connectionsDir, strconv.FormatUint(conn, 10), "abort")
	if err := os.WriteFile(path, []byte("1"), 0o200); err != nil && !os.IsNotExist(err) {
		// Gone already (the connection ended with its last descriptor).
		log.Warn("could not abort the FUSE connection", zap.String("path", path), zap.Error(err))
	}
}

// mountFusectl mounts the FUSE control file system where systemd would
// have (it is left mounted: it is the system's, not the view's).
func mountFusectl() error {
	if _, err := os.Stat(connectionsDir); err != nil {
		return err
	}
	if fusectlMounted() {
		return nil
	}
	return syscall.Mount("fusectl", connectionsDir, "fusectl", 0, "")
}

func fusectlMounted() bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	return err == nil && strings.Contains(string(b), " - fusectl ")
}

func indexOf(fields []string, s string) int {
	for i, f := range fields {
		if f == s {
			return i
		}
	}
	return -1
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
