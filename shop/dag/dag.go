// Package dag is the configuration DAG of VMPlants (§3.1–3.2), the request
// model the shop matches and the plant runs: New derives a request's Plan
// once (validation, topological order, action identity), Plan.Match marks
// what a golden image has already performed.
//
// # Identity
//
// An action's digest is the SHA-256 of its kind and definition (its id,
// edges and error handlers excluded) and of its predecessors' digests, in
// the manner of build-cache keys: two requests that ask for the same action
// after the same history share a digest, whatever they call it, so a golden
// image built by one request matches the next.
//
// # Matching
//
// A golden image matches a DAG when the actions performed on it pass the
// paper's three tests: subset (every performed action is required by the
// DAG), prefix (an action is performed only with all its predecessors) and
// partial order (performed actions appear in an order the DAG allows). The
// actions left to run are the DAG's others, in topological order.
package dag

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"sort"

	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// MaxActions bounds a DAG (and each error handler).
const MaxActions = 256

// Kind names an action's kind ("exec", "write_file", ...), "" if unset.
func Kind(a *computev1.Action) string {
	switch a.Kind.(type) {
	case *computev1.Action_Exec:
		return "exec"
	case *computev1.Action_WriteFile:
		return "write_file"
	case *computev1.Action_SetHostname:
		return "set_hostname"
	case *computev1.Action_AddUser:
		return "add_user"
	case *computev1.Action_Mount:
		return "mount"
	case *computev1.Action_AttachDisk:
		return "attach_disk"
	case *computev1.Action_StageIn:
		return "stage_in"
	}
	return ""
}

// IsHost reports whether an action runs on the plant rather than in the
// guest.
func IsHost(a *computev1.Action) bool { k := Kind(a); return k == "attach_disk" || k == "stage_in" }

// Plan is a configuration DAG derived once: validated, its actions in
// topological order, each with its identity. The shop matches it against
// golden images and the plant runs it, so one request derives it once per
// process.
type Plan struct {
	Steps []Step
}

// Step is one action of a plan.
type Step struct {
	Action *computev1.Action
	Kind   string
	Digest string
	// Done: the golden image has performed it (set by Match).
	Done bool
	// OnError is the plan of the action's error handlers, nil if none.
	OnError *Plan
}

// New validates a DAG (unique ids, known kinds, edges to existing actions,
// no cycles, valid error handlers; errors name the node at fault) and
// returns its plan, nothing done. A nil DAG is an empty plan.
func New(d *computev1.ConfigDAG) (*Plan, error) {
	return plan(d.GetActions(), "")
}

// Todo returns the steps the golden image has not performed, in order.
func (p *Plan) Todo() []Step {
	var out []Step
	for _, s := range p.Steps {
		if !s.Done {
			out = append(out, s)
		}
	}
	return out
}

func plan(actions []*computev1.Action, where string) (*Plan, error) {
	if err := check(actions, where); err != nil {
		return nil, err
	}
	ordered, err := order(actions)
	if err != nil {
		return nil, fmt.Errorf("%s%w", where, err)
	}
	digests, err := digestsOf(ordered)
	if err != nil {
		return nil, err
	}
	p := &Plan{Steps: make([]Step, 0, len(ordered))}
	for _, a := range ordered {
		s := Step{Action: a, Kind: Kind(a), Digest: digests[a.Id]}
		if len(a.OnError) > 0 {
			if s.OnError, err = plan(a.OnError, fmt.Sprintf("%saction %q on_error: ", where, a.Id)); err != nil {
				return nil, err
			}
		}
		p.Steps = append(p.Steps, s)
	}
	return p, nil
}

// check tests ids, kinds and edges of one level of a DAG.
func check(actions []*computev1.Action, where string) error {
	if len(actions) > MaxActions {
		return fmt.Errorf("%s%d actions; the limit is %d", where, len(actions), MaxActions)
	}
	ids := map[string]bool{}
	for i, a := range actions {
		if a.Id == "" {
			return fmt.Errorf("%sactions[%d]: id is required", where, i)
		}
		if err := imagev1.ValidateName(fmt.Sprintf("%saction id", where), a.Id); err != nil {
			return err
		}
		if ids[a.Id] {
			return fmt.Errorf("%saction %q: the id appears twice", where, a.Id)
		}
		ids[a.Id] = true
		if err := validateKind(a); err != nil {
			return fmt.Errorf("%saction %q: %w", where, a.Id, err)
		}
	}
	for _, a := range actions {
		for _, p := range a.After {
			if !ids[p] {
				return fmt.Errorf("%saction %q: edge from %q, which is not an action of this DAG", where, a.Id, p)
			}
			if p == a.Id {
				return fmt.Errorf("%saction %q: depends on itself", where, a.Id)
			}
		}
	}
	return nil
}

// validateInputs checks a stage_in's files before any VM boots: valid
// paths, and none both a file and a directory.
func validateInputs(files []string) error {
	set := make(map[string]bool, len(files))
	for _, f := range files {
		if err := datav1.ValidatePath("stage_in file", f); err != nil {
			return err
		}
		set[f] = true
	}
	for f := range set {
		for d := path.Dir(f); d != "."; d = path.Dir(d) {
			if set[d] {
				return fmt.Errorf("stage_in files %q and %q: a path cannot be both a file and a directory", d, f)
			}
		}
	}
	return nil
}

func validateKind(a *computev1.Action) error {
	switch k := a.Kind.(type) {
	case nil:
		return errors.New("no action kind set (want one of exec, write_file, set_hostname, add_user, mount, attach_disk, stage_in)")
	case *computev1.Action_Exec:
		if len(k.Exec.Argv) == 0 {
			return errors.New("exec needs argv")
		}
	case *computev1.Action_WriteFile:
		if len(k.WriteFile.Path) == 0 || k.WriteFile.Path[0] != '/' {
			return fmt.Errorf("write_file needs an absolute path, got %q", k.WriteFile.Path)
		}
		if len(k.WriteFile.Content) > 16<<20 {
			return errors.New("write_file content is limited to 16 MiB")
		}
	case *computev1.Action_SetHostname:
		if err := imagev1.ValidateName("hostname", k.SetHostname.Hostname); err != nil {
			return err
		}
	case *computev1.Action_AddUser:
		if err := imagev1.ValidateName("user", k.AddUser.User); err != nil {
			return err
		}
	case *computev1.Action_Mount:
		if k.Mount.Device == "" || len(k.Mount.Path) == 0 || k.Mount.Path[0] != '/' {
			return errors.New("mount needs a device and an absolute path")
		}
	case *computev1.Action_AttachDisk:
		if err := imagev1.ValidateName("disk name", k.AttachDisk.Name); err != nil {
			return err
		}
		if k.AttachDisk.SizeMib == 0 || k.AttachDisk.SizeMib > 1<<20 {
			return fmt.Errorf("attach_disk size %d MiB: want 1..1048576", k.AttachDisk.SizeMib)
		}
	case *computev1.Action_StageIn:
		if k.StageIn.Dataserver != "" { //nolint:staticcheck // read only to refuse it
			return computev1.ErrStageInDataserver
		}
		if p := k.StageIn.MountPath; p != "" && p[0] != '/' {
			return fmt.Errorf("stage_in mount_path %q is not absolute", p)
		}
		if k.StageIn.SizeMib > 1<<20 {
			return fmt.Errorf("stage_in size %d MiB: at most 1048576", k.StageIn.SizeMib)
		}
		return validateInputs(k.StageIn.Files)
	default:
		return fmt.Errorf("unknown action kind %T", k)
	}
	return nil
}

// order returns the actions in a topological order, keeping the given order
// among independent actions. A cycle is an error naming an action on it.
func order(actions []*computev1.Action) ([]*computev1.Action, error) {
	index := map[string]int{}
	for i, a := range actions {
		index[a.Id] = i
	}
	indeg := make([]int, len(actions))
	next := make([][]int, len(actions))
	for i, a := range actions {
		for _, p := range a.After {
			j, ok := index[p]
			if !ok {
				return nil, fmt.Errorf("action %q: edge from unknown action %q", a.Id, p)
			}
			indeg[i]++
			next[j] = append(next[j], i)
		}
	}
	var ready []int
	for i := range actions {
		if indeg[i] == 0 {
			ready = append(ready, i)
		}
	}
	out := make([]*computev1.Action, 0, len(actions))
	for len(ready) > 0 {
		sort.Ints(ready)
		i := ready[0]
		ready = ready[1:]
		out = append(out, actions[i])
		for _, j := range next[i] {
			if indeg[j]--; indeg[j] == 0 {
				ready = append(ready, j)
			}
		}
	}
	if len(out) != len(actions) {
		for i, d := range indeg {
			if d > 0 {
				return nil, fmt.Errorf("action %q is on a cycle", actions[i].Id)
			}
		}
	}
	return out, nil
}

// digestsOf returns every action's identity (see the package doc); the
// actions are in topological order.
func digestsOf(ordered []*computev1.Action) (map[string]string, error) {
	out := make(map[string]string, len(ordered))
	for _, a := range ordered {
		def := proto.Clone(a).(*computev1.Action)
		def.Id, def.After, def.OnError = "", nil, nil
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(def)
		if err != nil {
			return nil, err
		}
		preds := make([]string, 0, len(a.After))
		for _, p := range a.After {
			preds = append(preds, out[p])
		}
		sort.Strings(preds)
		h := sha256.New()
		fmt.Fprintf(h, "vmgrid-action-v1\x00%s\x00", Kind(a))
		h.Write(b)
		for _, p := range preds {
			fmt.Fprintf(h, "\x00%s", p)
		}
		out[a.Id] = "sha256:" + hex.EncodeToString(h.Sum(nil))
	}
	return out, nil
}

// Match tests a golden image's performed actions (digests, in the order
// they were performed) against the plan. It returns a copy of the plan
// whose performed steps are Done, or why the image does not match.
func (p *Plan) Match(performed []string) (*Plan, error) {
	byDigest := map[string]*computev1.Action{}
	for _, s := range p.Steps {
		byDigest[s.Digest] = s.Action
	}
	done := map[string]bool{}
	for pos, d := range performed {
		a := byDigest[d]
		if a == nil {
			return nil, fmt.Errorf("subset test: the image has performed an action (%s) the request does not ask for", short(d))
		}
		if done[a.Id] {
			return nil, fmt.Errorf("the image lists action %q twice", a.Id)
		}
		for _, pred := range a.After {
			if done[pred] {
				continue
			}
			// Either never performed (prefix) or performed later (order).
			for _, later := range performed[pos+1:] {
				if b := byDigest[later]; b != nil && b.Id == pred {
					return nil, fmt.Errorf("partial order test: the image performed %q before %q, the request wants %q first", a.Id, pred, pred)
				}
			}
			return nil, fmt.Errorf("prefix test: the image performed %q without its predecessor %q", a.Id, pred)
		}
		done[a.Id] = true
	}
	out := &Plan{Steps: append([]Step(nil), p.Steps...)}
	for i := range out.Steps {
		out.Steps[i].Done = done[out.Steps[i].Action.Id]
	}
	return out, nil
}

func short(d string) string {
	if len(d) > 19 {
		return d[:19] + "…"
	}
	return d
}
