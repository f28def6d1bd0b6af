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
	// Networks (net.go).
	OpNetwork = "configure_network"
	// Streams (stream.go): exec_stream starts a command whose output comes
	// back as responses with More set, ending with one without; input
	// sends it stdin, end of input, a window size or a signal and gets no
	// response. Several streams run at once beside ordinary requests.
	OpExecStream = "exec_stream"
	OpInput      = "input"
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
	// configure_network (net.go): the NIC with MAC gets Address (CIDR),
	// MTU and, when set, a default route via Gateway; Hostname is set too
	// when given.
	MAC string `json:"mac,omitempty"`
	// CurrentMAC, when set, finds the NIC (a clone's NIC restored from
	// its golden image still has the golden's MAC), which then gets MAC.
	CurrentMAC string `json:"current_mac,omitempty"`
	Address    string `json:"address,omitempty"`
	Gateway    string `json:"gateway,omitempty"`
	MTU        int    `json:"mtu,omitempty"`
	// exec_stream (with Argv, Env, Dir): a pseudo-terminal of Rows x Cols.
	TTY  bool   `json:"tty,omitempty"`
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// input: the exec_stream it is for (that request's ID), then stdin
	// Data, EOF (end of stdin), a new window size (Rows, Cols) or Signal.
	Stream uint64 `json:"stream,omitempty"`
	Data   []byte `json:"data,omitempty"`
	EOF    bool   `json:"eof,omitempty"`
	Signal int    `json:"signal,omitempty"`
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
	// exec_stream: More says more responses of this ID follow; those
	// carry Data written by the command on FD (1 stdout, 2 stderr). The
	// last has More false and ExitCode (or Error).
	More bool   `json:"more,omitempty"`
	FD   int    `json:"fd,omitempty"`
	Data []byte `json:"data,omitempty"`
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
