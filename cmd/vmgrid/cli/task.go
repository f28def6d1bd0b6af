package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

func taskCmd(g *globals) *cobra.Command {
	s := &service{}
	c := group(&cobra.Command{Use: "task", Short: "Run commands in fresh VMs with files staged in and out (through a shop)"},
		taskSubmitCmd(g, s), taskGetCmd(g, s), taskWaitCmd(g, s), taskCancelCmd(g, s))
	shopService(c, s)
	return c
}

func taskSubmitCmd(g *globals, s *service) *cobra.Command {
	req := &shopv1.SubmitTaskRequest{Hardware: &computev1.Hardware{}}
	var wait bool
	c := &cobra.Command{
		Use:   "submit --input PATH... -- COMMAND",
		Short: "Submit a task: inputs from the data server, a command, outputs back",
		Long: `Submit a task. The shop creates a VM whose data disk holds your --input files
(paths on the data server; see 'vmgrid data put') under /root/work/in/, runs
COMMAND with sh -c in /root/work, copies /root/work/out/ back to the data
server (--output-prefix, default tasks/TASK_ID/out) — also when the command
fails — and destroys the VM.`,
		Example: `  vmgrid data put words.txt words.txt
  vmgrid task submit --input words.txt --wait -- 'wc -w < in/words.txt > out/count.txt'
  vmgrid data get tasks/TASK_ID/out/count.txt count.txt`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Command = strings.Join(args, " ")
			if req.RequestId == "" {
				req.RequestId = randomID("task-")
			}
			cl, done, err := shopClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			t, err := cl.SubmitTask(cmd.Context(), req)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), t.TaskId)
			if !wait {
				return nil
			}
			return waitTask(cmd, cl, t.TaskId)
		},
	}
	fl := c.Flags()
	fl.StringVar(&req.RequestId, "request-id", "", "idempotency key (default: random)")
	fl.StringArrayVar(&req.Inputs, "input", nil, "input file on the data server (repeat)")
	fl.StringVar(&req.OutputPrefix, "output-prefix", "", "where outputs go on the data server: under tasks/TASK_ID/ (default tasks/TASK_ID/out)")
	fl.StringVar(&req.Image, "image", "", "golden image (default: the best match)")
	fl.Uint32Var(&req.TimeoutSeconds, "timeout-seconds", 0, "kill the command after this long (0: one hour)")
	fl.BoolVar(&wait, "wait", false, "wait for the task to end (exit status: the task's)")
	return c
}

func taskGetCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "get TASK", Short: "Print a task", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			t, err := cl.GetTask(cmd.Context(), &shopv1.GetTaskRequest{TaskId: args[0]})
			if err != nil {
				return err
			}
			b, _ := protojson.MarshalOptions{Multiline: true}.Marshal(t)
			fmt.Fprintln(cmd.OutOrStdout(), string(b))
			return nil
		}}
}

func taskWaitCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "wait TASK", Short: "Follow a task to its end (exit status: the task's)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			return waitTask(cmd, cl, args[0])
		}}
}

func taskCancelCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "cancel TASK", Short: "Cancel a task (its VM is destroyed)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := shopClient(g, s)
			if err != nil {
				return err
			}
			defer done()
			_, err = cl.CancelTask(cmd.Context(), &shopv1.GetTaskRequest{TaskId: args[0]})
			return err
		}}
}

// errTaskFailed makes `vmgrid task wait` exit non-zero for a failed task.
var errTaskFailed = errors.New("task did not succeed")

func waitTask(cmd *cobra.Command, cl shopv1.ShopServiceClient, id string) error {
	stream, err := cl.WatchTask(cmd.Context(), &shopv1.GetTaskRequest{TaskId: id})
	if err != nil {
		return err
	}
	start := time.Now()
	var last *shopv1.Task
	for {
		t, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		last = t
		fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %s\n", time.Since(start).Round(time.Millisecond), strings.TrimPrefix(t.State.String(), "TASK_STATE_"))
	}
	if last == nil {
		return fmt.Errorf("task %s: no state", id)
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "%s: %s, exit code %d\n", id, strings.TrimPrefix(last.State.String(), "TASK_STATE_"), last.ExitCode)
	for _, o := range last.Outputs {
		fmt.Fprintln(out, "  output:", o)
	}
	if last.Error != "" {
		fmt.Fprintln(out, "  error:", last.Error)
	}
	if last.StderrTail != "" {
		fmt.Fprintf(out, "  stderr (tail):\n%s\n", last.StderrTail)
	}
	if last.State != shopv1.TaskState_TASK_STATE_SUCCEEDED {
		return errTaskFailed
	}
	return nil
}
