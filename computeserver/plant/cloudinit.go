package plant

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// The cloud-init path: for an image whose guest runs cloud-init (and maybe
// no agent at all), the plant writes the request's actions into a NoCloud
// seed — an ISO 9660 volume labelled "cidata" with meta-data (a fresh
// instance-id per clone, the hostname) and user-data (#cloud-config:
// users with their SSH keys, write_files, and one runcmd script for the
// commands) — attached as a second, read-only disk of the cold boot.
//
// cloud-init applies them in its own stage order: hostname, users and
// files first (init stage), the commands last (final stage), in DAG order
// among themselves. The script then checks every action (the hostname set,
// the user there with its key, the file written), and reports each result
// and a last "done" line on the serial console, which the plant reads:
// that is how it knows the guest is configured without any agent. Where
// the guest also runs qemu-ga, the plant keeps a connection to it for
// ExecVM.

// consoleTag starts every line the seed's script writes on the console.
const consoleTag = "vmgrid-cloud-init:"

// SeedFile is the name of the seed volume in a VM's directory.
const SeedFile = "seed.iso"

// seed is what a clone's cloud-init seed carries.
type seed struct {
	vmID       string
	instanceID string
	steps      []dag.Step // the actions it performs, in plan order
	// network is the NoCloud network-config (version 2) of the VM's
	// lease (CloudInitNetworkConfig); empty without a network.
	network []byte
}

// cloudConfig is the #cloud-config of user-data (field names as cloud-init
// reads them).
type cloudConfig struct {
	PreserveHostname bool       `json:"preserve_hostname"`
	Hostname         string     `json:"hostname,omitempty"`
	Users            []ciUser   `json:"users,omitempty"`
	WriteFiles       []ciFile   `json:"write_files"`
	Runcmd           [][]string `json:"runcmd"`
}

type ciUser struct {
	Name              string   `json:"name"`
	Shell             string   `json:"shell"`
	LockPasswd        bool     `json:"lock_passwd"`
	SSHAuthorizedKeys []string `json:"ssh_authorized_keys,omitempty"`
}

type ciFile struct {
	Path        string `json:"path"`
	Encoding    string `json:"encoding"`
	Content     string `json:"content"`
	Permissions string `json:"permissions"`
}

// scriptPath is where the seed's script lands in the guest.
const scriptPath = "/var/lib/vmgrid/cloud-init.sh"

// newSeed checks that cloud-init can carry every action of the plan.
func newSeed(vmID string, plan *dag.Plan) (*seed, error) {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	s := &seed{vmID: vmID, instanceID: vmID + "-" + hex.EncodeToString(rnd[:])}
	for _, st := range plan.Steps {
		if st.Done {
			continue
		}
		switch st.Action.Kind.(type) {
		case *computev1.Action_Exec, *computev1.Action_WriteFile, *computev1.Action_SetHostname, *computev1.Action_AddUser:
		default:
			return nil, fmt.Errorf("action %q (%s): an image configured through cloud-init takes exec, write_file, set_hostname and add_user only: %w", st.Action.Id, st.Kind, errdefs.ErrFailedPrecondition)
		}
		if st.OnError != nil {
			return nil, fmt.Errorf("action %q: error handlers (on_error) need an agent in the guest; this image is configured through cloud-init: %w", st.Action.Id, errdefs.ErrFailedPrecondition)
		}
		s.steps = append(s.steps, st)
	}
	return s, nil
}

// hostname is the one the request sets (the last set_hostname), else "".
func (s *seed) hostname() string {
	h := ""
	for _, st := range s.steps {
		if k, ok := st.Action.Kind.(*computev1.Action_SetHostname); ok {
			h = k.SetHostname.Hostname
		}
	}
	return h
}

// userData is the #cloud-config.
func (s *seed) userData() ([]byte, error) {
	cc := cloudConfig{Hostname: s.hostname()}
	for _, st := range s.steps {
		switch k := st.Action.Kind.(type) {
		case *computev1.Action_AddUser:
			u := ciUser{Name: k.AddUser.User, Shell: "/bin/bash", LockPasswd: true}
			if key := strings.TrimSpace(k.AddUser.SshKey); key != "" {
				u.SSHAuthorizedKeys = []string{key}
			}
			cc.Users = append(cc.Users, u)
		case *computev1.Action_WriteFile:
			mode := k.WriteFile.Mode
			if mode == 0 {
				mode = 0o644
			}
			cc.WriteFiles = append(cc.WriteFiles, ciFile{Path: k.WriteFile.Path, Encoding: "b64",
				Content: base64.StdEncoding.EncodeToString(k.WriteFile.Content), Permissions: fmt.Sprintf("%#o", mode)})
		}
	}
	cc.WriteFiles = append(cc.WriteFiles, ciFile{Path: scriptPath, Encoding: "b64", Permissions: "0700",
		Content: base64.StdEncoding.EncodeToString([]byte(s.script()))})
	cc.Runcmd = [][]string{{"/bin/sh", scriptPath}}
	b, err := yaml.Marshal(cc)
	if err != nil {
		return nil, err
	}
	return append([]byte("#cloud-config\n"), b...), nil
}

// script runs the commands in order (stopping at the first that fails),
// checks the other actions, and reports each on the console:
//
//	vmgrid-cloud-init: result INDEX EXIT STDOUT STDERR RESULTS   (base64 tails, "-" if empty)
//	vmgrid-cloud-init: done INSTANCE-ID
func (s *seed) script() string {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
# vmgrid: the request's commands and checks; results go to the serial console.
d=/var/lib/vmgrid/run; mkdir -p $d
say() { printf '` + consoleTag + ` %s\n' "$*" > /dev/ttyS0; }
enc() { if [ -s "$1" ]; then tail -c 4096 "$1" | base64 -w0; else printf -; fi; }
report() { say result "$1" "$2" "$(enc $d/$1.out)" "$(enc $d/$1.err)" "$(enc $d/$1.res)"; }
`)
	for i, st := range s.steps {
		fmt.Fprintf(&b, "%s >$d/%d.out 2>$d/%d.err; rc=$?; report %d $rc\n", s.command(i, st), i, i, i)
		if _, ok := st.Action.Kind.(*computev1.Action_Exec); ok {
			fmt.Fprintf(&b, "[ $rc = 0 ] || { say done %s; exit 0; }\n", s.instanceID)
		}
	}
	fmt.Fprintf(&b, "say done %s\n", s.instanceID)
	return b.String()
}

// command is the shell that runs (exec) or checks (the others) step i.
func (s *seed) command(i int, st dag.Step) string {
	q := shellQuote
	switch k := st.Action.Kind.(type) {
	case *computev1.Action_Exec:
		e := k.Exec
		t := e.TimeoutSeconds
		if t == 0 {
			t = 300
		}
		cmd := "VMGRID_RESULTS=$d/" + strconv.Itoa(i) + ".res HOME=/root"
		for _, kv := range e.Env {
			cmd += " " + q(kv)
		}
		cmd += " timeout " + strconv.FormatUint(uint64(t), 10) + "s"
		for _, a := range e.Argv {
			cmd += " " + q(a)
		}
		if e.Dir != "" {
			cmd = "cd " + q(e.Dir) + " && env " + cmd
		} else {
			cmd = "env " + cmd
		}
		return "(" + cmd + ")"
	case *computev1.Action_SetHostname:
		return "[ \"$(hostname)\" = " + q(k.SetHostname.Hostname) + " ]"
	case *computev1.Action_AddUser:
		c := "id -u " + q(k.AddUser.User)
		if key := strings.TrimSpace(k.AddUser.SshKey); key != "" {
			c += " && grep -qxF " + q(key) + " ~" + k.AddUser.User + "/.ssh/authorized_keys"
		}
		return c
	case *computev1.Action_WriteFile:
		return "[ -f " + q(k.WriteFile.Path) + " ]"
	}
	return "false"
}

// write makes the seed volume in dir.
func (s *seed) write(ctx context.Context, dir string) (string, error) {
	src := filepath.Join(dir, "cidata")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	defer os.RemoveAll(src)
	ud, err := s.userData()
	if err != nil {
		return "", err
	}
	host := s.hostname()
	if host == "" {
		host = s.vmID
	}
	files := map[string][]byte{
		"meta-data": fmt.Appendf(nil, "instance-id: %s\nlocal-hostname: %s\n", s.instanceID, host),
		"user-data": ud,
	}
	if len(s.network) > 0 {
		files["network-config"] = s.network
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(src, name), b, 0o644); err != nil {
			return "", err
		}
	}
	out := filepath.Join(dir, SeedFile)
	if b, err := exec.CommandContext(ctx, "xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-R", "-o", out, src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("make the cloud-init seed: xorriso: %w: %s", err, b)
	}
	return out, nil
}

// cloudInitSeed builds the clone's seed and attaches it (read-only) as the
// machine's second disk.
func (l *line) cloudInitSeed(ctx context.Context) (func(), error) {
	s, err := newSeed(l.v.ad.VmId, l.plan)
	if err != nil {
		return nil, err
	}
	if l.networked() { // the network step ran: the NIC is on the command line
		s.network = []byte(CloudInitNetworkConfig(l.v.ad.Network, l.mtu))
	}
	path, err := s.write(ctx, l.v.dir)
	if err != nil {
		return nil, err
	}
	l.spec.Disks = append(l.spec.Disks, vmm.Disk{Path: path, Format: vmm.Raw, ReadOnly: true, Interface: vmm.Virtio})
	l.seeded = s
	return nil, nil // in the VM's directory: removed with it
}

// qgaAfterCloudInit bounds the look for qemu-ga once cloud-init is done:
// where the guest has it, it started long before (it is up early in the
// boot), but a guest slowed down by a busy host answers late.
const qgaAfterCloudInit = 45 * time.Second

// cloudInitWait waits for the seed's "done" line on the console (bounded
// by the plant's guest timeout; the console's tail in the error), records
// the actions' results, and connects to qemu-ga if the guest has it.
func (l *line) cloudInitWait(ctx context.Context) (func(), error) {
	l.progress(computev1.VMState_VM_STATE_CONFIGURING, "waiting for cloud-init (first boot)")
	l.v.setState(computev1.VMState_VM_STATE_CONFIGURING)
	timeout := l.p.guestTimeout()
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := l.v.m.WaitConsole(wctx, consoleTag+" done "+l.seeded.instanceID); err != nil {
		if errors.Is(err, vmm.ErrExited) {
			return nil, machineExited(ctx, l.v.m)
		}
		return nil, fmt.Errorf("cloud-init in %s did not finish within %s: %w: %w\n--- guest console (tail) ---\n%s",
			l.v.ad.VmId, timeout, err, errdefs.ErrUnavailable, tail(l.v.m.ConsoleLog(), 2000))
	}
	results, f := l.seeded.results(l.plan, l.v.m.ConsoleLog())
	l.v.mu.Lock()
	l.v.ad.Actions = results
	l.v.mu.Unlock()
	if f != nil {
		return nil, fmt.Errorf("configuration %w: %w", f, errdefs.ErrFailedPrecondition)
	}
	// qemu-ga, where the image has it, for ExecVM; without it the VM is
	// still configured.
	if qa, err := waitQGA(ctx, l.v.m, l.spec.Channels[0].Socket, qgaAfterCloudInit); err == nil {
		l.v.agent = qa
		return func() { qa.Close() }, nil
	}
	l.log.Info("no QEMU guest agent in this guest: ExecVM is not available")
	return nil, nil
}

// results reads the script's result lines off the console, one per
// action in plan order (performed ones Skipped), and the first failure.
func (s *seed) results(plan *dag.Plan, console string) ([]*computev1.ActionResult, *failure) {
	byIndex := map[int][]string{}
	for _, line := range strings.Split(console, "\n") {
		_, rest, ok := strings.Cut(strings.TrimRight(line, "\r"), consoleTag+" result ")
		if f := strings.Fields(rest); ok && len(f) == 5 {
			if i, err := strconv.Atoi(f[0]); err == nil {
				byIndex[i] = f[1:]
			}
		}
	}
	var out []*computev1.ActionResult
	for _, st := range plan.Steps {
		if st.Done {
			out = append(out, &computev1.ActionResult{Id: st.Action.Id, Digest: st.Digest, Skipped: true})
		}
	}
	for i, st := range s.steps {
		res := &computev1.ActionResult{Id: st.Action.Id, Digest: st.Digest}
		out = append(out, res)
		f, ok := byIndex[i]
		if !ok {
			res.Error = "cloud-init reported no result (an earlier command failed, or its console line was garbled)"
			return out, &failure{st, res}
		}
		rc, _ := strconv.Atoi(f[0])
		res.ExitCode, res.Stdout, res.Stderr = int32(rc), unb64(f[1]), unb64(f[2])
		res.Results = parseResults(string(unb64(f[3])))
		if rc != 0 {
			res.Error = "exit status " + f[0]
			if _, isExec := st.Action.Kind.(*computev1.Action_Exec); !isExec {
				res.Error = "cloud-init did not apply it (see /var/log/cloud-init.log in the guest)"
			}
			return out, &failure{st, res}
		}
	}
	return out, nil
}

func unb64(s string) []byte {
	if s == "-" {
		return nil
	}
	b, _ := base64.StdEncoding.DecodeString(s)
	return b
}
