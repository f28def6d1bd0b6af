package errdefs

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestRoundTrip(t *testing.T) {
	for _, m := range toCode {
		err := fmt.Errorf("image %q: %w", "x", m.err)
		g := ToGRPC(err)
		st, _ := status.FromError(g)
		if st.Code() != m.code {
			t.Fatalf("%v: code %v, want %v", m.err, st.Code(), m.code)
		}
		if want := `image "x"`; st.Message() != want {
			t.Fatalf("message %q, want %q", st.Message(), want)
		}
		back := FromGRPC(g)
		if !errors.Is(back, m.err) {
			t.Fatalf("FromGRPC(%v) does not wrap %v", g, m.err)
		}
		if Code(back) != m.code {
			t.Fatalf("Code(back)=%v", Code(back))
		}
	}
}

func TestUnknownAndPassthrough(t *testing.T) {
	if Code(errors.New("boom")) != codes.Unknown {
		t.Fatal("plain error should be Unknown")
	}
	s := status.Error(codes.Unavailable, "down")
	if ToGRPC(s) != s {
		t.Fatal("status errors must pass through")
	}
	if !IsUnavailable(FromGRPC(s)) {
		t.Fatal("Unavailable lost")
	}
	if Code(context.Canceled) != codes.Canceled {
		t.Fatal("context.Canceled")
	}
}

func TestInvalidArgumentNamesItsField(t *testing.T) {
	err := ToGRPC(fmt.Errorf("config.actions[2].exec.command: is empty: %w", ErrInvalidArgument))
	if got := FieldViolations(err); len(got) != 1 || got[0] != "config.actions[2].exec.command" {
		t.Fatalf("field violations %v of %v", got, err)
	}
	if st, _ := status.FromError(err); st.Message() != "config.actions[2].exec.command: is empty" {
		t.Fatalf("message %q", st.Message())
	}
	// A status that already is one gets its details too; other codes and
	// messages without a field get none.
	if got := FieldViolations(ToGRPC(status.Error(codes.InvalidArgument, "request_id: too long"))); len(got) != 1 || got[0] != "request_id" {
		t.Fatalf("from a status: %v", got)
	}
	if got := FieldViolations(ToGRPC(fmt.Errorf("vm x: %w", ErrNotFound))); got != nil {
		t.Fatalf("NotFound: %v", got)
	}
	if got := FieldViolations(ToGRPC(fmt.Errorf(`request_id "a b" is not allowed: %w`, ErrInvalidArgument))); len(got) != 1 || got[0] != "request_id" {
		t.Fatalf("a quoted value: %v", got)
	}
	if got := FieldViolations(ToGRPC(fmt.Errorf("Something is off: %w", ErrInvalidArgument))); got != nil {
		t.Fatalf("no field: %v", got)
	}
}
