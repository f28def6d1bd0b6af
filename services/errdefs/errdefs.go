// Package errdefs defines the domain errors every vmgrid service uses and maps
// them to gRPC status codes in one place (ToGRPC) and back (FromGRPC), so that
// errdefs.IsNotFound(err) works on both sides of a network hop.
//
// Wrap a sentinel to add context: fmt.Errorf("image %q: %w", name, errdefs.ErrNotFound).
// The message of the wrapped error becomes the gRPC status message.
package errdefs

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel domain errors.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	ErrUnavailable        = errors.New("unavailable")
	ErrOutOfRange         = errors.New("out of range")
	ErrDataLoss           = errors.New("data loss")
	ErrAborted            = errors.New("aborted")
	ErrInternal           = errors.New("internal")
)

var toCode = []struct {
	err  error
	code codes.Code
}{
	{ErrInvalidArgument, codes.InvalidArgument},
	{ErrNotFound, codes.NotFound},
	{ErrAlreadyExists, codes.AlreadyExists},
	{ErrPermissionDenied, codes.PermissionDenied},
	{ErrUnauthenticated, codes.Unauthenticated},
	{ErrFailedPrecondition, codes.FailedPrecondition},
	{ErrResourceExhausted, codes.ResourceExhausted},
	{ErrUnavailable, codes.Unavailable},
	{ErrOutOfRange, codes.OutOfRange},
	{ErrDataLoss, codes.DataLoss},
	{ErrAborted, codes.Aborted},
	{ErrInternal, codes.Internal},
	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
}

// Code returns the gRPC code for err: the code of a gRPC status it already
// carries, else the code of the first sentinel it wraps, else Unknown.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	for _, m := range toCode {
		if errors.Is(err, m.err) {
			return m.code
		}
	}
	return codes.Unknown
}

// ToGRPC turns a domain error into a gRPC status error. Errors that already
// are gRPC status errors keep their code and message. An InvalidArgument
// that names a field gets a google.rpc.BadRequest detail for it.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return withDetails(status.New(Code(err), message(err))).Err()
	}
	if d := withDetails(st); d != st {
		return d.Err()
	}
	return err
}

// message is err's text without the trailing ": not found" that wrapping a
// sentinel adds: the code already says it.
func message(err error) string {
	msg := err.Error()
	for _, m := range toCode {
		if errors.Is(err, m.err) {
			if trimmed, ok := strings.CutSuffix(msg, ": "+m.err.Error()); ok && trimmed != "" {
				return trimmed
			}
		}
	}
	return msg
}

// FromGRPC turns a gRPC status error back into an error that wraps the
// matching sentinel, keeping the server's message.
func FromGRPC(err error) error {
	if err == nil {
		return nil
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	for _, m := range toCode {
		if m.code == s.Code() {
			return &remoteError{msg: s.Message(), sentinel: m.err, st: s}
		}
	}
	return err
}

// remoteError keeps the status (so status.FromError still works) and the
// sentinel (so errors.Is works).
type remoteError struct {
	msg      string
	sentinel error
	st       *status.Status
}

func (e *remoteError) Error() string              { return e.msg }
func (e *remoteError) Unwrap() error              { return e.sentinel }
func (e *remoteError) GRPCStatus() *status.Status { return e.st }

// IsNotFound and friends test for a sentinel on either side of a network hop.
func IsNotFound(err error) bool           { return errors.Is(err, ErrNotFound) }
func IsAlreadyExists(err error) bool      { return errors.Is(err, ErrAlreadyExists) }
func IsInvalidArgument(err error) bool    { return errors.Is(err, ErrInvalidArgument) }
func IsPermissionDenied(err error) bool   { return errors.Is(err, ErrPermissionDenied) }
func IsFailedPrecondition(err error) bool { return errors.Is(err, ErrFailedPrecondition) }
func IsOutOfRange(err error) bool         { return errors.Is(err, ErrOutOfRange) }
func IsUnavailable(err error) bool        { return errors.Is(err, ErrUnavailable) }

// IsUnauthenticated reports a call without valid credentials.
func IsUnauthenticated(err error) bool { return errors.Is(err, ErrUnauthenticated) }
