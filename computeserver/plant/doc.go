// Package plant is the production line of a compute server (VMPlants §4.1,
// GVFS §3.2.3): it turns a golden image into a running, configured VM.
//
// A clone gets its own directory holding a qcow2 redo log whose backing
// file is the golden disk on the FUSE view (nothing is copied), the QEMU
// sockets and its console log. Its memory state is read through the FUSE
// view when QEMU restores it. Then the guest agent sets the clock and runs
// the configuration actions the golden image has not performed, in
// topological order; the result is a classad.
//
// # The production line
//
// CreateVM derives the request's configuration DAG once (dag.New), matches
// it against the golden image's performed actions and sends it down the
// production line (line.go), a list of named steps with one undo stack:
// prepare, redo log, restore (or boot), agent, clock, actions, finish. A
// step that fails undoes the ones before it. The actions run on a runner
// (runner.go) that golden builds (BuildGolden) share.
//
// A persistent VM boots from a persistent disk (read-write on the FUSE view,
// written back to the image server); SuspendVM publishes its memory state as
// an image so ResumeVM can bring it back on any plant (GVFS scenario 1).
//
// # Staging
//
// A stage_in action builds a data disk from the owner's files (package
// datadisk) and StageOut copies its out/ back. Both talk to the data server
// of the plant's configuration (Config.DataServer) and nowhere else, with
// the task credential the request brings (data_credential, minted by the
// shop for one owner and one task): a request cannot choose where the
// plant sends credentials, and the plant has no key to every owner's files.
// The credential stays in memory, never in classad.json or a log.
package plant
