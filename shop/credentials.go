package shop

import (
	"fmt"
	"strings"
	"time"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/auth"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Task credentials (issue 15 item 1): a plant stages an owner's files with
// a credential the shop signs for that owner and one task (or VM request),
// valid for a while, and presents it only to the data server the grid
// configured it with. Credentials go into the request to the plant and
// nowhere else: never logged, never in an etcd record.

// credentialTTL bounds a credential: it covers a creation, stage-in
// included (the shop's create deadline is longer only for slow boots), or
// one stage-out.
const credentialTTL = 30 * time.Minute

// dataCredential mints the credential a plant stages in with for rec (the
// VM of a task has the task's id as its request id); none when the
// configuration does not stage in.
func (c Config) dataCredential(rec *record, dag *computev1.ConfigDAG) (string, error) {
	if !stagesIn(dag.GetActions()) {
		return "", nil
	}
	return c.mint(rec.Owner, rec.RequestID)
}

// mint signs a credential for owner's task.
func (c Config) mint(owner, task string) (string, error) {
	if len(c.TaskKey) == 0 {
		return "", fmt.Errorf("this shop has no task key (--task-key), so it cannot stage files: %w", errdefs.ErrFailedPrecondition)
	}
	return c.TaskKey.MintTask(owner, task, credentialTTL)
}

// stagesIn reports whether actions or their error handlers stage in.
func stagesIn(actions []*computev1.Action) bool {
	for _, a := range actions {
		if a.GetStageIn() != nil || stagesIn(a.GetOnError()) {
			return true
		}
	}
	return false
}

// checkOutputPrefix refuses a task output prefix outside the task's own
// (auth.TaskOutputPrefix): the credential the plant stages out with may
// write nowhere else, so a task aimed elsewhere could only fail at its end.
func checkOutputPrefix(id, prefix string) error {
	if prefix == "" {
		return nil
	}
	own := auth.TaskOutputPrefix(id)
	if !strings.HasPrefix(strings.TrimSuffix(prefix, "/")+"/", own) || strings.Contains(prefix, "..") {
		return fmt.Errorf("output_prefix %q: a task writes only under %s: %w", prefix, own, errdefs.ErrInvalidArgument)
	}
	return nil
}
