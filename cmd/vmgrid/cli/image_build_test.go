package cli

import (
	"os"
	"strings"
	"testing"
)

// TestImageBuildBadInput: an unknown recipe or package fails at once, with
// one line, before anything is built (no image server is even dialed).
func TestImageBuildBadInput(t *testing.T) {
	clearEnv(t)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"image", "build", "nosuch"}, `unknown recipe "nosuch": the recipes are: tiny, debian`},
		{[]string{"image", "build", "tiny", "--packages", "curl"}, "only debian does"},
	}
	if b, _ := os.ReadFile("/etc/os-release"); strings.Contains(string(b), "VERSION_CODENAME=bookworm") {
		cases = append(cases, struct {
			args []string
			want string
		}{[]string{"image", "build", "debian", "--agent", "/bin/true", "--packages", "iproute2,no-such-package-vmgrid", "--server", "127.0.0.1:1"},
			"unknown package: no-such-package-vmgrid not in bookworm"})
	}
	for _, tc := range cases {
		code, _, stderr := runCLI(t, tc.args...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		if code == 0 || len(lines) != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("vmgrid %s: exit %d, stderr %q; want one line with %q", strings.Join(tc.args, " "), code, stderr, tc.want)
		}
	}
}
