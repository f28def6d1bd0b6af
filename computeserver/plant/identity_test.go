package plant

import (
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

// TestNewIdentityRequest: every request is a fresh identity (entropy,
// machine-id in systemd's format, host keys OpenSSH can load).
func TestNewIdentityRequest(t *testing.T) {
	a, err := newIdentityRequest()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newIdentityRequest()
	if len(a.Entropy) != identityEntropy || string(a.Entropy) == string(b.Entropy) || a.MachineID == b.MachineID || len(a.MachineID) != 32 {
		t.Fatalf("not fresh: %q %q", a.MachineID, b.MachineID)
	}
	if len(a.HostKeys) != 2 {
		t.Fatalf("%d host keys", len(a.HostKeys))
	}
	for i, k := range a.HostKeys {
		signer, err := ssh.ParsePrivateKey(k.Private)
		if err != nil {
			t.Fatalf("%s: %v", k.Type, err)
		}
		if got := string(ssh.MarshalAuthorizedKey(signer.PublicKey())); got != string(k.Public) {
			t.Fatalf("%s: public key %q does not match the private one", k.Type, k.Public)
		}
		if string(k.Public) == string(b.HostKeys[i].Public) {
			t.Fatalf("%s: the same key twice", k.Type)
		}
		if !strings.Contains(string(k.Private), "OPENSSH PRIVATE KEY") {
			t.Fatalf("%s: not in OpenSSH's format", k.Type)
		}
	}
}
