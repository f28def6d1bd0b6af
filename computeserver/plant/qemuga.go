package plant

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/qemuga"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// guestAgent is how the plant talks to a guest: vmgrid's agent
// (*agent.Client) or qemu-ga behind qgaAgent, which speaks the same
// requests.
type guestAgent interface {
	Do(ctx context.Context, req agent.Request) (*agent.Response, error)
	Close() error
}

var (
	_ guestAgent = (*agent.Client)(nil)
	_ guestAgent = (*qgaAgent)(nil)
)

// qgaAgent runs vmgrid agent requests through the QEMU guest agent, so the
// runner, the clock step and ExecVM work unchanged on images that carry
// qemu-ga instead of vmgrid's agent. What qemu-ga has no command for
// (hostname, users, mounts, modes) runs as shell through guest-exec.
type qgaAgent struct{ c *qemuga.Client }

func (q *qgaAgent) Close() error { return q.c.Close() }

// guestPath is the PATH commands get (qemu-ga passes its own environment
// through only when no env is given).
const guestPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Do runs a request, at most agent.AnswerBound: a stuck guest fails it
// with agent.ErrNoAnswer, as it does with vmgrid's agent.
func (q *qgaAgent) Do(ctx context.Context, req agent.Request) (*agent.Response, error) {
	ctx, cancel := agent.WithAnswerBound(ctx, req)
	defer cancel()
	resp, err := q.do(ctx, req)
	if err != nil && ctx.Err() != nil {
		err = context.Cause(ctx)
	}
	return resp, err
}

func (q *qgaAgent) do(ctx context.Context, req agent.Request) (*agent.Response, error) {
	switch req.Op {
	case agent.OpPing:
		return &agent.Response{Version: "qemu-ga"}, q.c.Ping(ctx)
	case agent.OpSetTime:
		return q.answer(q.c.SetTime(ctx, time.Unix(0, req.UnixNano)))
	case agent.OpExec:
		return q.exec(ctx, req)
	case agent.OpWriteFile:
		return q.writeFile(ctx, req)
	case agent.OpReadFile:
		b, err := q.c.ReadFile(ctx, req.Path, 64<<20)
		if resp, err := q.answer(err); err != nil || resp.Error != "" {
			return resp, err
		}
		return &agent.Response{Content: b}, nil
	case agent.OpHostname:
		return q.shell(ctx, `echo "$1" > /etc/hostname && hostname "$1"`, req.Hostname)
	case agent.OpAddUser:
		return q.addUser(ctx, req)
	case agent.OpIdentity:
		return q.identity(ctx, req)
	case agent.OpMount:
		return q.shell(ctx, `mkdir -p "$2" && mount -t "$3" ${4:+-o "$4"} "$1" "$2"`, req.Device, req.Path, req.FSType, req.Options)
	case agent.OpNetwork:
		return q.network(ctx, req)
	}
	return &agent.Response{Error: "qemu-ga path: unknown op " + req.Op, ExitCode: -1}, nil
}

// answer turns an error qemu-ga answered into the response's Error (the
// action failed), and any other error into a failed call.
func (q *qgaAgent) answer(err error) (*agent.Response, error) {
	var qerr *qemuga.Error
	if errors.As(err, &qerr) {
		return &agent.Response{Error: qerr.Error(), ExitCode: -1}, nil
	}
	return &agent.Response{}, err
}

// execScript runs a command as vmgrid's agent does: in its directory, with
// a timeout, and $VMGRID_RESULTS naming a file for KEY=VALUE results,
// which it appends to stderr after a marker line (one guest-exec, not
// three more calls to read and remove the file).
const execScript = `dir=$1; t=$2; mark=$3; shift 3
if [ -n "$dir" ]; then cd "$dir" || exit 126; fi
timeout "$t" "$@"; rc=$?
if [ -s "$VMGRID_RESULTS" ]; then printf '\n%s\n' "$mark" >&2; cat "$VMGRID_RESULTS" >&2; fi
rm -f "$VMGRID_RESULTS"; exit $rc`

func (q *qgaAgent) exec(ctx context.Context, req agent.Request) (*agent.Response, error) {
	if len(req.Argv) == 0 {
		return &agent.Response{Error: "exec needs a command", ExitCode: -1}, nil
	}
	t := time.Duration(req.Timeout)
	if t <= 0 {
		t = 5 * time.Minute
	}
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	id := hex.EncodeToString(rnd[:])
	mark := "vmgrid-results-" + id
	env := append([]string{guestPath, "HOME=/root", "VMGRID_RESULTS=/tmp/" + mark}, req.Env...)
	args := append([]string{"-c", execScript, "vmgrid", req.Dir, strconv.Itoa(int(t.Seconds()+0.999)) + "s", mark}, req.Argv...)
	ectx, cancel := context.WithTimeout(ctx, t+30*time.Second)
	defer cancel()
	res, err := q.c.Exec(ectx, qemuga.Command{Path: "/bin/sh", Args: args, Env: env, Stdin: req.Stdin})
	if resp, err := q.answer(err); err != nil || resp.Error != "" {
		return resp, err
	}
	stderr := res.Stderr
	var results map[string]string
	if before, after, ok := bytes.Cut(stderr, []byte("\n"+mark+"\n")); ok {
		stderr, results = before, parseResults(string(after))
	}
	resp := &agent.Response{ExitCode: res.ExitCode, Stdout: lastBytes(res.Stdout), Stderr: lastBytes(stderr), Results: results}
	switch {
	case res.ExitCode == 124:
		resp.Error = "timed out after " + t.String()
	case res.Signal != 0:
		resp.Error, resp.ExitCode = "killed by signal "+strconv.Itoa(res.Signal), -1
	}
	return resp, nil
}

func parseResults(s string) map[string]string {
	var out map[string]string
	for _, line := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && k != "" {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

func lastBytes(b []byte) []byte {
	if len(b) > agent.MaxOutput {
		return b[len(b)-agent.MaxOutput:]
	}
	return b
}

// shell runs script with args ($1, $2, …) and answers like an action.
func (q *qgaAgent) shell(ctx context.Context, script string, args ...string) (*agent.Response, error) {
	resp, err := q.exec(ctx, agent.Request{Argv: append([]string{"/bin/sh", "-c", script, "vmgrid"}, args...), Timeout: agent.Duration(time.Minute)})
	if err == nil && resp.Error == "" && resp.ExitCode != 0 {
		resp.Error = strings.TrimSpace(string(resp.Stderr))
	}
	return resp, err
}

// writeFile writes through a temporary name and renames, as the agent
// does, so a reader never sees half a file; the mode is set before.
func (q *qgaAgent) writeFile(ctx context.Context, req agent.Request) (*agent.Response, error) {
	if !path.IsAbs(req.Path) {
		return &agent.Response{Error: fmt.Sprintf("path %q is not absolute", req.Path), ExitCode: -1}, nil
	}
	mode := req.Mode
	if mode == 0 {
		mode = 0o644
	}
	tmp := req.Path + ".vmgrid-tmp"
	if resp, err := q.shell(ctx, `mkdir -p "$(dirname "$1")"`, req.Path); err != nil || resp.Error != "" {
		return resp, err
	}
	if resp, err := q.answer(q.c.WriteFile(ctx, tmp, req.Content)); err != nil || resp.Error != "" {
		return resp, err
	}
	return q.shell(ctx, `chmod "$2" "$1" && mv -f "$1" "$3"`, tmp, strconv.FormatUint(uint64(mode), 8), req.Path)
}

// addUser makes the user (a home, bash) if missing and adds the key with
// guest-ssh-add-authorized-keys, which sets owners and modes.
func (q *qgaAgent) addUser(ctx context.Context, req agent.Request) (*agent.Response, error) {
	if req.User == "" || strings.ContainsAny(req.User, "/:\n ") {
		return &agent.Response{Error: fmt.Sprintf("bad user name %q", req.User), ExitCode: -1}, nil
	}
	resp, err := q.shell(ctx, `id -u "$1" >/dev/null 2>&1 || useradd -m -s /bin/bash "$1"`, req.User)
	if err != nil || resp.Error != "" || req.SSHKey == "" {
		return resp, err
	}
	if resp, err := q.answer(q.c.AddAuthorizedKeys(ctx, req.User, strings.TrimSpace(req.SSHKey))); err != nil || resp.Error != "" {
		return resp, err
	}
	// qemu-ga 7.2 leaves the last key without a newline, which the next
	// tool that appends a key would join to it.
	return q.shell(ctx, `f=$(getent passwd "$1" | cut -d: -f6)/.ssh/authorized_keys; [ -z "$(tail -c1 "$f")" ] || echo >> "$f"`, req.User)
}

// waitQGA dials a guest's qemu-ga and waits until it answers, for at most
// timeout, giving up as soon as the machine exits (with its console).
func waitQGA(ctx context.Context, m vmm.Machine, socket string, timeout time.Duration) (*qgaAgent, error) {
	qa, err := waitGuest(ctx, m, timeout, func(ctx context.Context) (*qgaAgent, error) {
		c, err := qemuga.Dial(ctx, socket)
		if err == nil {
			if err = c.Sync(ctx, time.Second); err != nil {
				c.Close()
			}
		}
		return &qgaAgent{c: c}, err
	})
	if err != nil {
		return nil, err
	}
	return qa, nil
}

// waitGuest runs connect (dial a guest agent, wait until it answers) for at
// most timeout. It gives up as soon as the machine exits (a guest whose
// kernel panicked, a killed QEMU never answers), with the console's tail.
func waitGuest[T interface{ Close() error }](ctx context.Context, m vmm.Machine, timeout time.Duration, connect func(context.Context) (T, error)) (T, error) {
	var none T
	start := time.Now()
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	go func() {
		select {
		case <-m.Exited():
			cancel()
		case <-actx.Done():
		}
	}()
	c, err := connect(actx)
	exitSeen := time.Duration(0)
	if err != nil {
		// A closed socket ends the wait before QEMU's exit is reaped.
		exitSeen = 2 * time.Second
	}
	select {
	case <-m.Exited():
		if err == nil {
			c.Close()
		}
		return none, machineExited(ctx, m)
	case <-time.After(exitSeen):
	}
	if err != nil {
		return none, fmt.Errorf("%w (waited %s of at most %s): %w\n--- guest console (tail) ---\n%s", err,
			time.Since(start).Round(time.Millisecond), timeout, errdefs.ErrUnavailable, tail(m.ConsoleLog(), 2000))
	}
	return c, nil
}

// qgaNetworkScript is configure_network with iproute2: the NIC whose MAC is
// $1 (the golden's, for a restored clone) gets MAC $2, address $3, MTU $4,
// a default route via $5 and the hostname $6 (the last three when set).
const qgaNetworkScript = `dev=
for d in /sys/class/net/*; do [ "$(cat "$d/address")" = "$1" ] && dev=${d##*/}; done
[ -n "$dev" ] || { echo "no NIC with MAC $1" >&2; exit 1; }
ip link set "$dev" down && ip link set "$dev" address "$2" || exit 1
[ -z "$4" ] || ip link set "$dev" mtu "$4" || exit 1
ip link set lo up; ip addr replace "$3" dev "$dev" && ip link set "$dev" up || exit 1
[ -z "$5" ] || ip route replace default via "$5" || exit 1
[ -z "$6" ] || { echo "$6" > /etc/hostname && hostname "$6"; }`

// network configures the guest's NIC through qemu-ga (an image restored
// from a --from golden: cloud-init ran once, at the golden's first boot).
func (q *qgaAgent) network(ctx context.Context, req agent.Request) (*agent.Response, error) {
	find := cmp.Or(req.CurrentMAC, req.MAC)
	mtu := ""
	if req.MTU > 0 {
		mtu = strconv.Itoa(req.MTU)
	}
	return q.shell(ctx, qgaNetworkScript, strings.ToLower(find), req.MAC, req.Address, mtu, req.Gateway, req.Hostname)
}
