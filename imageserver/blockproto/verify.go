package blockproto

import (
	"bytes"
	"crypto/sha256"
	"fmt"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// BlockResult is one block as a client receives it from a ReadBlocks
// stream, uncompressed.
type BlockResult struct {
	Block  uint64
	Zero   bool
	Data   []byte // uncompressed; nil when Zero
	Length uint32
	Digest []byte
}

// VerifyBlock checks a block's data against an expected digest.
func VerifyBlock(r BlockResult, want []byte) error {
	var got [DigestSize]byte
	if r.Zero {
		got = ZeroDigest(int(r.Length))
	} else {
		got = sha256.Sum256(r.Data)
	}
	if !bytes.Equal(got[:], want) {
		return fmt.Errorf("block %d: digest mismatch: %w", r.Block, errdefs.ErrDataLoss)
	}
	return nil
}
