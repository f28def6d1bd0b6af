package cli

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// Every group fails in one line, non-zero, on an unknown verb and on no
// verb; every verb that needs arguments does without them.
func TestEveryGroupAndVerbFailsInOneLine(t *testing.T) {
	clearEnv(t)
	check := func(args []string, want string) {
		code, _, stderr := runCLI(t, args...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		if code == 0 || len(lines) != 1 || !strings.Contains(stderr, want) {
			t.Errorf("vmgrid %s: exit %d, stderr %q; want a non-zero exit and one line with %q", strings.Join(args, " "), code, stderr, want)
		}
	}
	for _, grp := range NewRoot().Commands() {
		if !grp.HasAvailableSubCommands() {
			continue
		}
		check([]string{grp.Name()}, "missing subcommand")
		check([]string{grp.Name(), "no-such-verb", "x"}, `unknown subcommand "no-such-verb"`) // no group has it
		for _, verb := range grp.Commands() {
			if verb.Args != nil && verb.Args(verb, nil) != nil {
				check([]string{grp.Name(), verb.Name()}, "arg")
			}
		}
	}
}

// ls and rm answer to list and delete on every noun, get to show.
func TestAliases(t *testing.T) {
	want := map[string]string{"ls": "list", "rm": "delete", "get": "show"}
	for _, grp := range NewRoot().Commands() {
		for _, verb := range grp.Commands() {
			if verb.CommandPath() == "vmgrid data get" {
				continue // a download, not a listing: data stat shows a file
			}
			if alias, ok := want[verb.Name()]; ok && !slices.Contains(verb.Aliases, alias) {
				t.Errorf("vmgrid %s %s: no alias %s", grp.Name(), verb.Name(), alias)
			}
		}
	}
}

// Every get and ls takes -o.
func TestOutputFlagOnEveryGetAndList(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		switch c.Name() {
		case "get", "ls", "stats", "stat", "grants", "show":
			if c.CommandPath() == "vmgrid data get" {
				break // a download
			}
			if f := c.Flags().Lookup("output"); f == nil || f.Shorthand != "o" {
				t.Errorf("%s has no -o", c.CommandPath())
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(NewRoot())
}

// A client setting comes from the flag, else the environment, else the
// current context (or --context), else the built-in default.
func TestSettingsPrecedence(t *testing.T) {
	clearEnv(t)
	config := filepath.Join(t.TempDir(), "config.yaml")
	c := &clientConfig{Current: "a", Contexts: map[string]*clientContext{
		"a": {Shop: "ctx-a:1", Token: "token-a", OperatorToken: "op-a", ComputeServers: []string{"p0:1", "p1:1"}, TLSCA: "ca-a"},
		"b": {Shop: "ctx-b:1", Token: "token-b"},
	}}
	resolve := func(args []string, env map[string]string, config string) (addr, token string, tlsCA string) {
		t.Helper()
		for k, v := range env {
			t.Setenv(k, v)
		}
		defer func() {
			for k := range env {
				os.Unsetenv(k)
			}
		}()
		// The flags as vmgrid vm registers them.
		cmd, g, s := &cobra.Command{Use: "vm"}, &globals{}, &service{}
		g.addFlags(cmd.PersistentFlags())
		shopService(cmd, s)
		if err := cmd.PersistentFlags().Parse(append(args, "--config", config)); err != nil {
			t.Fatal(err)
		}
		addrs, err := s.addrList(g)
		if err != nil {
			t.Fatal(err)
		}
		token, _ = s.bearer(g)
		tls, _ := g.clientTLS()
		return addrs[0], token, tls.CAFile
	}
	if err := c.save(config); err != nil {
		t.Fatal(err)
	}
	none := filepath.Join(t.TempDir(), "none.yaml")
	for _, tc := range []struct {
		name               string
		args               []string
		env                map[string]string
		config             string
		addr, token, tlsCA string
	}{
		{"context", nil, nil, config, "ctx-a:1", "token-a", "ca-a"},
		{"--context", []string{"--context", "b"}, nil, config, "ctx-b:1", "token-b", ""},
		{"env over context", nil, map[string]string{"VMGRID_SHOP": "env:1", "VMGRID_TOKEN": "env-token", "VMGRID_TLS_CA": "env-ca"}, config, "env:1", "env-token", "env-ca"},
		{"flag over env", []string{"--shop", "flag:1", "--token", "flag-token", "--tls-ca", "flag-ca"}, map[string]string{"VMGRID_SHOP": "env:1", "VMGRID_TLS_CA": "env-ca"}, config, "flag:1", "flag-token", "flag-ca"},
		{"default", nil, nil, none, "127.0.0.1:7060", "", ""},
	} {
		addr, token, ca := resolve(tc.args, tc.env, tc.config)
		if addr != tc.addr || token != tc.token || ca != tc.tlsCA {
			t.Errorf("%s: %s %s %s; want %s %s %s", tc.name, addr, token, ca, tc.addr, tc.token, tc.tlsCA)
		}
	}
}

// vm watch prints what changed, not the whole classad again.
func TestChanges(t *testing.T) {
	a := &computev1.ClassAd{VmId: "vm-1", State: computev1.VMState_VM_STATE_CONFIGURING, Plant: "p1"}
	b := &computev1.ClassAd{VmId: "vm-1", State: computev1.VMState_VM_STATE_RUNNING, Plant: "p1", ReadyNanos: 5}
	if got, want := changes(nil, a), []string{"vmId: vm-1", "plant: p1", "state: CONFIGURING"}; !slices.Equal(got, want) {
		t.Errorf("first: %q, want %q", got, want)
	}
	if got, want := changes(a, b), []string{"state: CONFIGURING -> RUNNING", "readyNanos: - -> 5"}; !slices.Equal(got, want) {
		t.Errorf("then: %q, want %q", got, want)
	}
	if got := changes(b, b); len(got) != 0 {
		t.Errorf("no change: %q", got)
	}
}
