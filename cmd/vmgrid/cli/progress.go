package cli

import (
	"fmt"
	"io"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
)

// progress returns a callback drawing a byte progress bar on w (nothing
// when quiet), drawn once the first callback says the total (0: unknown, a
// spinner), and finish, which completes the bar after a success and leaves
// it where it stopped after a failure: a bar at 100% before an error says
// what did not happen.
func progress(w io.Writer, quiet bool, desc string) (update func(done, total uint64), finish func(err error)) {
	var b *progressbar.ProgressBar
	update = func(done, total uint64) {
		if quiet {
			return
		}
		if b == nil {
			b = newBar(w, total, desc)
		}
		_ = b.Set64(int64(done))
	}
	finish = func(err error) {
		switch {
		case b == nil:
		case err == nil:
			_ = b.Finish()
		default:
			_ = b.Exit()
			fmt.Fprintln(w)
		}
	}
	return update, finish
}

// newBar is progressbar.DefaultBytes writing to w.
func newBar(w io.Writer, total uint64, desc string) *progressbar.ProgressBar {
	max := int64(total)
	if total == 0 {
		max = -1
	}
	return progressbar.NewOptions64(max,
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSetWriter(w),
		progressbar.OptionShowBytes(true),
		progressbar.OptionShowTotalBytes(true),
		progressbar.OptionSetWidth(10),
		progressbar.OptionThrottle(65*time.Millisecond),
		progressbar.OptionShowCount(),
		progressbar.OptionOnCompletion(func() { fmt.Fprint(w, "\n") }),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionFullWidth(),
		progressbar.OptionSetRenderBlankState(true),
	)
}

// transfer runs fn with the update of a progress bar on stderr (see
// progress) and says how long it took.
func transfer(cmd *cobra.Command, quiet bool, desc string, fn func(update func(done, total uint64)) error) (time.Duration, error) {
	update, finish := progress(cmd.ErrOrStderr(), quiet, desc)
	start := time.Now()
	err := fn(update)
	finish(err)
	return time.Since(start).Round(time.Millisecond), err
}
