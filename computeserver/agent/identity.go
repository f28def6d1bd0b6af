package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"unsafe"
)

// Identity is what makes a machine itself rather than a twin of the other
// clones of its golden image.
type Identity struct {
	MachineID string `json:"machine_id,omitempty"`
	// HostKeys are the SSH host keys' fingerprints ("ssh-ed25519
	// SHA256:…"), none where the guest has no sshd.
	HostKeys []string `json:"host_keys,omitempty"`
	// VMGenIDAddr is where the guest's memory holds its VM generation ID
	// (see VMGenIDAddr); VMGenIDError says why it is 0. VMGenID is the GUID
	// read there, filled in by the host (Plant.Identity).
	VMGenIDAddr  uint64 `json:"vmgenid_addr,omitempty"`
	VMGenIDError string `json:"vmgenid_error,omitempty"`
	VMGenID      string `json:"vmgenid,omitempty"`
	// Reseeded says the kernel's RNG was reseeded with the host's entropy.
	Reseeded bool `json:"reseeded,omitempty"`
}

// random(4)'s ioctls: credit bytes to the input pool, reseed the CRNG from
// it now (not at the next periodic reseed, which would let a clone hand out
// bytes from the golden image's state for up to a minute).
const (
	rndAddEntropy  = 0x40085203 // _IOW('R', 0x03, int[2])
	rndReseedCRNG  = 0x5207     // _IO('R', 0x07)
	maxEntropySize = 4096
)

// Paths the identity op touches; variables so unit tests can move them.
var (
	machineIDPath = "/etc/machine-id"
	dbusIDPath    = "/var/lib/dbus/machine-id"
	sshDir        = "/etc/ssh"
	acpiTables    = "/sys/firmware/acpi/tables"
)

var machineIDPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// identity runs OpIdentity: entropy first (the keys made next draw on it),
// then the machine-id, then the SSH host keys.
func identity(ctx context.Context, req *Request) Response {
	var id Identity
	if len(req.Entropy) > 0 {
		if err := addEntropy(req.Entropy); err != nil {
			return Response{Error: "reseed the RNG: " + err.Error(), ExitCode: -1}
		}
		id.Reseeded = true
	}
	if req.MachineID != "" {
		if err := setMachineID(req.MachineID); err != nil {
			return Response{Error: "machine-id: " + err.Error(), ExitCode: -1}
		}
	}
	if req.SSHHostKeys || len(req.HostKeys) > 0 {
		if err := newHostKeys(ctx, req.HostKeys); err != nil {
			return Response{Error: "SSH host keys: " + err.Error(), ExitCode: -1}
		}
	}
	cur := CurrentIdentity()
	cur.Reseeded = id.Reseeded
	return Response{Identity: &cur}
}

// addEntropy credits b to the kernel's pool and reseeds the CRNG.
func addEntropy(b []byte) error {
	if len(b) > maxEntropySize {
		b = b[:maxEntropySize]
	}
	f, err := os.OpenFile("/dev/random", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(b))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(b)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(b)))
	copy(info[8:], b)
	if err := ioctl(f, rndAddEntropy, uintptr(unsafe.Pointer(&info[0]))); err != nil {
		return fmt.Errorf("RNDADDENTROPY: %w", err)
	}
	if err := ioctl(f, rndReseedCRNG, 0); err != nil {
		return fmt.Errorf("RNDRESEEDCRNG: %w", err)
	}
	return nil
}

func ioctl(f *os.File, req, arg uintptr) error {
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), req, arg); errno != 0 {
		return errno
	}
	return nil
}

// setMachineID writes /etc/machine-id (and D-Bus's copy where it is a file
// of its own rather than a link).
func setMachineID(id string) error {
	if !machineIDPattern.MatchString(id) {
		return fmt.Errorf("%q is not 32 lowercase hex digits", id)
	}
	data := []byte(id + "\n")
	if err := writeFile(machineIDPath, data, 0o444); err != nil {
		// A bind mount (systemd's on a read-only /etc) cannot be renamed
		// over: write it in place.
		if err2 := os.WriteFile(machineIDPath, data, 0o444); err2 != nil {
			return err
		}
	}
	if fi, err := os.Lstat(dbusIDPath); err == nil && fi.Mode().IsRegular() {
		return writeFile(dbusIDPath, data, 0o444)
	}
	return nil
}

// hostKeyTypes are the keys the guest makes when the host sends none:
// Debian's ssh-keygen -A set without RSA, whose generation takes seconds
// under TCG and which every current client can do without.
var hostKeyTypes = []string{"ed25519", "ecdsa"}

// HostKey is one SSH host key pair in OpenSSH's file formats.
type HostKey struct {
	Type    string `json:"type"`    // ed25519, ecdsa, rsa: the file is ssh_host_TYPE_key
	Private []byte `json:"private"` // OPENSSH PRIVATE KEY PEM
	Public  []byte `json:"public"`  // authorized_keys line
}

var keyType = regexp.MustCompile(`^[a-z0-9]+$`)

// newHostKeys replaces the SSH host keys of a guest that has sshd, with
// keys (or, when none are given, ones ssh-keygen makes), and starts sshd
// (restarts it, if it ran with the old ones). Keys are written under
// temporary names and renamed, so sshd never reads half a key; old keys of
// other types are removed, as a twin's would be.
func newHostKeys(ctx context.Context, keys []HostKey) error {
	if _, err := os.Stat(filepath.Join(sshDir, "sshd_config")); err != nil {
		return nil // no sshd in this guest
	}
	old, _ := filepath.Glob(filepath.Join(sshDir, "ssh_host_*_key*"))
	for _, f := range old {
		os.Remove(f)
	}
	var err error
	if len(keys) > 0 {
		err = writeHostKeys(keys)
	} else {
		err = keygen(ctx)
	}
	if err != nil {
		return err
	}
	return startSSHD(ctx)
}

func writeHostKeys(keys []HostKey) error {
	for _, k := range keys {
		if !keyType.MatchString(k.Type) || len(k.Private) == 0 || len(k.Public) == 0 {
			return fmt.Errorf("bad host key of type %q", k.Type)
		}
		final := filepath.Join(sshDir, "ssh_host_"+k.Type+"_key")
		if err := writeFile(final+".pub", k.Public, 0o644); err != nil {
			return err
		}
		if err := writeFile(final, k.Private, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// keygen makes hostKeyTypes with the guest's ssh-keygen.
func keygen(ctx context.Context) error {
	bin, err := exec.LookPath("ssh-keygen")
	if err != nil {
		return err
	}
	for _, t := range hostKeyTypes {
		final := filepath.Join(sshDir, "ssh_host_"+t+"_key")
		tmp := final + ".vmgrid-new"
		os.Remove(tmp)
		os.Remove(tmp + ".pub")
		out, err := exec.CommandContext(ctx, bin, "-q", "-N", "", "-t", t, "-C", "", "-f", tmp).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ssh-keygen -t %s: %w: %s", t, err, bytes.TrimSpace(out))
		}
		if err := os.Rename(tmp+".pub", final+".pub"); err != nil {
			return err
		}
		if err := os.Rename(tmp, final); err != nil {
			return err
		}
	}
	return nil
}

// SSHDPathUnit is a systemd path unit an image can carry (the debian
// recipe's does) that starts sshd once the ed25519 host key exists: the
// agent then need not run systemctl (half a second under TCG). Keys are
// written in the order given, so the host sends ed25519 last.
const SSHDPathUnit = "/etc/systemd/system/vmgrid-sshd.path"

// startSSHD (re)starts sshd under systemd without waiting for it: the keys
// exist, so whenever it accepts a connection it presents them.
func startSSHD(ctx context.Context) error {
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		return nil // not systemd: the image starts its sshd its own way
	}
	if _, err := os.Stat(SSHDPathUnit); err == nil {
		return nil // systemd starts it, seeing the keys
	}
	out, err := exec.CommandContext(ctx, "systemctl", "--no-block", "restart", "ssh.service").CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 5 {
		return nil // no such unit: sshd is not installed
	}
	if err != nil {
		return fmt.Errorf("systemctl restart ssh.service: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// CurrentIdentity reads the guest's identity.
func CurrentIdentity() Identity {
	var id Identity
	if b, err := os.ReadFile(machineIDPath); err == nil {
		id.MachineID = strings.TrimSpace(string(b))
	}
	pubs, _ := filepath.Glob(filepath.Join(sshDir, "ssh_host_*_key.pub"))
	for _, p := range pubs {
		if fp, err := fingerprint(p); err == nil {
			id.HostKeys = append(id.HostKeys, fp)
		}
	}
	var err error
	if id.VMGenIDAddr, err = VMGenIDAddr(); err != nil {
		id.VMGenIDError = err.Error()
	}
	return id
}

// fingerprint is ssh-keygen -l's SHA256 fingerprint of a public key file.
func fingerprint(pub string) (string, error) {
	b, err := os.ReadFile(pub)
	if err != nil {
		return "", err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return "", fmt.Errorf("%s: not a public key", pub)
	}
	blob, err := base64.StdEncoding.DecodeString(f[1])
	if err != nil {
		return "", fmt.Errorf("%s: %w", pub, err)
	}
	sum := sha256.Sum256(blob)
	return f[0] + " SHA256:" + base64.RawStdEncoding.EncodeToString(sum[:]), nil
}

// VMGenIDAddr is the guest-physical address of the VM generation ID of
// QEMU's vmgenid device: the SSDT names the address of its buffer VGIA
// (the firmware patches it in), and the 16 bytes of the GUID are 40 bytes
// into it (the device's ADDR method returns VGIA + 0x28). The guest cannot read them itself
// without the vmgenid driver (Debian's cloud kernel has none, and /dev/mem
// stops at the end of RAM), but the host can, through QEMU: that is how the
// plant checks that a restored clone really got its new GUID.
func VMGenIDAddr() (uint64, error) {
	tables, _ := filepath.Glob(filepath.Join(acpiTables, "SSDT*"))
	for _, t := range tables {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if a, ok := vgia(b); ok && a != 0 {
			return a + vmgenidGUIDOffset, nil
		}
	}
	return 0, errors.New("no vmgenid device (no VGIA in the ACPI tables)")
}

// vmgenidGUIDOffset is QEMU's VMGENID_GUID_OFFSET.
const vmgenidGUIDOffset = 40

// vgia finds Name(VGIA, <DWord or QWord>) in an AML table.
func vgia(aml []byte) (uint64, bool) {
	for i := 0; ; {
		j := bytes.Index(aml[i:], []byte("VGIA"))
		if j < 0 {
			return 0, false
		}
		p := i + j
		i = p + 4
		if p == 0 || aml[p-1] != 0x08 || p+5 > len(aml) {
			continue
		}
		switch aml[p+4] {
		case 0x0c:
			if p+9 <= len(aml) {
				return uint64(binary.LittleEndian.Uint32(aml[p+5:])), true
			}
		case 0x0e:
			if p+13 <= len(aml) {
				return binary.LittleEndian.Uint64(aml[p+5:]), true
			}
		}
	}
}

// PrintIdentity writes the guest's identity as JSON (vmgrid-agent identity).
func PrintIdentity() int {
	b, _ := json.MarshalIndent(CurrentIdentity(), "", "  ")
	fmt.Println(string(b))
	return 0
}
