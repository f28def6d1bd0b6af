package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/internal/testutil"
)

// cliRun runs the CLI as Main does, with args, against whatever the
// environment and config file say.
func cliRun(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var out, errw bytes.Buffer
	code = run(ctx, args, &out, &errw)
	return code, out.String(), errw.String()
}

// cliOK runs the CLI and fails the test unless it exits 0.
func cliOK(t *testing.T, args ...string) string {
	t.Helper()
	code, out, stderr := cliRun(t, args...)
	if code != 0 {
		t.Fatalf("vmgrid %s: exit %d: %s%s", strings.Join(args, " "), code, out, stderr)
	}
	return out
}

// cliJSON runs the CLI with -o json and decodes what it printed.
func cliJSON[T any](t *testing.T, args ...string) T {
	t.Helper()
	var v T
	out := cliOK(t, append(args, "-o", "json")...)
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("vmgrid %s -o json: %v:\n%s", strings.Join(args, " "), err, out)
	}
	return v
}

type obj = map[string]any

func items(o obj, key string) []obj {
	var out []obj
	list, _ := o[key].([]any)
	for _, it := range list {
		out = append(out, it.(obj))
	}
	return out
}

// The verbs against a real grid (what vmgrid up starts: mutual TLS, one
// plant, QEMU guests from the tiny golden image), each run as the CLI
// runs, reaching the grid through the context vmgrid up writes (no flags,
// no environment), their -o json parsed.
func TestVerbsAgainstAGrid(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("plants mount FUSE views: needs root")
	}
	testutil.NeedQEMU(t)
	testutil.NeedE2fsprogs(t)
	clearEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	gr, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(t), Plants: 1, Golden: "tiny", AgentPath: testutil.GuestAgent(t), NoFsync: true, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer gr.Close()
	config := os.Getenv("VMGRID_CONFIG") // clearEnv's
	if err := saveContext(config, "other", gr); err != nil {
		t.Fatal(err)
	}
	if err := saveContext(config, "e2e", gr); err != nil { // what vmgrid up does
		t.Fatal(err)
	}

	t.Run("context", func(t *testing.T) { testContextVerbs(t) })
	t.Run("image", func(t *testing.T) { testImageVerbs(t) })
	t.Run("vm", func(t *testing.T) { testVMVerbs(t, gr) })
	t.Run("data and task", func(t *testing.T) { testDataAndTaskVerbs(t) })
	t.Run("cache", func(t *testing.T) {
		stats := cliJSON[[]obj](t, "cache", "stats")
		if len(stats) != 1 || stats[0]["server"] != gr.Plants[0].Addr() {
			t.Fatalf("cache stats: %v", stats)
		}
		if _, ok := stats[0]["stats"].(obj)["fetchedBytes"]; !ok {
			t.Fatalf("cache stats without fetchedBytes: %v", stats)
		}
	})
}

func testContextVerbs(t *testing.T) {
	current := func() string {
		for _, c := range cliJSON[[]obj](t, "context", "ls") {
			if c["token"] != "REDACTED" || c["operator-token"] != "REDACTED" {
				t.Errorf("context ls shows tokens: %v", c)
			}
			if c["current"] == true {
				return c["name"].(string)
			}
		}
		return ""
	}
	if got := current(); got != "e2e" {
		t.Fatalf("current context %q after vmgrid up's, want e2e", got)
	}
	cliOK(t, "context", "use", "other")
	if got := current(); got != "other" {
		t.Fatalf("current context %q after use other", got)
	}
	cliOK(t, "context", "rm", "other")
	cliOK(t, "context", "use", "e2e")
	if code, _, stderr := cliRun(t, "context", "use", "other"); code == 0 || !strings.Contains(stderr, `no context "other"`) {
		t.Fatalf("use of a removed context: exit %d, %s", code, stderr)
	}
	if got := cliJSON[obj](t, "context", "show"); got["name"] != "e2e" || got["shop"] == "" || got["tls-ca"] == "" {
		t.Fatalf("context show: %v", got)
	}
}

func testImageVerbs(t *testing.T) {
	var names []string
	for _, m := range items(cliJSON[obj](t, "image", "ls"), "images") {
		names = append(names, m["name"].(string))
	}
	if !slices.Contains(names, "tiny") {
		t.Fatalf("image ls: %v", names)
	}
	m := cliJSON[obj](t, "image", "get", "tiny")
	if m["name"] != "tiny" || len(items(m, "files")) == 0 || m["attributes"].(obj)["arch"] != "x86_64" {
		t.Fatalf("image get tiny: %v", m)
	}
	if table := cliOK(t, "image", "list"); !strings.HasPrefix(table, "NAME") || !strings.Contains(table, "tiny") {
		t.Fatalf("image list:\n%s", table)
	}
}

func vmIDs(t *testing.T, args ...string) []string {
	var ids []string
	for _, ad := range items(cliJSON[obj](t, append([]string{"vm", "ls"}, args...)...), "vms") {
		ids = append(ids, ad["vmId"].(string))
	}
	return ids
}

func testVMVerbs(t *testing.T, gr *grid.Grid) {
	ad := cliJSON[obj](t, "vm", "create", "--request-id", "cli1", "--hostname", "cli1")
	id, _ := ad["vmId"].(string)
	if ad["state"] != "VM_STATE_RUNNING" || ad["owner"] != "demo" || id == "" {
		t.Fatalf("vm create: %v", ad)
	}
	if got := vmIDs(t); !slices.Equal(got, []string{id}) {
		t.Fatalf("vm ls: %v, want [%s]", got, id)
	}
	// An operator sees every owner's VMs (the context's operator token);
	// an owner asking for all is refused.
	if got := vmIDs(t, "--all"); !slices.Contains(got, id) {
		t.Fatalf("vm ls --all: %v", got)
	}
	if code, _, stderr := cliRun(t, "vm", "ls", "--all", "--token", gr.Token); code == 0 || !strings.Contains(stderr, "PermissionDenied") {
		t.Fatalf("vm ls --all as an owner: exit %d, %s", code, stderr)
	}
	if got := cliJSON[obj](t, "vm", "get", id); got["plant"] != "plant0" || got["vmId"] != id {
		t.Fatalf("vm get: %v", got)
	}
	if y := cliOK(t, "vm", "show", id, "-o", "yaml"); !strings.Contains(y, "state: VM_STATE_RUNNING") {
		t.Fatalf("vm show -o yaml:\n%s", y)
	}
	if table := cliOK(t, "vm", "list"); !strings.HasPrefix(table, "VM ") || !strings.Contains(table, id) || !strings.Contains(table, "RUNNING") {
		t.Fatalf("vm list:\n%s", table)
	}
	testVMExec(t, id)
	cliOK(t, "vm", "delete", id)
	if got := vmIDs(t); len(got) != 0 {
		t.Fatalf("vm ls after rm: %v", got)
	}
}

func testDataAndTaskVerbs(t *testing.T) {
	local := filepath.Join(t.TempDir(), "words.txt")
	if err := os.WriteFile(local, []byte("one two three\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cliOK(t, "data", "put", "-q", local, "words.txt")
	files := items(cliJSON[obj](t, "data", "ls", "words"), "files")
	if len(files) != 1 || files[0]["path"] != "words.txt" || files[0]["size"] != "14" {
		t.Fatalf("data ls: %v", files) // protojson: 64-bit integers are strings
	}
	out := filepath.Join(t.TempDir(), "back.txt")
	cliOK(t, "data", "get", "-q", "words.txt", out)
	if b, _ := os.ReadFile(out); string(b) != "one two three\n" {
		t.Fatalf("data get: %q", b)
	}

	sub := cliOK(t, "task", "submit", "--request-id", "cli-task", "--input", "words.txt", "--wait", "--", "wc -w < in/words.txt > out/count.txt")
	id := strings.Fields(sub)[0]
	task := cliJSON[obj](t, "task", "get", id)
	if task["state"] != "TASK_STATE_SUCCEEDED" || task["taskId"] != id || len(task["outputs"].([]any)) != 1 {
		t.Fatalf("task get: %v", task)
	}
	count := filepath.Join(t.TempDir(), "count.txt")
	cliOK(t, "data", "get", "-q", task["outputs"].([]any)[0].(string), count)
	if b, _ := os.ReadFile(count); strings.TrimSpace(string(b)) != "3" {
		t.Fatalf("the task counted %q", b)
	}

	cliOK(t, "data", "rm", "words.txt")
	if files := items(cliJSON[obj](t, "data", "list", "words"), "files"); len(files) != 0 {
		t.Fatalf("data ls after rm: %v", files)
	}
}

// vm exec streams the command's output and exits with its exit code; with
// -i it forwards stdin.
func testVMExec(t *testing.T, id string) {
	code, out, stderr := cliRun(t, "vm", "exec", id, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
	if code != 7 || out != "out\n" || !strings.Contains(stderr, "err") {
		t.Fatalf("vm exec: exit %d stdout %q stderr %q", code, out, stderr)
	}
	in := filepath.Join(t.TempDir(), "in")
	if err := os.WriteFile(in, []byte("shout\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(in)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old := os.Stdin
	os.Stdin = f // cobra's default input
	defer func() { os.Stdin = old }()
	if out := cliOK(t, "vm", "exec", "-i", id, "--", "tr", "a-z", "A-Z"); out != "SHOUT\n" {
		t.Fatalf("vm exec -i: %q", out)
	}
	if code, _, stderr := cliRun(t, "vm", "port-forward", id, "x"); code == 0 || !strings.Contains(stderr, "REMOTE is a port") {
		t.Fatalf("vm port-forward with a bad port: exit %d %s", code, stderr)
	}
}
