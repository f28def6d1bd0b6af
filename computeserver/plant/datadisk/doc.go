// Package datadisk is the data disk a plant attaches to a VM (Goiri §3):
// Build makes an ext4 image (mkfs.ext4 -d) holding a task's inputs as
// in/PATH and an empty world-writable out/; StageOut reads out/ back from
// the image without mounting it (debugfs) and uploads what the task left.
// Both run on the plant, next to the VM's files; the data server is only
// reached through its client.
//
// The guest controls that image, so stage-out never builds a host path
// from a name in it.
package datadisk
