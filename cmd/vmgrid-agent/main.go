// Command vmgrid-agent is the guest agent: built static, it runs inside
// golden images and serves the plant over a virtio-serial port. (The vmgrid
// binary, built static, is the agent too when invoked as vmgrid-agent.)
package main

import "github.com/vmgrid/vmgrid/computeserver/agent"

func main() { agent.Main() }
