// Package datav1 is the data server's API (vmgrid.data.v1): the per-owner
// file repository of Goiri et al. (upload, download, list, stat, delete,
// grants) that task stage-in and stage-out use. The *.pb.go files are
// generated (make proto); validate.go holds the hand-written Validate
// methods and the path rules.
package datav1
