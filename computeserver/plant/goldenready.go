package plant

import (
	"context"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/agent"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

func (c *Config) agentTimeout() time.Duration {
	if c.AgentTimeout > 0 {
		return c.AgentTimeout
	}
	return DefaultAgentTimeout
}

// DefaultGoldenTimeout bounds a golden build's boot (the agent, then the
// image's Ready command) when GoldenOptions.AgentTimeout is 0: a systemd
// boot under TCG takes 20 s on an idle machine and several times that on
// a busy one.
const DefaultGoldenTimeout = 5 * time.Minute

func (b *goldenBuild) agentTimeout() time.Duration {
	if b.opts.AgentTimeout > 0 {
		return b.opts.AgentTimeout
	}
	return DefaultGoldenTimeout
}

// ready runs the image's Ready command: an agent may answer before the
// guest's boot is over (the debian image's starts as soon as its port
// appears, while systemd still brings up multi-user.target), and the memory
// state must hold a guest that finished booting. Bounded by the agent
// timeout too; a failure carries the command's output and the console's
// last lines.
func (b *goldenBuild) ready(ctx context.Context) error {
	cmd := b.img.Ready
	if len(cmd) == 0 {
		return nil
	}
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, b.agentTimeout())
	defer cancel()
	resp, err := b.ac.Do(rctx, agent.Request{Op: agent.OpExec, Argv: cmd, Timeout: agent.Duration(b.agentTimeout())})
	if err == nil && (resp.Error != "" || resp.ExitCode != 0) {
		err = fmt.Errorf("exit %d %s: %s%s", resp.ExitCode, resp.Error, resp.Stdout, resp.Stderr)
	}
	if err != nil {
		return fmt.Errorf("golden boot: the guest did not finish booting within %s: %w: %w\n--- guest console (tail) ---\n%s",
			b.agentTimeout(), err, errdefs.ErrUnavailable, tail(b.m.ConsoleLog(), 2000))
	}
	b.log.Info("golden guest booted", zap.String("state", strings.TrimSpace(string(resp.Stdout))), zap.Duration("took", time.Since(start)))
	return nil
}
