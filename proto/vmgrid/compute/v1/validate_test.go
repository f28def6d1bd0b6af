package computev1

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/validator"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

// TestStageInDataserverIsRefused is issue 15 item 1: a request chose the
// address a plant sent its credentials to. The data server is the plant's
// configuration; a request naming one is refused (InvalidArgument through
// the servers' validator), also in an on_error handler and on resume.
func TestStageInDataserverIsRefused(t *testing.T) {
	stage := func(ds string) *Action {
		return &Action{Id: "s", Kind: &Action_StageIn{StageIn: &StageInAction{Dataserver: ds, Files: []string{"in.txt"}}}}
	}
	exec := &Action{Id: "a", Kind: &Action_Exec{Exec: &ExecAction{Argv: []string{"true"}}}}
	validate := validator.UnaryServerInterceptor()
	ok := func(context.Context, any) (any, error) { return nil, nil }
	for name, req := range map[string]interface{ Validate() error }{
		"create":   &CreateVMRequest{Image: "tiny", Config: &ConfigDAG{Actions: []*Action{stage("evil.example:443")}}},
		"on_error": &CreateVMRequest{Image: "tiny", Config: &ConfigDAG{Actions: []*Action{{Id: "a", Kind: exec.Kind, OnError: []*Action{stage("10.0.0.1:1")}}}}},
		"resume":   &ResumeVMRequest{Classad: &ClassAd{VmId: "vm-a", SuspendedImage: "s", PersistentDisk: "d"}, Config: &ConfigDAG{Actions: []*Action{stage("x:1")}}},
	} {
		_, err := validate(context.Background(), req, &grpc.UnaryServerInfo{FullMethod: "/vmgrid.compute.v1.PlantService/X"}, ok)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "stage_in.dataserver: the data server is grid configuration") {
			t.Errorf("%s: want InvalidArgument naming stage_in.dataserver, got %v", name, err)
		}
	}
	good := &CreateVMRequest{Image: "tiny", Config: &ConfigDAG{Actions: []*Action{stage("")}}, DataCredential: "vmgt1.x.y"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	good.DataCredential = strings.Repeat("x", MaxDataCredentialLen+1)
	if err := good.Validate(); err == nil || !strings.Contains(err.Error(), "data_credential") {
		t.Fatalf("oversized credential: %v", err)
	}
	out := &StageOutRequest{VmId: "vm-a", DataCredential: good.DataCredential}
	if err := out.Validate(); err == nil || !strings.Contains(err.Error(), "data_credential") {
		t.Fatalf("oversized stage-out credential: %v", err)
	}
}

// TestLabelsAndSizeAreBounded is issue 15 item 10: a 2 MB label made the
// plant create a VM the shop then could not record. The plant refuses what
// the shop refuses (one set of limits), before it creates anything.
func TestLabelsAndSizeAreBounded(t *testing.T) {
	validate := validator.UnaryServerInterceptor()
	ok := func(context.Context, any) (any, error) { return nil, nil }
	for name, req := range map[string]*CreateVMRequest{
		"2 MB label":       {Image: "tiny", Labels: map[string]string{"big": strings.Repeat("x", 2<<20)}},
		"too many labels":  {Image: "tiny", Labels: manyLabels(MaxLabels + 1)},
		"control in a key": {Image: "tiny", Labels: map[string]string{"a\nb": "v"}},
		"huge request": {Image: "tiny", Config: &ConfigDAG{Actions: []*Action{{Id: "a",
			Kind: &Action_Exec{Exec: &ExecAction{Argv: []string{strings.Repeat("y", MaxRequestBytes)}}}}}}},
	} {
		_, err := validate(context.Background(), req, &grpc.UnaryServerInfo{FullMethod: "/vmgrid.compute.v1.PlantService/CreateVM"}, ok)
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	fine := &CreateVMRequest{Image: "tiny", Labels: manyLabels(MaxLabels)}
	if err := fine.Validate(); err != nil {
		t.Fatalf("%d small labels: %v", MaxLabels, err)
	}
}

func manyLabels(n int) map[string]string {
	m := map[string]string{}
	for i := range n {
		m[fmt.Sprintf("k%d", i)] = "v"
	}
	return m
}
