package dag

import (
	"strings"
	"testing"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

func execA(id string, after ...string) *computev1.Action {
	return &computev1.Action{Id: id, After: after, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"echo", id}}}}
}

func stageIn(id string, files ...string) *computev1.Action {
	return &computev1.Action{Id: id, Kind: &computev1.Action_StageIn{StageIn: &computev1.StageInAction{Files: files}}}
}

func TestValidateNamesTheNode(t *testing.T) {
	cases := []struct {
		dag  []*computev1.Action
		want string
	}{
		{[]*computev1.Action{execA("a", "b"), execA("b", "a")}, "cycle"},
		{[]*computev1.Action{execA("a", "ghost")}, `action "a": edge from "ghost"`},
		{[]*computev1.Action{{Id: "x"}}, `action "x": no action kind`},
		{[]*computev1.Action{execA("a"), execA("a")}, `"a": the id appears twice`},
		{[]*computev1.Action{execA("a", "a")}, "depends on itself"},
		{[]*computev1.Action{{Id: "w", Kind: &computev1.Action_WriteFile{WriteFile: &computev1.WriteFileAction{Path: "rel"}}}}, "absolute path"},
		{[]*computev1.Action{{Id: "a", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"false"}}}, OnError: []*computev1.Action{execA("h", "nope")}}}, `on_error: action "h"`},
		// Issue 15 item 10: inputs are checked before a VM boots.
		{[]*computev1.Action{stageIn("s", "../etc/passwd")}, `action "s": stage_in file`},
		{[]*computev1.Action{stageIn("s", "job/a", "job/a/b")}, "both a file and a directory"},
	}
	for _, c := range cases {
		_, err := New(&computev1.ConfigDAG{Actions: c.dag})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate: got %v, want it to mention %q", err, c.want)
		}
	}
	if _, err := New(&computev1.ConfigDAG{Actions: []*computev1.Action{execA("a"), execA("b", "a"), execA("c", "a"), execA("d", "b", "c")}}); err != nil {
		t.Fatal(err)
	}
}

func TestOrderIsTopologicalAndStable(t *testing.T) {
	acts := []*computev1.Action{execA("d", "b", "c"), execA("c", "a"), execA("b", "a"), execA("a")}
	got, err := order(acts)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, a := range got {
		ids = append(ids, a.Id)
	}
	if strings.Join(ids, ",") != "a,c,b,d" {
		t.Fatalf("order %v", ids)
	}
}

func TestDigestsIgnoreNamesButNotHistory(t *testing.T) {
	d1, _ := digests([]*computev1.Action{execA("a"), execA("b", "a")})
	// Same definitions, other ids: same identities.
	x := execA("x")
	y := &computev1.Action{Id: "y", After: []string{"x"}, Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"echo", "b"}}}}
	x.Kind = &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"echo", "a"}}}
	d2, _ := digests([]*computev1.Action{x, y})
	if d1["a"] != d2["x"] || d1["b"] != d2["y"] {
		t.Fatalf("equal actions must share digests: %v %v", d1, d2)
	}
	// Same definition without the predecessor: another identity.
	alone := &computev1.Action{Id: "b", Kind: &computev1.Action_Exec{Exec: &computev1.ExecAction{Argv: []string{"echo", "b"}}}}
	d3, _ := digests([]*computev1.Action{alone})
	if d3["b"] == d1["b"] {
		t.Fatal("history must be part of the identity")
	}
}

func TestMatchSubsetPrefixPartialOrder(t *testing.T) {
	acts := []*computev1.Action{execA("a"), execA("b", "a"), execA("c", "a"), execA("d", "b", "c")}
	dg, _ := digests(acts)
	ids := func(as []*computev1.Action) string {
		var s []string
		for _, a := range as {
			s = append(s, a.Id)
		}
		return strings.Join(s, ",")
	}
	Match := func(acts []*computev1.Action, performed []string) ([]*computev1.Action, error) {
		p, err := New(&computev1.ConfigDAG{Actions: acts})
		if err != nil {
			return nil, err
		}
		if p, err = p.Match(performed); err != nil {
			return nil, err
		}
		var rest []*computev1.Action
		for _, s := range p.Todo() {
			rest = append(rest, s.Action)
		}
		return rest, nil
	}
	rest, err := Match(acts, []string{dg["a"], dg["c"]})
	if err != nil || ids(rest) != "b,d" {
		t.Fatalf("a,c performed: rest %v err %v", ids(rest), err)
	}
	if rest, err := Match(acts, nil); err != nil || len(rest) != 4 {
		t.Fatalf("nothing performed: %v %v", rest, err)
	}
	other, _ := digests([]*computev1.Action{execA("zz")})
	if _, err := Match(acts, []string{dg["a"], other["zz"]}); err == nil || !strings.Contains(err.Error(), "subset") {
		t.Fatalf("subset: %v", err)
	}
	if _, err := Match(acts, []string{dg["b"]}); err == nil || !strings.Contains(err.Error(), "prefix") {
		t.Fatalf("prefix: %v", err)
	}
	if _, err := Match(acts, []string{dg["b"], dg["a"]}); err == nil || !strings.Contains(err.Error(), "partial order") {
		t.Fatalf("partial order: %v", err)
	}
}

// digests is the identities of a DAG's actions, as New derives them.
func digests(actions []*computev1.Action) (map[string]string, error) {
	ordered, err := order(actions)
	if err != nil {
		return nil, err
	}
	return digestsOf(ordered)
}
