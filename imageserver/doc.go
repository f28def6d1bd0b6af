// Package imageserver is the warehouse of VMPlants and the state server of
// GVFS: it stores golden images and persistent disks on local disk and
// serves them to plants and cache proxies over ImageService.
//
// # Layers
//
// The gRPC adapter (Service, service.go) is thin: it checks nothing the
// request validators have not, and calls the logic over the Store, which
// owns the files (store.go, disk.go, publish.go, read.go, chunks.go). The
// read side is served by the block protocol shared with the cache proxy
// (package blockproto); clients use package imageclient.
//
// # Contract
//
//   - Publish is atomic: nothing of an upload is visible before its commit
//     verified every file's SHA-256 and the manifest is durable; an upload
//     that ends without a commit, or a crash, leaves nothing behind.
//   - On publish every file gets its meta-data (ScanFile): a zero map and a
//     SHA-256 per block, zero granules stored as holes, and a transfer
//     policy (DefaultPolicy); whole-file files are compressed once, per
//     chunk (chunks.go), for FetchFile.
//   - Golden images are immutable. A persistent disk (CreateDisk) is a
//     copy-on-write view of a golden image's file; a WriteBlocks batch is
//     journalled, so a committed batch survives a crash and an uncommitted
//     one is never seen. A golden image cannot be deleted under its disks.
//   - Delete takes a name away at once; reads in flight finish on the old
//     files, and a handle kept across requests notices (NotFound).
//   - Errors wrap errdefs sentinels, mapped to gRPC codes in one place.
package imageserver
