// Package dataserver is the data repository of Goiri et al. §3: clients
// upload the input files of their tasks and download the outputs, and the
// compute plants stage inputs into a VM's data disk and outputs back out.
//
// # Owners and namespace
//
// Every file has an owner: the owner of the bearer token of the call that
// stored it (package services/auth). A file is addressed by (owner, path);
// the owner is implicit, the caller's. Requests carry an optional owner
// field that may name someone else only for reads (Stat, Download, List),
// and only under a path prefix that owner granted the caller (Grant,
// Revoke); every other use of another owner's namespace is
// PermissionDenied, whether the file exists or not, and List never shows a
// file the caller may not read. This is the paper's "simple check about
// the owner" (their §7 names it the weakest link) made explicit: tokens
// per user, TLS between services, grants instead of shared accounts.
//
// Plants do not have a token of their own here: they present a task
// credential the shop minted for one owner and one task (auth.MintTask,
// checked with --task-key). It reads that owner's files only (not what
// others granted the owner), uploads only under tasks/TASK/
// (auth.TaskOutputPrefix), and may not delete or grant (auth.DataPolicy).
// Service tokens are refused: nothing acts for every owner.
//
// Paths are validated (datav1.ValidatePath): relative, slash-separated,
// components of [A-Za-z0-9._-] other than "." and "..". A path is a file and
// its leading components are directories, as on the data disk built from
// them, so "a" and "a/b" cannot both be files (FailedPrecondition).
//
// # Storage
//
// Files live under DIR/owners/HH/OWNER/files/PATH (HH shards owners by a
// hash of their name). An upload is written to DIR/tmp, checked against the
// size and SHA-256 the client commits (DataLoss when they differ), given
// its digest as an extended attribute, fsynced, and renamed into place;
// new directories and the parent are fsynced too. An upload that does not
// commit leaves nothing visible; DIR/tmp is emptied when the store opens.
// Files are never changed in place, so a download reads one version even
// while the path is replaced or deleted.
//
// # Transfers
//
// Upload is one client stream (header, data in order, commit); Download is
// a server stream of a byte range, so a broken download resumes from the
// last byte received, guarded by the file's digest (if_sha256). The client
// (package dataclient) resumes within a call and across calls (from
// LOCAL.partial) and verifies the whole file before renaming it into place.
//
// # Stage-in and stage-out
//
// BuildDataDisk makes an ext4 image (mkfs.ext4 -d) holding the inputs as
// in/PATH and an empty world-writable out/; StageOut reads out/ back from
// the image without mounting it (debugfs) and uploads what the task left.
// The guest controls that image, so stage-out never builds a host path
// from a name in it.
package dataserver
