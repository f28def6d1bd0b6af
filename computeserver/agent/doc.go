// Package agent is the guest agent of vmgrid and its host-side client. The
// agent is a small static program inside golden images; it talks to the
// plant over a virtio-serial port named PortName, one JSON object per line
// each way, and runs configuration actions: run a command, write a file,
// set the hostname, add a user with an SSH key, mount a disk, set the clock
// (after a resume the guest clock is stale).
//
// Requests carry an id that the response repeats. The agent handles one
// request at a time, in order.
package agent
