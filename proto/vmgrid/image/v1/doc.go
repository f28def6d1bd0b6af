// Package imagev1 is the image server's API (vmgrid.image.v1): the
// warehouse of golden images and persistent disks with their per-file
// meta-data, block reads, the whole-file compressed channel and
// write-back. The *.pb.go files are generated (make proto); validate.go
// holds the hand-written Validate methods and the name rules every service
// shares.
package imagev1
