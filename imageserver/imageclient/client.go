// Package imageclient is the Go client of the image warehouse (package
// imageserver): publishing an image from local files (holes and zero chunks
// are not sent, every file's SHA-256 is checked by the server), pipelined
// block reads on one shared ReadBlocks stream (BlockStream), and the
// compressed whole-file channel (FetchFile, FetchToFile), which resumes a
// broken stream from the last chunk delivered. It works against any server
// that speaks ImageService: an image server or a cache proxy. Blocks are
// checked against their digests with blockproto.VerifyBlock.
package imageclient

import (
	"google.golang.org/grpc"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Client is the Go client of the image warehouse.
type Client struct {
	API imagev1.ImageServiceClient
	// Backoff paces FetchFile's retries (zero: DefaultBackoff).
	Backoff Backoff
}

// NewClient wraps a connection (made with services.Dial, so errors carry
// errdefs sentinels).
func NewClient(cc grpc.ClientConnInterface) *Client {
	return &Client{API: imagev1.NewImageServiceClient(cc)}
}
