package cli

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

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
	submit := shopVerb(g, s, func(cmd *cobra.Command, _ []string, cl shopv1.ShopServiceClient) error {
		t, err := cl.SubmitTask(cmd.Context(), req)
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), t.TaskId)
		if !wait {
			return nil
		}
		return waitTask(cmd, cl, t.TaskId)
	})
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
			return submit(cmd, args)
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

// taskColumns are the table of task get.
var taskColumns = []column[*shopv1.Task]{
	{name: "TASK", value: func(t *shopv1.Task) string { return t.TaskId }},
	{name: "STATE", value: func(t *shopv1.Task) string { return taskState(t.State) }},
	{name: "EXIT", value: func(t *shopv1.Task) string { return fmt.Sprint(t.ExitCode) }},
	{name: "VM", value: func(t *shopv1.Task) string { return dash(t.VmId) }},
	{name: "PLANT", value: func(t *shopv1.Task) string { return dash(t.Plant) }},
	{name: "AGE", value: func(t *shopv1.Task) string { return age(t.SubmittedUnixNano) }},
	{name: "OWNER", wide: true, value: func(t *shopv1.Task) string { return t.Owner }},
	{name: "COMMAND", wide: true, value: func(t *shopv1.Task) string { return t.GetSpec().GetCommand() }},
	{name: "OUTPUTS", wide: true, value: func(t *shopv1.Task) string { return dash(strings.Join(t.Outputs, ",")) }},
	{name: "ERROR", wide: true, value: func(t *shopv1.Task) string { return dash(t.Error) }},
}

func taskState(st shopv1.TaskState) string { return strings.TrimPrefix(st.String(), "TASK_STATE_") }

func taskGetCmd(g *globals, s *service) *cobra.Command {
	var o output
	c := &cobra.Command{Use: "get TASK", Aliases: []string{"show"}, Short: "Print a task", Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return show(cmd, &o, taskColumns)(cl.GetTask(cmd.Context(), &shopv1.GetTaskRequest{TaskId: args[0]}))
		})}
	o.register(c)
	return c
}

func taskWaitCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "wait TASK", Short: "Follow a task to its end (exit status: the task's)", Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			return waitTask(cmd, cl, args[0])
		})}
}

func taskCancelCmd(g *globals, s *service) *cobra.Command {
	return &cobra.Command{Use: "cancel TASK", Short: "Cancel a task (its VM is destroyed)", Args: cobra.ExactArgs(1),
		RunE: shopVerb(g, s, func(cmd *cobra.Command, args []string, cl shopv1.ShopServiceClient) error {
			_, err := cl.CancelTask(cmd.Context(), &shopv1.GetTaskRequest{TaskId: args[0]})
			return err
		})}
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
	err = follow(stream.Recv, func(t *shopv1.Task) error {
		last = t
		fmt.Fprintf(cmd.ErrOrStderr(), "%7s  %s\n", time.Since(start).Round(time.Millisecond), taskState(t.State))
		return nil
	})
	if err != nil {
		return err
	}
	if last == nil {
		return fmt.Errorf("task %s: no state", id)
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "%s: %s, exit code %d\n", id, taskState(last.State), last.ExitCode)
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
