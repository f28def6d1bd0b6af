// Package shopv1 is the shop's API (vmgrid.shop.v1), the single logical
// point of contact of VMPlants: VMs (create by auction, get, list, watch,
// destroy) and tasks (submit, get, watch, cancel). The *.pb.go files are
// generated (make proto); validate.go holds the hand-written Validate
// methods with the size limits that keep every accepted request
// recordable.
package shopv1
