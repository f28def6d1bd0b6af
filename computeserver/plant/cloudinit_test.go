package plant

import (
	"encoding/base64"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/shop/dag"
)

func stockPlan(t *testing.T, actions ...*computev1.Action) *dag.Plan {
	t.Helper()
	p, err := dag.New(&computev1.ConfigDAG{Actions: actions})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The seed carries hostname, users with keys, files and commands as
// cloud-init reads them, and refuses what cloud-init cannot do.
func TestSeedUserData(t *testing.T) {
	plan := stockPlan(t,
		&computev1.Action{Id: "name", Kind: &computev1.Action_SetHostname{SetHostname: &computev1.SetHostnameAction{Hostname: "web1"}}},
		&computev1.Action{Id: "user", After: []string{"name"}, Kind: &computev1.Action_AddUser{AddUser: &computev1.AddUserAction{User: "alice", SshKey: "ssh-ed25519 AAAA alice\n"}}},
		&computev1.Action{Id: "file", After: []string{"user"}, Kind: &computev1.Action_WriteFile{WriteFile: &computev1.WriteFileAction{Path: "/etc/app.conf", Content: []byte("x=1\n"), Mode: 0o600}}},
		&computev1.Action{Id: "run", After: []string{"file"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"sh", "-c", "echo it's"}}}},
	)
	s, err := newSeed("vm-1", plan)
	if err != nil {
		t.Fatal(err)
	}
	ud, err := s.userData()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(ud), "#cloud-config\n") {
		t.Fatalf("user-data does not start with #cloud-config:\n%s", ud)
	}
	var cc cloudConfig
	if err := yaml.Unmarshal(ud, &cc); err != nil {
		t.Fatal(err)
	}
	if cc.Hostname != "web1" || len(cc.Users) != 1 || cc.Users[0].Name != "alice" || cc.Users[0].SSHAuthorizedKeys[0] != "ssh-ed25519 AAAA alice" {
		t.Fatalf("cloud-config: %+v", cc)
	}
	if len(cc.WriteFiles) != 2 || cc.WriteFiles[0].Path != "/etc/app.conf" || cc.WriteFiles[0].Permissions != "0600" || cc.WriteFiles[1].Path != scriptPath {
		t.Fatalf("write_files: %+v", cc.WriteFiles)
	}
	script, _ := base64.StdEncoding.DecodeString(cc.WriteFiles[1].Content)
	if !strings.Contains(string(script), `'sh' '-c' 'echo it'\''s'`) || !strings.Contains(string(script), "say done "+s.instanceID) {
		t.Fatalf("script:\n%s", script)
	}
	mount := stockPlan(t, &computev1.Action{Id: "m", Kind: &computev1.Action_Mount{Mount: &computev1.MountAction{Device: "/dev/vdb", Path: "/mnt"}}})
	if _, err := newSeed("vm-2", mount); err == nil || !strings.Contains(err.Error(), "cloud-init") {
		t.Fatalf("a mount through cloud-init: %v", err)
	}
}

// Results come off the console, garbled lines and all; the first failing
// action fails the creation.
func TestSeedResults(t *testing.T) {
	plan := stockPlan(t,
		&computev1.Action{Id: "a", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"true"}}}},
		&computev1.Action{Id: "b", After: []string{"a"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"false"}}}},
	)
	s, err := newSeed("vm-1", plan)
	if err != nil {
		t.Fatal(err)
	}
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	console := "[ 1.0] boot\n" + consoleTag + " result 0 0 " + b64("hi\n") + " - " + b64("k=v\n") + "\r\n" +
		"[ 2.0] noise " + consoleTag + " result 1 3 - " + b64("bad\n") + " -\n" + consoleTag + " done " + s.instanceID + "\n"
	res, f := s.results(plan, console)
	if len(res) != 2 || string(res[0].Stdout) != "hi\n" || res[0].Results["k"] != "v" || res[0].Error != "" {
		t.Fatalf("results: %v", res)
	}
	if f == nil || f.step.Action.Id != "b" || res[1].ExitCode != 3 || string(res[1].Stderr) != "bad\n" {
		t.Fatalf("failure: %v, %v", f, res[1])
	}
	if _, f := s.results(plan, consoleTag+" done x\n"); f == nil || !strings.Contains(f.result.Error, "no result") {
		t.Fatalf("no result lines: %v", f)
	}
}
