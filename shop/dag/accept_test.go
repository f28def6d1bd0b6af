package dag

import (
	"testing"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// TestAcceptNamedImage: an image the request names accepts actions the
// request does not list (where Match's subset test refuses it) and still
// skips the ones both have.
func TestAcceptNamedImage(t *testing.T) {
	acts := []*computev1.Action{execA("a"), execA("b", "a")}
	dg, _ := digests(acts)
	other, _ := digests([]*computev1.Action{execA("built-with")})
	p, err := New(&computev1.ConfigDAG{Actions: acts})
	if err != nil {
		t.Fatal(err)
	}
	performed := []string{other["built-with"], dg["a"]}
	if _, err := p.Match(performed); err == nil {
		t.Fatal("Match accepted an image with an action the request does not ask for")
	}
	got := p.Accept(performed)
	if todo := got.Todo(); len(todo) != 1 || todo[0].Action.Id != "b" {
		t.Fatalf("todo %+v, want b only", todo)
	}
	if p.Steps[0].Done {
		t.Fatal("Accept changed the plan it was called on")
	}
	if todo := p.Accept(nil).Todo(); len(todo) != 2 {
		t.Fatalf("nothing performed: todo %d", len(todo))
	}
}
