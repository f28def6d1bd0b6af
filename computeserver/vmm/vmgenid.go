package vmm

import (
	"crypto/rand"
	"fmt"
	"regexp"
)

// guidPattern is a GUID as QEMU's vmgenid device takes it.
var guidPattern = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// NewGUID returns a random (version 4) GUID for Spec.VMGenID.
func NewGUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand does not fail on Linux
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (s *Spec) validateIdentity() []error {
	if s.VMGenID != "" && !guidPattern.MatchString(s.VMGenID) {
		return []error{fmt.Errorf("spec: VMGenID %q is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", s.VMGenID)}
	}
	return nil
}

// identityArgs are the QEMU arguments of the clone identity fields.
func (s *Spec) identityArgs() []string {
	if s.VMGenID == "" {
		return nil
	}
	return []string{"-device", "vmgenid,id=vmgenid0,guid=" + s.VMGenID}
}
