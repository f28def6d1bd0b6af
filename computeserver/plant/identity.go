package plant

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/crypto/ssh"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Clones that are not twins. Every clone restored from one memory state
// would start with the golden image's RNG state, machine-id and SSH host
// keys (Firecracker documents the hazard of snapshot restores). Two steps of
// the production line make each clone its own machine:
//
//   - "generation id", before the restore: a fresh GUID for QEMU's vmgenid
//     device (golden images are built with one), so the guest sees its VM
//     generation ID change — a kernel with the vmgenid driver reseeds its
//     RNG on that; Debian's cloud kernel has none, hence:
//   - "identity", right after the agent answers: host entropy pushed into
//     the guest's pool and a forced reseed of its CRNG, a new
//     /etc/machine-id and new SSH host keys before sshd is started (the
//     debian image has no keys, and its sshd waits for them).

// identityEntropy is how many bytes of the host's RNG a clone gets: a
// ChaCha20 reseed needs 32; more costs nothing.
const identityEntropy = 256

// DefaultAgentTimeout bounds the wait for a guest agent to answer (a golden
// boot under TCG with systemd takes tens of seconds).
const DefaultAgentTimeout = agentTimeout

// suspendedLabel marks the images SuspendVM publishes: resuming one brings
// back the same machine, which keeps its identity.
const suspendedLabel = imagev1.SuspendedLabel

// newMachine says the line makes a new machine from a golden image rather
// than resuming a suspended one.
func (l *line) newMachine() bool {
	return l.src.manifest.GetAttributes().GetLabels()[suspendedLabel] == ""
}

// newClone: a restored new machine (the generation ID changes only there).
func (l *line) newClone() bool { return l.restored() && l.newMachine() }

// generationID gives a clone of an image with a vmgenid device its own GUID.
func (l *line) generationID(context.Context) (func(), error) {
	if l.spec.VMGenID != "" {
		l.spec.VMGenID = vmm.NewGUID()
	}
	return nil, nil
}

// identity makes the clone its own machine through the agent. An agent
// without the operation (an image built before it) is logged, not fatal:
// such clones stay twins, as they were.
func (l *line) identity(ctx context.Context) (func(), error) {
	start := time.Now()
	req, err := newIdentityRequest()
	if err != nil {
		return nil, err
	}
	resp, err := l.v.agent.Do(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("the guest agent of %s: identity: %w: %w", l.v.ad.VmId, err, errdefs.ErrUnavailable)
	}
	if strings.HasPrefix(resp.Error, "unknown operation") {
		l.log.Warn("the image's agent cannot renew the clone's identity (an older agent): the clone shares the golden image's RNG state, machine-id and host keys",
			zap.String("agent", resp.Error))
		return nil, nil
	}
	if resp.Error != "" || resp.Identity == nil {
		return nil, fmt.Errorf("renew the identity of %s: %s: %w", l.v.ad.VmId, resp.Error, errdefs.ErrFailedPrecondition)
	}
	id := resp.Identity
	if l.spec.VMGenID != "" && id.VMGenIDAddr != 0 {
		// The restored guest must hold the clone's GUID, not the golden's.
		if id.VMGenID, err = guestVMGenID(ctx, l.v.m, id.VMGenIDAddr); err != nil {
			return nil, fmt.Errorf("read the VM generation ID of %s: %w", l.v.ad.VmId, err)
		}
		if !strings.EqualFold(id.VMGenID, l.spec.VMGenID) {
			return nil, fmt.Errorf("the guest of %s holds VM generation ID %s, not its own %s: %w", l.v.ad.VmId, id.VMGenID, l.spec.VMGenID, errdefs.ErrFailedPrecondition)
		}
	}
	l.log.Info("clone identity renewed", zap.String("machine_id", id.MachineID), zap.Strings("host_keys", id.HostKeys),
		zap.String("vmgenid", id.VMGenID), zap.String("vmgenid_error", id.VMGenIDError), zap.Duration("took", time.Since(start)))
	return nil, nil
}

// newIdentityRequest is a fresh identity: host entropy, a machine-id in
// systemd's format (128 random bits, lowercase hex), new host keys.
func newIdentityRequest() (agent.Request, error) {
	seed := make([]byte, identityEntropy)
	if _, err := rand.Read(seed); err != nil {
		return agent.Request{}, err
	}
	mid := make([]byte, 16)
	if _, err := rand.Read(mid); err != nil {
		return agent.Request{}, err
	}
	keys, err := newHostKeys()
	if err != nil {
		return agent.Request{}, err
	}
	return agent.Request{Op: agent.OpIdentity, Entropy: seed, MachineID: hex.EncodeToString(mid), HostKeys: keys}, nil
}

// newHostKeys makes the clone's SSH host keys (ed25519 and ECDSA P-256,
// Debian's default set without RSA) on the host, from its RNG: ssh-keygen
// in the guest takes a second or two per clone under TCG. The agent writes
// them only where the guest has sshd.
func newHostKeys() ([]agent.HostKey, error) {
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	var keys []agent.HostKey
	for _, k := range []struct {
		typ  string
		priv crypto.Signer
	}{{"ecdsa", ec}, {"ed25519", ed}} { // ed25519 last: see agent.SSHDPathUnit
		block, err := ssh.MarshalPrivateKey(k.priv, "")
		if err != nil {
			return nil, err
		}
		pub, err := ssh.NewPublicKey(k.priv.Public())
		if err != nil {
			return nil, err
		}
		keys = append(keys, agent.HostKey{Type: k.typ, Private: pem.EncodeToMemory(block), Public: ssh.MarshalAuthorizedKey(pub)})
	}
	return keys, nil
}

// Identity reports the identity of VM id as its guest holds it: machine-id
// and SSH host key fingerprints from the agent, and the VM generation ID
// read from the guest's memory (where QEMU's vmgenid device put it).
func (p *Plant) Identity(ctx context.Context, id string) (*agent.Identity, error) {
	v, err := p.readyAgent(ctx, id)
	if err != nil {
		return nil, err
	}
	if v.m == nil {
		return nil, fmt.Errorf("vm %q has no machine: %w", id, errdefs.ErrFailedPrecondition)
	}
	resp, err := v.agent.Do(ctx, agent.Request{Op: agent.OpIdentity})
	if err != nil {
		return nil, fmt.Errorf("agent of %s: %w: %w", id, err, errdefs.ErrUnavailable)
	}
	if resp.Error != "" || resp.Identity == nil {
		return nil, fmt.Errorf("agent of %s: identity: %s: %w", id, resp.Error, errdefs.ErrFailedPrecondition)
	}
	ident := resp.Identity
	if ident.VMGenIDAddr != 0 {
		if ident.VMGenID, err = guestVMGenID(ctx, v.m, ident.VMGenIDAddr); err != nil {
			return nil, err
		}
	}
	return ident, nil
}

// guestVMGenID reads the 16 bytes of the VM generation ID at addr in the
// guest's physical memory (HMP's xp through QMP) and formats them as a
// GUID: QEMU stores its first three fields little-endian.
func guestVMGenID(ctx context.Context, m vmm.Machine, addr uint64) (string, error) {
	var out string
	if err := m.QMP(ctx, "human-monitor-command", map[string]any{"command-line": fmt.Sprintf("xp /16xb %#x", addr)}, &out); err != nil {
		return "", fmt.Errorf("read guest memory at %#x: %w", addr, err)
	}
	var g []byte
	for _, line := range strings.Split(out, "\n") {
		_, bytesPart, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		for _, f := range strings.Fields(bytesPart) {
			var b byte
			if _, err := fmt.Sscanf(f, "0x%02x", &b); err == nil {
				g = append(g, b)
			}
		}
	}
	if len(g) != 16 {
		return "", fmt.Errorf("read guest memory at %#x: %d bytes in %q", addr, len(g), out)
	}
	rev := func(b []byte) string {
		r := make([]byte, len(b))
		for i := range b {
			r[i] = b[len(b)-1-i]
		}
		return hex.EncodeToString(r)
	}
	return rev(g[0:4]) + "-" + rev(g[4:6]) + "-" + rev(g[6:8]) + "-" + hex.EncodeToString(g[8:10]) + "-" + hex.EncodeToString(g[10:16]), nil
}

// readyAgent waits until VM id is ready and returns it with its agent
// connection.
func (p *Plant) readyAgent(ctx context.Context, id string) (*vm, error) {
	v, err := p.readyVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if v.agent == nil {
		return nil, fmt.Errorf("vm %q has no agent connection: %w", id, errdefs.ErrFailedPrecondition)
	}
	return v, nil
}
