// Package integration tests vmgrid's services together, as real servers:
// image servers, compute servers with their FUSE views, data servers and
// shops over a real embedded etcd, talking gRPC on loopback. Slow
// benchmarks live in integration/clonebench; the fault-injection suite
// against real processes in integration/faults (make faults).
package integration
