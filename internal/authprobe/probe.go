// Package authprobe calls every RPC of a server the way an outsider would —
// with no token, a wrong one, or one of a role the method does not admit —
// and reports which calls got in. Tests of every role use it to show that
// no RPC answers anything but Unauthenticated or PermissionDenied to them.
package authprobe

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Result of probing a set of methods.
type Result struct {
	Total   int
	Refused int
	// Admitted names the methods that answered something other than the
	// wanted codes, with what they answered.
	Admitted []string
}

// Probe calls every method of every service in descs on cc with the given
// authorization header value ("" sends none) and counts the calls refused
// with one of want. The request is an empty message: a refused call never
// gets to read it, an admitted one fails validation (still admitted). Each
// call is bounded by timeout.
func Probe(ctx context.Context, cc *grpc.ClientConn, authorization string, want []codes.Code, timeout time.Duration, descs ...grpc.ServiceDesc) Result {
	var r Result
	for _, sd := range descs {
		for _, m := range sd.Methods {
			r.add(fmt.Sprintf("/%s/%s", sd.ServiceName, m.MethodName), want, func(ctx context.Context, method string) error {
				return cc.Invoke(ctx, method, &emptypb.Empty{}, &emptypb.Empty{})
			}, ctx, authorization, timeout)
		}
		for _, s := range sd.Streams {
			desc := &grpc.StreamDesc{StreamName: s.StreamName, ServerStreams: s.ServerStreams, ClientStreams: s.ClientStreams}
			r.add(fmt.Sprintf("/%s/%s", sd.ServiceName, s.StreamName), want, func(ctx context.Context, method string) error {
				st, err := cc.NewStream(ctx, desc, method)
				if err != nil {
					return err
				}
				if err := st.SendMsg(&emptypb.Empty{}); err != nil {
					return st.RecvMsg(&emptypb.Empty{})
				}
				_ = st.CloseSend()
				return st.RecvMsg(&emptypb.Empty{})
			}, ctx, authorization, timeout)
		}
	}
	return r
}

func (r *Result) add(method string, want []codes.Code, call func(context.Context, string) error, ctx context.Context, authorization string, timeout time.Duration) {
	r.Total++
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if authorization != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", authorization)
	}
	code := status.Code(call(ctx, method))
	for _, w := range want {
		if code == w {
			r.Refused++
			return
		}
	}
	r.Admitted = append(r.Admitted, fmt.Sprintf("%s answered %s", method, code))
}
