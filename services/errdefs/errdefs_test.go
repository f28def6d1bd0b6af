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
