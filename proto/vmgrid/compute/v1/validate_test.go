package computev1

import (
	"strings"
	"testing"
)

// TestUnknownEnumsAndKindsAreRefused is issue 15 item 10: enum values were
// never range-checked, and an action of an unknown kind got past the
// request's validation.
func TestUnknownEnumsAndKindsAreRefused(t *testing.T) {
	resume := &ResumeVMRequest{Classad: &ClassAd{VmId: "vm-a", SuspendedImage: "s", PersistentDisk: "d", State: 99}}
	if err := resume.Validate(); err == nil || !strings.Contains(err.Error(), "classad.state 99") {
		t.Fatalf("state 99: %v", err)
	}
	resume.Classad.State = VMState_VM_STATE_SUSPENDED
	if err := resume.Validate(); err != nil {
		t.Fatal(err)
	}
	create := &CreateVMRequest{Image: "tiny", Config: &ConfigDAG{Actions: []*Action{
		{Id: "a", Kind: &Action_Exec{Exec: &ExecAction{Argv: []string{"true"}}}, OnError: []*Action{{Id: "h"}}},
	}}}
	if err := create.Validate(); err == nil || !strings.Contains(err.Error(), "on_error") {
		t.Fatalf("handler without a kind: %v", err)
	}
	create.Config.Actions[0].OnError = nil
	if err := create.Validate(); err != nil {
		t.Fatal(err)
	}
}
