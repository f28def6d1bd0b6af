// Command vmgrid is every vmgrid role (servers) and client verb in one binary.
// Invoked as vmgrid-agent (golden images carry it so) it is the guest agent.
package main

import (
	"os"
	"path/filepath"

	"github.com/vmgrid/vmgrid/cmd/vmgrid/cli"
	"github.com/vmgrid/vmgrid/computeserver/agent"
)

func main() {
	if filepath.Base(os.Args[0]) == "vmgrid-agent" {
		agent.Main()
	}
	os.Exit(cli.Main(os.Args[1:]))
}
