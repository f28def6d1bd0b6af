// Command vmgrid-agent is the guest agent: built static, it runs inside
// golden images and serves the plant over a virtio-serial port.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/agent"
)

func main() {
	ctx := context.Background()
	for {
		dev, err := agent.FindPort(agent.PortName)
		if err == nil {
			var f *os.File
			if f, err = os.OpenFile(dev, os.O_RDWR, 0); err == nil {
				err = agent.Serve(ctx, f)
				f.Close()
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "vmgrid-agent:", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
