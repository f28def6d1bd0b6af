package agent

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestVGIA finds the vmgenid buffer's address as QEMU writes it into its
// SSDT: NameOp, "VGIA", DWordPrefix, the patched address; a VGIA that is
// only referenced (in the ADDR method) is no declaration.
func TestVGIA(t *testing.T) {
	aml := []byte("SSDT....\x70VGIA\x0c\x01\x02\x03\x04....")
	aml = append(aml, 0x08, 'V', 'G', 'I', 'A', 0x0c)
	aml = binary.LittleEndian.AppendUint32(aml, 0x1ffff000)
	aml = append(aml, "tail"...)
	got, ok := vgia(aml)
	if !ok || got != 0x1ffff000 {
		t.Fatalf("vgia = %#x, %v", got, ok)
	}
	if _, ok := vgia([]byte("no such name")); ok {
		t.Fatal("found VGIA in a table without one")
	}
	dir := t.TempDir()
	old := acpiTables
	acpiTables = dir
	t.Cleanup(func() { acpiTables = old })
	os.WriteFile(filepath.Join(dir, "SSDT2"), aml, 0o644)
	if a, err := VMGenIDAddr(); err != nil || a != 0x1ffff000+40 {
		t.Fatalf("VMGenIDAddr = %#x, %v (want the buffer + 40)", a, err)
	}
}

// TestIdentityFiles: a machine-id is written where it belongs and reported
// back; a malformed one is refused; fingerprints are ssh-keygen -l's.
func TestIdentityFiles(t *testing.T) {
	dir := t.TempDir()
	oldID, oldDbus, oldSSH := machineIDPath, dbusIDPath, sshDir
	machineIDPath, dbusIDPath, sshDir = filepath.Join(dir, "machine-id"), filepath.Join(dir, "dbus-id"), filepath.Join(dir, "nossh")
	t.Cleanup(func() { machineIDPath, dbusIDPath, sshDir = oldID, oldDbus, oldSSH })
	os.WriteFile(dbusIDPath, []byte("old\n"), 0o444)
	resp := identity(context.Background(), &Request{Op: OpIdentity, MachineID: "0123456789abcdef0123456789abcdef"})
	if resp.Error != "" || resp.Identity.MachineID != "0123456789abcdef0123456789abcdef" {
		t.Fatalf("identity: %+v", resp)
	}
	if b, _ := os.ReadFile(dbusIDPath); strings.TrimSpace(string(b)) != "0123456789abcdef0123456789abcdef" {
		t.Fatalf("D-Bus's copy: %q", b)
	}
	if resp := identity(context.Background(), &Request{Op: OpIdentity, MachineID: "NOT-HEX"}); resp.Error == "" {
		t.Fatal("a malformed machine-id was accepted")
	}
	pub := filepath.Join(dir, "k.pub")
	// What ssh-keygen -lf says of this key.
	os.WriteFile(pub, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjg1xS9a7b2QDVlLmLrbQxuw2zpd1XGWB4VL6HtWn5N c\n"), 0o644)
	fp, err := fingerprint(pub)
	if err != nil || fp != "ssh-ed25519 SHA256:QMALH+ln4HhwBpToMCB1Bvj8vK3XGfExONBmvHsyTo4" {
		t.Fatalf("fingerprint %q, %v", fp, err)
	}
}

// TestHostKeysGiven: keys from the host replace the old ones (of every
// type) where the guest has sshd, and are left out where it has none.
func TestHostKeysGiven(t *testing.T) {
	dir := t.TempDir()
	old := sshDir
	sshDir = dir
	t.Cleanup(func() { sshDir = old })
	key := HostKey{Type: "ed25519", Private: []byte("-----BEGIN OPENSSH PRIVATE KEY-----\n…\n"), Public: []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjg1xS9a7b2QDVlLmLrbQxuw2zpd1XGWB4VL6HtWn5N\n")}
	if err := newHostKeys(context.Background(), []HostKey{key}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ssh_host_ed25519_key")); err == nil {
		t.Fatal("keys written into a guest without sshd")
	}
	os.WriteFile(filepath.Join(dir, "sshd_config"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "ssh_host_rsa_key"), []byte("the golden's"), 0o600)
	if err := newHostKeys(context.Background(), []HostKey{key}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ssh_host_rsa_key")); err == nil {
		t.Fatal("the golden image's RSA key survived")
	}
	fi, err := os.Stat(filepath.Join(dir, "ssh_host_ed25519_key"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key: %v %v", fi, err)
	}
	if id := CurrentIdentity(); len(id.HostKeys) != 1 || id.HostKeys[0] != "ssh-ed25519 SHA256:QMALH+ln4HhwBpToMCB1Bvj8vK3XGfExONBmvHsyTo4" {
		t.Fatalf("host keys %v", id.HostKeys)
	}
	if err := newHostKeys(context.Background(), []HostKey{{Type: "../x", Private: []byte("k"), Public: []byte("p")}}); err == nil {
		t.Fatal("a key type with a path in it was accepted")
	}
}
