package vmm

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// ConsoleSocket is the unix socket of the machine's serial console: QEMU
// serves it to one client at a time, both ways (what the guest writes, what
// it reads), and logs the guest's output to console.log whether or not a
// client is attached.
func (s Spec) ConsoleSocket() string { return filepath.Join(s.Dir, consoleSocketName) }

// DialConsole attaches to a machine's serial console. QEMU serves one
// client at a time (a second connection waits, unserved, in the socket's
// backlog until the first goes), so callers allow one attachment.
func DialConsole(ctx context.Context, m Machine) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", m.Spec().ConsoleSocket())
	if err != nil {
		return nil, fmt.Errorf("vmm: console of %s: %w", orName(m.Spec().Name), err)
	}
	return c, nil
}

// ConsoleTail is the last n bytes (at most) the guest wrote to its console.
func ConsoleTail(m Machine, n int) []byte {
	if n <= 0 {
		return nil
	}
	f, err := os.Open(filepath.Join(m.Spec().Dir, consoleLogName))
	if err != nil {
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil
	}
	off := max(fi.Size()-int64(n), 0)
	b := make([]byte, fi.Size()-off)
	k, _ := f.ReadAt(b, off)
	return b[:k]
}
