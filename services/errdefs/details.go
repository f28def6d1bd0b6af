package errdefs

import (
	"regexp"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fieldPrefix is how the Validate methods name what they refuse: the
// field's path first, then a colon or what is wrong with it
// ("config.actions[2].exec.command: …", "request_id \"x\" is not allowed…",
// "files[0].kind is 99…", "labels has 100 entries…").
var fieldPrefix = regexp.MustCompile(`^([a-z_][a-z0-9_]*(?:\[[0-9]+\])?(?:\.[a-z_][a-z0-9_]*(?:\[[0-9]+\])?)*)(?:: | (?:is|has|must) | ")`)

// withDetails adds the structured details a client can act on: an
// InvalidArgument whose message names a field gets a google.rpc.BadRequest
// with that field's violation. A status that has details keeps them.
func withDetails(st *status.Status) *status.Status {
	if st.Code() != codes.InvalidArgument || len(st.Details()) > 0 {
		return st
	}
	m := fieldPrefix.FindStringSubmatch(st.Message())
	if m == nil {
		return st
	}
	d, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
		{Field: m[1], Description: st.Message()},
	}})
	if err != nil {
		return st
	}
	return d
}

// FieldViolations returns the fields a status error's BadRequest details
// name (nil when it has none).
func FieldViolations(err error) []string {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	var out []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out = append(out, v.GetField())
			}
		}
	}
	return out
}
