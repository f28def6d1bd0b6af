package vmm

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/services"
)

// DefaultBinary is the QEMU system emulator the driver runs.
const DefaultBinary = "qemu-system-x86_64"

// ErrNoQEMU is returned by Start when the QEMU binary is not installed.
var ErrNoQEMU = errors.New("qemu-system-x86_64 not found (install qemu-system-x86)")

// QEMU is the Driver for QEMU's system emulator.
type QEMU struct {
	// Binary is the emulator; empty means DefaultBinary from $PATH.
	Binary string
	// Accel is the default accelerator for specs that name none: "tcg"
	// when empty. Set "kvm" only where KVMWorks says a guest really boots.
	Accel string
	// StopTimeout bounds Stop's wait for QEMU to quit when the caller's
	// context has no deadline; 0 means 10 s.
	StopTimeout time.Duration
	// Logger receives lifecycle events; nil logs nothing.
	Logger *zap.Logger
}

var _ Driver = (*QEMU)(nil)

// Time limits for steps whose caller gave no deadline.
const (
	defaultStartTimeout = 30 * time.Second
	defaultStopTimeout  = 10 * time.Second
	pollEvery           = 10 * time.Millisecond
	consolePollEvery    = 20 * time.Millisecond
	tailBytes           = 4096
)

// stateFDName is the monitor's name for the memory-state file descriptor.
const stateFDName = "vmgrid-state"

// suspendBandwidth lifts QEMU's default migration bandwidth cap (which
// makes saving about 7x slower): 4 GiB/s.
const suspendBandwidth = 4 << 30

// Available reports whether the QEMU binary can be found.
func (d *QEMU) Available() bool {
	_, err := exec.LookPath(d.binary())
	return err == nil
}

func (d *QEMU) binary() string {
	if d.Binary == "" {
		return DefaultBinary
	}
	return d.Binary
}

func (d *QEMU) log() *zap.Logger { return services.LoggerOr(d.Logger) }

// Start implements Driver.
func (d *QEMU) Start(ctx context.Context, spec Spec) (Machine, error) {
	start := time.Now()
	spec, err := prepare(spec)
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultStartTimeout)
		defer cancel()
	}
	bin, err := exec.LookPath(d.binary())
	if err != nil {
		return nil, fmt.Errorf("vmm: %w: %v", ErrNoQEMU, err)
	}
	if err := os.MkdirAll(spec.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("vmm: %w", err)
	}
	// Leftovers of an earlier machine in the same directory would be taken
	// for this one's.
	for _, name := range []string{qmpSocketName, consoleSocketName, consoleLogName, qemuLogName} {
		if err := os.Remove(filepath.Join(spec.Dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("vmm: %w", err)
		}
	}
	accel := cmp.Or(spec.Accel, d.Accel, "tcg")
	spec.Accel = accel

	logFile, err := os.Create(filepath.Join(spec.Dir, qemuLogName))
	if err != nil {
		return nil, fmt.Errorf("vmm: %w", err)
	}
	defer logFile.Close() // the child has its own copy
	cmd := exec.Command(bin, spec.args(accel)...)
	cmd.Dir = spec.Dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = nicFiles(spec.NICs) // nic.go
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: Kill reaches QEMU and anything it
		// spawned, and a terminal's ^C does not.
		Setpgid: true,
		// If this process dies without stopping the machine, so does QEMU.
		Pdeathsig: syscall.SIGKILL,
	}
	done := make(chan struct{})
	if err := startQEMU(cmd, spec, done); err != nil { // nothp.go
		return nil, fmt.Errorf("vmm: start %s: %w", bin, err)
	}
	m := &machine{
		spec:        spec,
		cmd:         cmd,
		log:         d.log().With(zap.String("machine", orName(spec.Name)), zap.Int("pid", cmd.Process.Pid)),
		stopTimeout: d.StopTimeout,
		done:        done,
	}
	if m.stopTimeout == 0 {
		m.stopTimeout = defaultStopTimeout
	}
	go m.reap()

	if err := m.connect(ctx); err != nil {
		_ = m.Kill()
		return nil, err
	}
	if spec.Incoming != nil {
		if err := m.startIncoming(ctx); err != nil {
			_ = m.Kill()
			return nil, err
		}
	}
	m.log.Info("machine started", zap.String("accel", accel), zap.Bool("incoming", spec.Incoming != nil),
		zap.Duration("took", time.Since(start)))
	m.log.Debug("qemu command line", zap.Strings("args", cmd.Args))
	return m, nil
}

// prepare copies spec (the caller's slices are not touched), applies
// defaults, makes paths absolute and validates it.
func prepare(spec Spec) (Spec, error) {
	spec.Disks = slices.Clone(spec.Disks)
	spec.Channels = slices.Clone(spec.Channels)
	spec.ExtraArgs = slices.Clone(spec.ExtraArgs)
	if spec.MemoryFile != nil {
		mf := *spec.MemoryFile
		spec.MemoryFile = &mf
	}
	if spec.Incoming != nil {
		in := *spec.Incoming
		spec.Incoming = &in
	}
	spec.setDefaults()
	abs := func(p *string) {
		if *p != "" {
			if a, err := filepath.Abs(*p); err == nil {
				*p = a
			}
		}
	}
	abs(&spec.Dir)
	abs(&spec.Kernel)
	abs(&spec.Initrd)
	for i := range spec.Disks {
		abs(&spec.Disks[i].Path)
	}
	for i := range spec.Channels {
		abs(&spec.Channels[i].Socket)
	}
	if spec.MemoryFile != nil {
		abs(&spec.MemoryFile.Path)
	}
	if spec.Incoming != nil {
		abs(&spec.Incoming.Path)
	}
	if err := spec.Validate(); err != nil {
		return spec, fmt.Errorf("vmm: %w", err)
	}
	return spec, nil
}

// machine is a running QEMU process.
type machine struct {
	spec        Spec
	cmd         *exec.Cmd
	qmp         *QMP
	log         *zap.Logger
	stopTimeout time.Duration

	done    chan struct{} // closed after the process is reaped
	waitErr error         // valid after done

	cleanupOnce sync.Once
}

var _ Machine = (*machine)(nil)

func (m *machine) Spec() Spec              { return m.spec }
func (m *machine) Pid() int                { return m.cmd.Process.Pid }
func (m *machine) Exited() <-chan struct{} { return m.done }

func (m *machine) reap() {
	err := m.cmd.Wait()
	// Anything QEMU left behind in its group (an exec: migration helper)
	// goes with it. The group id cannot have been reused yet: that needs
	// the pid to wrap around.
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
	m.waitErr = err
	m.log.Debug("machine exited", zap.Error(err))
	close(m.done)
}

func (m *machine) exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// fail wraps err with the console's and QEMU's last words.
func (m *machine) fail(op string, err error) error {
	var me *MachineError
	if errors.As(err, &me) {
		return err
	}
	if m.exited() {
		status := "exit status 0"
		if m.waitErr != nil {
			status = m.waitErr.Error()
		}
		if errors.Is(err, ErrExited) {
			err = fmt.Errorf("%w (%s)", ErrExited, status)
		} else {
			err = fmt.Errorf("%w (%s): %w", ErrExited, status, err)
		}
	}
	return &MachineError{
		Machine: m.spec.Name,
		Op:      op,
		Err:     err,
		Console: tailFile(filepath.Join(m.spec.Dir, consoleLogName), tailBytes),
		QEMULog: tailFile(filepath.Join(m.spec.Dir, qemuLogName), tailBytes),
	}
}

// connect waits for QEMU's monitor socket and completes the handshake.
func (m *machine) connect(ctx context.Context) error {
	path := filepath.Join(m.spec.Dir, qmpSocketName)
	for {
		if _, err := os.Stat(path); err == nil {
			q, err := DialQMP(ctx, path, m.log)
			if err == nil {
				m.qmp = q
				return nil
			}
			if ctx.Err() != nil || m.exited() {
				return m.fail("connect to monitor", err)
			}
		}
		select {
		case <-m.done:
			return m.fail("start", ErrExited)
		case <-ctx.Done():
			return m.fail("wait for monitor socket", ctx.Err())
		case <-time.After(pollEvery):
		}
	}
}

// startIncoming hands the memory-state file to QEMU and starts loading it.
// The file goes over the monitor as a descriptor rather than as
// "exec:cat FILE": QEMU reads it directly, and there is no helper process.
func (m *machine) startIncoming(ctx context.Context) error {
	in := m.spec.Incoming
	if in.Live {
		return nil // the caller listens (ListenIncoming)
	}
	if in.IgnoreShared {
		if err := m.qmp.MigrateSetCapabilities(ctx, map[string]bool{"x-ignore-shared": true}); err != nil {
			return m.fail("restore", err)
		}
	}
	f, err := os.Open(in.Path)
	if err != nil {
		return m.fail("restore", err)
	}
	defer f.Close() // QEMU holds its own duplicate
	if err := m.qmp.GetFD(ctx, stateFDName, int(f.Fd())); err != nil {
		return m.fail("restore", err)
	}
	if err := m.qmp.MigrateIncoming(ctx, "fd:"+stateFDName); err != nil {
		return m.fail("restore", err)
	}
	return nil
}

func (m *machine) Wait(ctx context.Context) error {
	select {
	case <-m.done:
		m.cleanup()
		if m.waitErr != nil {
			return m.fail("run", m.waitErr)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (m *machine) QMP(ctx context.Context, command string, args, result any) error {
	if err := m.qmp.Execute(ctx, command, args, result); err != nil {
		return m.fail(command, err)
	}
	return nil
}

func (m *machine) Status(ctx context.Context) (string, error) {
	s, err := m.qmp.QueryStatus(ctx)
	if err != nil {
		return "", m.fail("query-status", err)
	}
	return s.Status, nil
}

func (m *machine) Pause(ctx context.Context) error {
	if err := m.qmp.Stop(ctx); err != nil {
		return m.fail("pause", err)
	}
	return nil
}

func (m *machine) Continue(ctx context.Context) error {
	if err := m.qmp.Cont(ctx); err != nil {
		return m.fail("continue", err)
	}
	return nil
}

func (m *machine) Suspend(ctx context.Context, path string) error {
	start := time.Now()
	info, err := m.saveFile(ctx, path, "suspend")
	if err != nil {
		return err
	}
	saved := time.Since(start)
	if err := m.Stop(ctx); err != nil {
		return err
	}
	fields := []zap.Field{zap.String("file", path), zap.Duration("save", saved), zap.Duration("took", time.Since(start)),
		zap.Int64("downtime_ms", info.Downtime)}
	if info.RAM != nil {
		fields = append(fields, zap.Int64("ram_bytes", info.RAM.Transferred), zap.Int64("zero_pages", info.RAM.Duplicate))
	}
	m.log.Info("machine suspended", fields...)
	return nil
}

func (m *machine) Save(ctx context.Context, path string) error {
	_, err := m.saveFile(ctx, path, "save")
	return err
}

// saveFile saves the guest's state to path, published whole by a rename,
// and leaves the machine paused; on failure it leaves it running, with no
// file at path.
func (m *machine) saveFile(ctx context.Context, path, op string) (MigrationInfo, error) {
	path, err := filepath.Abs(path)
	if err != nil {
		return MigrationInfo{}, err
	}
	partial := path + ".partial"
	info, err := m.save(ctx, partial)
	if err == nil {
		// Published only when complete: a reader never sees half a state.
		err = os.Rename(partial, path)
	}
	if err != nil {
		os.Remove(partial)
		// Leave the machine as it was: running.
		if st, serr := m.qmp.QueryStatus(ctx); serr == nil && !st.Running {
			if cerr := m.qmp.Cont(ctx); cerr != nil {
				m.log.Warn("could not resume the guest after a failed "+op, zap.Error(cerr))
			}
		}
		return MigrationInfo{}, m.fail(op, err)
	}
	return info, nil
}

// save pauses the guest and writes its state to file.
func (m *machine) save(ctx context.Context, file string) (MigrationInfo, error) {
	if err := m.qmp.MigrateSetParameters(ctx, map[string]any{"max-bandwidth": suspendBandwidth}); err != nil {
		return MigrationInfo{}, err
	}
	// A shared RAM file is the memory image itself: leave it out of the
	// stream (the restoring side must set the same capability). Set either
	// way: a machine restored with x-ignore-shared keeps the capability,
	// and its stream would then ask for it on restore.
	share := m.spec.MemoryFile != nil && m.spec.MemoryFile.Share && !m.spec.MemoryFile.Memfd
	if err := m.qmp.MigrateSetCapabilities(ctx, map[string]bool{"x-ignore-shared": share}); err != nil {
		return MigrationInfo{}, err
	}
	if err := m.qmp.Stop(ctx); err != nil {
		return MigrationInfo{}, err
	}
	// QEMU writes into a descriptor of ours rather than through
	// "exec:cat > FILE": no helper process, no shell quoting of the path,
	// and no race at the end (when QEMU closes an exec: channel it SIGTERMs
	// the helper if that has not exited yet; not seen to truncate a state
	// in practice, but the descriptor has no such window). When "completed"
	// is reported, every byte has been written into the file.
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return MigrationInfo{}, err
	}
	err = m.qmp.GetFD(ctx, stateFDName, int(f.Fd()))
	f.Close() // QEMU holds its own duplicate
	if err != nil {
		return MigrationInfo{}, err
	}
	if err := m.qmp.Migrate(ctx, "fd:"+stateFDName); err != nil {
		return MigrationInfo{}, err
	}
	return m.qmp.WaitMigration(ctx, pollEvery)
}

func (m *machine) Resume(ctx context.Context) error {
	start := time.Now()
	if m.spec.Incoming == nil {
		return m.fail("resume", errors.New("the machine was not started with Spec.Incoming"))
	}
	for {
		st, err := m.qmp.QueryStatus(ctx)
		if err != nil {
			return m.fail("resume: wait for the memory state", err)
		}
		switch st.Status {
		case "inmigrate":
			// still loading
		case "paused", "prelaunch":
			if err := m.qmp.Cont(ctx); err != nil {
				return m.fail("resume", err)
			}
			m.log.Info("machine resumed", zap.String("state", m.spec.Incoming.Path), zap.Duration("took", time.Since(start)))
			return nil
		case "running":
			return nil
		default:
			return m.fail("resume", fmt.Errorf("machine is %s after loading its memory state", st.Status))
		}
		select {
		case <-m.done:
			return m.fail("resume", ErrExited)
		case <-ctx.Done():
			return m.fail("resume: wait for the memory state", ctx.Err())
		case <-time.After(pollEvery):
		}
	}
}

func (m *machine) Stop(ctx context.Context) error {
	if !m.exited() {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, m.stopTimeout)
			defer cancel()
		}
		if err := m.qmp.Quit(ctx); err != nil {
			m.log.Debug("quit", zap.Error(err))
		}
		select {
		case <-m.done:
		case <-ctx.Done():
			m.log.Warn("machine did not quit in time; killing it")
			return m.Kill()
		}
	}
	m.cleanup()
	return nil
}

func (m *machine) Kill() error {
	if !m.exited() {
		if err := syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return m.fail("kill", err)
		}
		<-m.done
	}
	m.cleanup()
	return nil
}

// cleanup releases what the machine held once its process is gone.
func (m *machine) cleanup() {
	m.cleanupOnce.Do(func() {
		if m.qmp != nil {
			m.qmp.Close()
		}
		// QEMU does not remove its listening sockets when killed.
		os.Remove(filepath.Join(m.spec.Dir, qmpSocketName))
		for _, c := range m.spec.Channels {
			os.Remove(c.Socket)
		}
	})
}

func (m *machine) ConsoleLog() string {
	b, _ := os.ReadFile(filepath.Join(m.spec.Dir, consoleLogName))
	return string(b)
}

func (m *machine) WaitConsole(ctx context.Context, substr string) (string, error) {
	op := fmt.Sprintf("wait for %q on the console", substr)
	f, err := os.Open(filepath.Join(m.spec.Dir, consoleLogName))
	if err != nil {
		return "", m.fail(op, err)
	}
	defer f.Close()
	var pending []byte
	buf := make([]byte, 64<<10)
	for {
		// Read what is there, then look at complete lines only.
		exited := m.exited() // before the read: output written before the exit is seen
		for {
			n, err := f.Read(buf)
			pending = append(pending, buf[:n]...)
			if err == io.EOF || n == 0 {
				break
			}
			if err != nil {
				return "", m.fail(op, err)
			}
		}
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := strings.TrimRight(string(pending[:i]), "\r")
			pending = pending[i+1:]
			if strings.Contains(line, substr) {
				return line, nil
			}
		}
		if exited {
			return "", m.fail(op, ErrExited)
		}
		select {
		case <-ctx.Done():
			return "", m.fail(op, ctx.Err())
		case <-m.done:
		case <-time.After(consolePollEvery):
		}
	}
}

// tailFile returns the last n bytes of a file, from a line start if it can.
func tailFile(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
		return ""
	}
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.ReplaceAll(strings.TrimRight(string(b), "\r\n"), "\r", "")
}
