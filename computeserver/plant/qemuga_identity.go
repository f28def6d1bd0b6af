package plant

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
)

// identityScript is the clone identity op (agent.OpIdentity, identity.go)
// for guests configured through qemu-ga: the host's entropy (stdin)
// credited to the pool and the CRNG reseeded (random(4)'s RNDADDENTROPY and
// RNDRESEEDCRNG, through python3 where the guest has it, else only mixed
// in), the new machine-id ($1), new SSH host keys if $2 is 1 (ed25519 and
// ecdsa: quick under TCG), sshd restarted; then it prints the machine-id,
// "reseeded" if it was, and the host keys' public halves.
const identityScript = `if command -v python3 >/dev/null 2>&1 && python3 -c '
import fcntl, struct, sys
b = sys.stdin.buffer.read()
with open("/dev/urandom", "wb") as f:
    fcntl.ioctl(f, 0x40085203, struct.pack("ii", len(b) * 8, len(b)) + b)
    fcntl.ioctl(f, 0x5207)
'; then r=reseeded; else cat > /dev/urandom; r=mixed; fi
if [ -n "$1" ]; then echo "$1" > /etc/machine-id; fi
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
	if req.SSHHostKeys {
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
