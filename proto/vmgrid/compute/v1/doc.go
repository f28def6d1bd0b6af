// Package computev1 is the compute server's API (vmgrid.compute.v1): the
// plant's PlantService (create, get, list, destroy, suspend, resume, exec,
// stage-out of VMs; called by the shop and operators) and the CacheService
// of its data plane (flush, stats, drop caches). The *.pb.go files are
// generated from the .proto files beside them (make proto); validate.go
// holds the hand-written Validate methods the servers' validator
// interceptor calls before any handler runs.
package computev1
