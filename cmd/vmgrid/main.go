// Command vmgrid is every vmgrid role (servers) and client verb in one binary.
package main

import (
	"os"

	"github.com/vmgrid/vmgrid/cmd/vmgrid/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:])) }
