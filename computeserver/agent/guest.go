package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// FindPort returns the device of the virtio-serial port called name, as
// the kernel lists it under /sys/class/virtio-ports (no udev needed).
func FindPort(name string) (string, error) {
	ents, err := os.ReadDir("/sys/class/virtio-ports")
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name(), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %s", name)
}

// Serve runs the agent on rw until ctx ends or rw fails.
func Serve(ctx context.Context, rw io.ReadWriter) error {
	r := bufio.NewReaderSize(rw, 1<<20)
	enc := json.NewEncoder(rw)
	for ctx.Err() == nil {
		line, err := r.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var req Request
			var resp Response
			if jerr := json.Unmarshal(line, &req); jerr != nil {
				resp = Response{Error: "bad request: " + jerr.Error()}
			} else {
				resp = Handle(ctx, &req)
			}
			resp.ID = req.ID
			if werr := enc.Encode(&resp); werr != nil {
				return werr
			}
		}
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}

// Handle runs one request.
func Handle(ctx context.Context, req *Request) Response {
	var err error
	switch req.Op {
	case OpPing:
		return Response{Version: Version}
	case OpExec:
		return runExec(ctx, req)
	case OpWriteFile:
		err = writeFile(req.Path, req.Content, req.Mode)
	case OpReadFile:
		var b []byte
		if b, err = os.ReadFile(req.Path); err == nil {
			return Response{Content: b}
		}
	case OpHostname:
		if err = syscall.Sethostname([]byte(req.Hostname)); err == nil {
			err = writeFile("/etc/hostname", []byte(req.Hostname+"\n"), 0o644)
		}
	case OpAddUser:
		err = addUser(ctx, req.User, req.SSHKey)
	case OpMount:
		err = mount(req)
	case OpSetTime:
		tv := syscall.NsecToTimeval(req.UnixNano)
		err = syscall.Settimeofday(&tv)
	default:
		err = fmt.Errorf("unknown operation %q", req.Op)
	}
	if err != nil {
		return Response{Error: err.Error(), ExitCode: -1}
	}
	return Response{}
}

func writeFile(path string, content []byte, mode uint32) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("path %q is not absolute", path)
	}
	if mode == 0 {
		mode = 0o644
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".vmgrid-tmp"
	if err := os.WriteFile(tmp, content, os.FileMode(mode)); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

type tail struct {
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - MaxOutput; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func runExec(ctx context.Context, req *Request) Response {
	if len(req.Argv) == 0 {
		return Response{Error: "exec needs a command", ExitCode: -1}
	}
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.Timeout))
		defer cancel()
	}
	results, err := os.CreateTemp("", "vmgrid-results-")
	if err != nil {
		return Response{Error: err.Error(), ExitCode: -1}
	}
	results.Close()
	defer os.Remove(results.Name())
	cmd := exec.CommandContext(ctx, req.Argv[0], req.Argv[1:]...)
	cmd.Env = append(append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, req.Env...), "VMGRID_RESULTS="+results.Name())
	cmd.Dir = req.Dir
	cmd.Stdin = bytes.NewReader(req.Stdin)
	var out, errb tail
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	resp := Response{Stdout: out.buf, Stderr: errb.buf}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		resp.ExitCode = exit.ExitCode()
		if ctx.Err() != nil {
			resp.Error = "timed out after " + time.Duration(req.Timeout).String()
		}
	case err != nil:
		resp.Error, resp.ExitCode = err.Error(), -1
	}
	if b, err := os.ReadFile(results.Name()); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && k != "" {
				if resp.Results == nil {
					resp.Results = map[string]string{}
				}
				resp.Results[k] = v
			}
		}
	}
	return resp
}

func addUser(ctx context.Context, user, key string) error {
	if user == "" || strings.ContainsAny(user, "/:\n ") {
		return fmt.Errorf("bad user name %q", user)
	}
	home := "/home/" + user
	if _, err := os.Stat(home); err != nil {
		// busybox adduser: -D no password.
		if out, err := exec.CommandContext(ctx, "adduser", "-D", "-h", home, user).CombinedOutput(); err != nil {
			return fmt.Errorf("adduser %s: %v: %s", user, err, bytes.TrimSpace(out))
		}
	}
	if key != "" {
		if err := writeFile(home+"/.ssh/authorized_keys", []byte(strings.TrimSpace(key)+"\n"), 0o600); err != nil {
			return err
		}
		if out, err := exec.CommandContext(ctx, "chown", "-R", user+":"+user, home+"/.ssh").CombinedOutput(); err != nil {
			return fmt.Errorf("chown: %v: %s", err, bytes.TrimSpace(out))
		}
	}
	return nil
}

func mount(req *Request) error {
	if req.Device == "" || !filepath.IsAbs(req.Path) {
		return errors.New("mount needs a device and an absolute path")
	}
	if err := os.MkdirAll(req.Path, 0o755); err != nil {
		return err
	}
	fstype := req.FSType
	if fstype == "" {
		fstype = "ext4"
	}
	return syscall.Mount(req.Device, req.Path, fstype, 0, req.Options)
}
