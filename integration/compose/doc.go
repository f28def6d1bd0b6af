// Package compose holds the fault tests across containers: a compose grid
// of its own (deploy/compose.yaml: three etcd members, image server, data
// server, cache proxy, two shops, three plants, all over mutual TLS) is
// brought up once for the suite (project vmgrid-ct-RANDOM) and faults are
// done to its containers: a plant killed, etcd members stopped, a plant cut
// off its network, a shop killed mid-create. Each test ends with nothing of
// its own left (VMs, QEMU processes, containers); the suite ends with the
// project gone (containers, network, volumes) and dockerd stopped when the
// suite started it.
//
// The tests are behind the build tag compose (make compose-test): they
// need root, Docker (deploy/packages.txt) and the local images, which
// TestMain builds (deploy/compose/images.sh, cached).
package compose
