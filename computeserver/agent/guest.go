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
	"strconv"
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
		err = addUser(req.User, req.SSHKey)
	case OpMount:
		err = mount(req)
	case OpIdentity:
		return identity(ctx, req)
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

// addUser adds a user the way adduser would, without depending on one
// (busybox builds often lack it): a passwd and a group entry with the next
// free id from 1000, a home directory, and the SSH key.
func addUser(user, key string) error {
	if user == "" || strings.ContainsAny(user, "/:\n ") {
		return fmt.Errorf("bad user name %q", user)
	}
	home := "/home/" + user
	uid, err := ensureUser(user, home)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(home, 0o755); err != nil {
		return err
	}
	if err := os.Chown(home, uid, uid); err != nil {
		return err
	}
	if key == "" {
		return nil
	}
	if err := os.MkdirAll(home+"/.ssh", 0o700); err != nil {
		return err
	}
	if err := writeFile(home+"/.ssh/authorized_keys", []byte(strings.TrimSpace(key)+"\n"), 0o600); err != nil {
		return err
	}
	for _, p := range []string{home + "/.ssh", home + "/.ssh/authorized_keys"} {
		if err := os.Chown(p, uid, uid); err != nil {
			return err
		}
	}
	return nil
}

// ensureUser returns the uid of user, adding it to /etc/passwd and
// /etc/group if it does not exist.
func ensureUser(user, home string) (int, error) {
	passwd, err := os.ReadFile("/etc/passwd")
	if err != nil && !os.IsNotExist(err) {
		return 0, err
	}
	next := 1000
	for _, line := range strings.Split(string(passwd), "\n") {
		f := strings.Split(line, ":")
		if len(f) < 3 {
			continue
		}
		id, _ := strconv.Atoi(f[2])
		if f[0] == user {
			return id, nil
		}
		if id >= next && id < 60000 {
			next = id + 1
		}
	}
	entry := fmt.Sprintf("%s:x:%d:%d::%s:/bin/sh\n", user, next, next, home)
	if err := appendFile("/etc/passwd", entry); err != nil {
		return 0, err
	}
	if err := appendFile("/etc/group", fmt.Sprintf("%s:x:%d:\n", user, next)); err != nil {
		return 0, err
	}
	if _, err := os.Stat("/etc/shadow"); err == nil {
		if err := appendFile("/etc/shadow", user+":!:19000:0:99999:7:::\n"); err != nil {
			return 0, err
		}
	}
	return next, nil
}

func appendFile(path, s string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(s); err != nil {
		f.Close()
		return err
	}
	return f.Close()
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

// Main runs the agent forever: it finds its virtio-serial port, serves it,
// and reopens it whenever the host side goes away (a suspended and resumed
// VM gets a new host connection).
func Main() {
	if len(os.Args) > 1 && os.Args[1] == "identity" {
		os.Exit(PrintIdentity()) // for people and tests in the guest
	}
	ctx := context.Background()
	for {
		dev, err := FindPort(PortName)
		if err == nil {
			var f *os.File
			if f, err = os.OpenFile(dev, os.O_RDWR, 0); err == nil {
				err = Serve(ctx, f)
				f.Close()
			}
		}
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintln(os.Stderr, "vmgrid-agent:", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
