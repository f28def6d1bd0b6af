package cli

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current --help output")

// clearEnv unsets the variables whose values become flag defaults or
// settings, so the tests do not depend on the shell they run in.
func clearEnv(t *testing.T) {
	for _, k := range []string{"VMGRID_SHOP", "VMGRID_TOKEN", "VMGRID_IMAGESERVER", "VMGRID_DATASERVER",
		"VMGRID_COMPUTESERVER", "VMGRID_DATA_TOKEN", "VMGRID_OPERATOR_TOKEN",
		"VMGRID_TLS_CA", "VMGRID_TLS_CERT", "VMGRID_TLS_KEY"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	// Nor on the contexts of whoever runs it.
	t.Setenv("VMGRID_CONFIG", filepath.Join(t.TempDir(), "config.yaml"))
}

func commandPaths(c *cobra.Command) [][]string {
	out := [][]string{nil}
	for _, sub := range c.Commands() {
		if sub.Hidden || sub.Name() == "help" || sub.Name() == "completion" {
			continue
		}
		for _, p := range commandPaths(sub) {
			out = append(out, append([]string{sub.Name()}, p...))
		}
	}
	return out
}

// TestHelp compares every command's --help with testdata/NAME.golden
// (go test ./cmd/vmgrid/cli -run TestHelp -update rewrites them).
func TestHelp(t *testing.T) {
	clearEnv(t)
	for _, path := range commandPaths(NewRoot()) {
		name := strings.Join(append([]string{"vmgrid"}, path...), "_")
		t.Run(name, func(t *testing.T) {
			root := NewRoot()
			var out bytes.Buffer
			root.SetOut(&out)
			root.SetErr(&out)
			root.SetArgs(append(append([]string(nil), path...), "--help"))
			if err := root.Execute(); err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if got := out.String(); got != string(want) {
				t.Errorf("--help of %s changed (run with -update if that is intended):\n--- got\n%s\n--- want\n%s", name, got, want)
			}
		})
	}
}
