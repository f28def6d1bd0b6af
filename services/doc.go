// Package services holds what every vmgrid service shares, written once: the
// gRPC server bootstrap (interceptor chain, health, reflection, metrics,
// TLS, graceful shutdown), the client dialer, and the zap adapter for the
// go-grpc-middleware logging interceptor.
//
// # Errors
//
// Handlers return domain errors (package errdefs); one interceptor turns
// them into gRPC status errors, and the client interceptors installed by
// Dial turn them back, so errdefs.IsNotFound works across the wire.
//
// # Validation
//
// Every request message has a hand-written Validate() error method next to
// its generated code; the validator interceptor calls it for unary requests
// and for every message received on a stream, answering InvalidArgument with
// the method's message.
//
// # Shutdown
//
// Server.Shutdown first reports NOT_SERVING through grpc.health.v1 (so load
// balancers drain), then GracefulStop waits for running calls up to
// Options.ShutdownTimeout and Stop cuts what is left.
package services
