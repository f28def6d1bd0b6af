package agent

import "time"

// PortName is the virtio-serial port name the agent opens
// (/sys/class/virtio-ports/vport*/name).
const PortName = "org.vmgrid.agent.0"

// Operations.
const (
	OpPing      = "ping"
	OpExec      = "exec"
	OpWriteFile = "write_file"
	OpHostname  = "set_hostname"
	OpAddUser   = "add_user"
	OpMount     = "mount"
	OpSetTime   = "set_time"
	OpReadFile  = "read_file"

	// Clone identity (identity.go).
	// OpIdentity makes a restored clone its own machine: fresh host entropy
	// into the kernel's pool and a reseed of its RNG, a new machine-id, new
	// SSH host keys (then sshd is started). A request with none of those
	// set only reports the identity.
	OpIdentity = "identity"
)

// Request is one action for the agent.
type Request struct {
	ID uint64 `json:"id"`
	Op string `json:"op"`

	// exec: argv, environment (KEY=VALUE), working directory, stdin, timeout.
	Argv    []string `json:"argv,omitempty"`
	Env     []string `json:"env,omitempty"`
	Dir     string   `json:"dir,omitempty"`
	Stdin   []byte   `json:"stdin,omitempty"`
	Timeout Duration `json:"timeout,omitempty"`

	// write_file / read_file / mount target.
	Path    string `json:"path,omitempty"`
	Content []byte `json:"content,omitempty"`
	Mode    uint32 `json:"mode,omitempty"`

	// set_hostname.
	Hostname string `json:"hostname,omitempty"`

	// add_user.
	User   string `json:"user,omitempty"`
	SSHKey string `json:"ssh_key,omitempty"`

	// mount.
	Device  string `json:"device,omitempty"`
	FSType  string `json:"fstype,omitempty"`
	Options string `json:"options,omitempty"`

	// set_time.
	UnixNano int64 `json:"unix_nano,omitempty"`

	// identity (identity.go): bytes from the host's RNG to credit to the
	// guest's pool, the new machine-id (32 hex digits), new SSH host keys:
	// the ones given (made by the host, which is much faster than
	// ssh-keygen under TCG) or, with SSHHostKeys alone, made by ssh-keygen.
	Entropy     []byte    `json:"entropy,omitempty"`
	MachineID   string    `json:"machine_id,omitempty"`
	SSHHostKeys bool      `json:"ssh_host_keys,omitempty"`
	HostKeys    []HostKey `json:"host_keys,omitempty"`
}

// Response is the outcome of a Request.
type Response struct {
	ID uint64 `json:"id"`
	// Error is set when the action could not run at all (bad request, file
	// not writable, command not found). A command that ran and failed has
	// Error empty and a non-zero ExitCode.
	Error    string `json:"error,omitempty"`
	ExitCode int    `json:"exit_code"`
	// Stdout and Stderr keep the last MaxOutput bytes of each.
	Stdout []byte `json:"stdout,omitempty"`
	Stderr []byte `json:"stderr,omitempty"`
	// Results are KEY=VALUE lines the command wrote to the file named by
	// $VMGRID_RESULTS.
	Results map[string]string `json:"results,omitempty"`
	Content []byte            `json:"content,omitempty"` // read_file
	// Version of the agent (ping).
	Version string `json:"version,omitempty"`

	// identity (identity.go): the guest's identity after the request.
	Identity *Identity `json:"identity,omitempty"`
}

// MaxOutput bounds the output kept of a command (its tail).
const MaxOutput = 64 << 10

// Version is the agent protocol version.
const Version = "1"

// Duration is a time.Duration that encodes as a string ("5s").
type Duration time.Duration

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}
