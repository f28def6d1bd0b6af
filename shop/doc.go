// Package shop is the VMShop (VMPlants §3): the single logical point of
// contact. A request is matched against the warehouse (subset, prefix and
// partial-order tests on the golden images' performed actions), placed by
// an auction among the plants (package market), created by the winner, and
// its classad kept in etcd. The shop keeps no state of its own, so any
// number of shops can run and a restarted shop answers as before.
//
// # Layout
//
// As containerd's services: service.go is the gRPC adapter (Shop), over the
// logic (vms.go: create, look up, destroy; match.go; tasks.go, a task as
// named steps), over a store (store.go: VM, request and task records in
// etcd behind vmStore and taskStore). plants.go is the pool of plant
// connections, lost.go the handling of VMs whose plant is gone, metrics.go
// the shop's metrics, config.go its settings and flags. dashboard.go is the
// shop as the source of its HTTP side (package web: the HTTP/JSON API, the
// events stream and the dashboard on --http-listen).
//
// # Idempotency
//
// A request id names a VM for its owner: the VM id is derived from (owner,
// request id), and an etcd transaction records the request (with a hash of
// it) before any plant is asked, so a retried CreateVM — to this shop or
// another — returns the same VM, and a different request under a used id is
// refused (AlreadyExists). The winner is recorded before it is asked to
// create, and a plant creates a VM id only once, so a retry after a crash
// never makes a second VM. A request that failed for a passing reason (etcd
// or the plants unreachable, no plant free) can be retried with the same id;
// the records of failed requests expire (Config.FailedTTL), and a destroyed
// VM's request record goes with it.
//
// # Outages and lost plants
//
// Every etcd call has a deadline (market.OpTimeout) and fails as
// Unavailable; the lease the shop's claims hang off is granted anew after an
// outage. A VM whose plant's registration is gone (its lease lapsed: the
// plant died or lost etcd) is LOST; destroying it removes its record at once
// and leaves an order that a shop carries out when the plant is back.
package shop
