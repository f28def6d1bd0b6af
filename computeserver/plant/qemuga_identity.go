package plant

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
)

// identityScript is the clone identity op (agent.OpIdentity, identity.go)
// for guests configured through qemu-ga: the host's entropy (stdin)
// credited to the pool and the CRNG reseeded (random(4)'s RNDADDENTROPY and
// RNDRESEEDCRNG, through python3 where the guest has it, else only mixed
// in), the new machine-id ($1), new SSH host keys — the host's, written to
// /run/vmgrid-hostkeys, if $2 is 2; made by ssh-keygen (ed25519 and ecdsa)
// if $2 is 1 — sshd restarted; then it prints the machine-id,
// "reseeded" if it was, and the host keys' public halves.
const identityScript = `if command -v python3 >/dev/null 2>&1 && python3 -c '
import fcntl, struct, sys
b = sys.stdin.buffer.read()
with open("/dev/urandom", "wb") as f:
    fcntl.ioctl(f, 0x40085203, struct.pack("ii", len(b) * 8, len(b)) + b)
    fcntl.ioctl(f, 0x5207)
'; then r=reseeded; else cat > /dev/urandom; r=mixed; fi
if [ -n "$1" ]; then echo "$1" > /etc/machine-id; fi
if [ "$2" = 2 ]; then
  if [ -x /usr/sbin/sshd ]; then
    rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
    while read -r t && read -r priv && read -r pub; do
      k=/etc/ssh/ssh_host_${t}_key
      (umask 077; printf %s "$priv" | base64 -d > "$k.tmp") && mv -f "$k.tmp" "$k" || exit 1
      printf %s "$pub" | base64 -d > "$k.pub" || exit 1
    done < /run/vmgrid-hostkeys
    systemctl --no-block restart ssh.service 2>/dev/null
  fi
  rm -f /run/vmgrid-hostkeys
fi
if [ "$2" = 1 ] && command -v ssh-keygen >/dev/null 2>&1; then
  rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
  for t in ed25519 ecdsa; do ssh-keygen -q -N "" -t $t -C "" -f /etc/ssh/ssh_host_${t}_key || exit 1; done
  systemctl --no-block restart ssh.service 2>/dev/null
fi
cat /etc/machine-id; echo $r
cat /etc/ssh/ssh_host_*_key.pub 2>/dev/null
exit 0`

func (q *qgaAgent) identity(ctx context.Context, req agent.Request) (*agent.Response, error) {
	keys := "0"
	switch {
	case len(req.HostKeys) > 0: // made by the host (identity.go)
		if resp, err := q.putHostKeys(ctx, req.HostKeys); err != nil || resp.Error != "" {
			return resp, err
		}
		keys = "2"
	case req.SSHHostKeys:
		keys = "1"
	}
	resp, err := q.exec(ctx, agent.Request{Argv: []string{"/bin/sh", "-c", identityScript, "vmgrid", req.MachineID, keys},
		Stdin: req.Entropy, Timeout: agent.Duration(time.Minute)})
	if err != nil || resp.Error != "" || resp.ExitCode != 0 {
		if err == nil && resp.Error == "" {
			resp.Error = "identity: " + strings.TrimSpace(string(resp.Stderr))
		}
		return resp, err
	}
	lines := strings.Split(strings.TrimSpace(string(resp.Stdout)), "\n")
	id := &agent.Identity{}
	for i, l := range lines {
		switch {
		case i == 0:
			id.MachineID = strings.TrimSpace(l)
		case l == "reseeded":
			id.Reseeded = true
		default:
			if f := strings.Fields(l); len(f) >= 2 {
				if blob, err := base64.StdEncoding.DecodeString(f[1]); err == nil {
					sum := sha256.Sum256(blob)
					id.HostKeys = append(id.HostKeys, f[0]+" SHA256:"+base64.RawStdEncoding.EncodeToString(sum[:]))
				}
			}
		}
	}
	id.VMGenIDError = "not read through qemu-ga"
	return &agent.Response{Identity: id}, nil
}

// putHostKeys leaves the host's keys for identityScript in
// /run/vmgrid-hostkeys (root only: made empty with umask 077 first), three
// lines a key: its type, its private and its public half in base64.
func (q *qgaAgent) putHostKeys(ctx context.Context, keys []agent.HostKey) (*agent.Response, error) {
	var b strings.Builder
	for _, k := range keys {
		if !hostKeyType.MatchString(k.Type) {
			return &agent.Response{Error: fmt.Sprintf("host key type %q", k.Type), ExitCode: -1}, nil
		}
		fmt.Fprintf(&b, "%s\n%s\n%s\n", k.Type, base64.StdEncoding.EncodeToString(k.Private), base64.StdEncoding.EncodeToString(k.Public))
	}
	if resp, err := q.shell(ctx, `umask 077; : > /run/vmgrid-hostkeys`); err != nil || resp.Error != "" {
		return resp, err
	}
	return q.answer(q.c.WriteFile(ctx, "/run/vmgrid-hostkeys", []byte(b.String())))
}

var hostKeyType = regexp.MustCompile(`^[a-z0-9]+$`)
