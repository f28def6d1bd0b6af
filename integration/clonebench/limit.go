package clonebench

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Needed is what a clone needed from the image side: the blocks a plant
// holds in its block cache and the whole files in its file cache, non-zero
// bytes only.
type Needed struct {
	Bytes uint64 `json:"bytes"`
	// Compressed is Bytes compressed as the image server sends them: zstd
	// at its fastest level (≈ zstd -1), blocks one by one, whole files in
	// FetchFile chunks.
	Compressed uint64 `json:"compressed_bytes"`
	// Files is Bytes per image file.
	Files map[string]uint64 `json:"files"`
}

// neededBytes reads what the plant's caches hold of image from the golden
// files on the image side (local paths by file name) and compresses it.
func neededBytes(ctx context.Context, p *gvfs.Proxy, image string, golden map[string]string) (*Needed, error) {
	m, err := p.Image(ctx, image)
	if err != nil {
		return nil, err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	defer enc.Close()
	out := &Needed{Files: map[string]uint64{}}
	var dst []byte
	for _, meta := range m.Files {
		path, ok := golden[meta.Name]
		if !ok {
			return nil, fmt.Errorf("no local copy of %s", meta.Name)
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		// Pieces of the file that crossed: offsets and lengths.
		var pieces [][2]uint64
		if meta.Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE {
			if p.FileCache().Complete(meta) {
				cs := uint64(meta.ChunkSize)
				if cs == 0 {
					cs = blockproto.ChunkSize
				}
				for off := uint64(0); off < meta.Size; off += cs {
					pieces = append(pieces, [2]uint64{off, min(cs, meta.Size-off)})
				}
			}
		} else {
			gf, err := p.Open(ctx, image, meta.Name)
			if err != nil {
				f.Close()
				return nil, err
			}
			bs := uint64(meta.BlockSize)
			for idx := uint64(0); idx*bs < meta.Size; idx++ {
				if gf.Cached(idx) {
					pieces = append(pieces, [2]uint64{idx * bs, min(bs, meta.Size-idx*bs)})
				}
			}
		}
		buf := make([]byte, 0, imagev1.MaxBlockSize)
		for _, pc := range pieces {
			buf = buf[:pc[1]]
			if _, err := io.ReadFull(io.NewSectionReader(f, int64(pc[0]), int64(pc[1])), buf); err != nil {
				f.Close()
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			if blockproto.IsZero(buf) {
				continue
			}
			out.Bytes += pc[1]
			out.Files[meta.Name] += pc[1]
			dst = enc.EncodeAll(buf, dst[:0])
			out.Compressed += uint64(min(len(dst), len(buf)))
		}
		f.Close()
	}
	return out, nil
}
