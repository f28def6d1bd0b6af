package imageserver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// A whole-file file is compressed once, when it is published: each chunk of
// ChunkSize bytes becomes one zstd frame in a sidecar, DIR/images/NAME/zst/
// FILE, and FetchFile sends the frames as they are instead of compressing
// at every request. Layout of a sidecar:
//
//	"VGZ1", uint32 chunk count,
//	per chunk: uint64 offset of its frame in the sidecar, uint32 length
//	           (0: the chunk is all zero and has no frame),
//	the frames.
//
// Images published before sidecars existed are compressed at request time.
const (
	zstDir      = "zst"
	chunksMagic = "VGZ1"
)

// chunkEncoder compresses sidecars harder than requests are: it runs once
// per file, at publish.
var chunkEncoder = sync.OnceValue(func() *zstd.Encoder {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		panic(err) // only for invalid options
	}
	return enc
})

func chunkCount(meta *imagev1.FileMeta) uint64 {
	cs := uint64(meta.ChunkSize)
	return (meta.Size + cs - 1) / cs
}

// writeChunks compresses src (described by meta) into the sidecar at path,
// chunks in parallel, frames in order, and makes it durable.
func writeChunks(src *os.File, meta *imagev1.FileMeta, path string) (err error) {
	out, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	cs, n := uint64(meta.ChunkSize), chunkCount(meta)
	header := make([]byte, 8+12*n)
	copy(header, chunksMagic)
	binary.LittleEndian.PutUint32(header[4:], uint32(n))

	pos, next := uint64(len(header)), uint64(0)
	err = blockproto.InOrder(context.Background(), n, runtime.GOMAXPROCS(0), func(_ context.Context, i uint64) ([]byte, error) {
		off := i * cs
		size := min(cs, meta.Size-off)
		if blockproto.IsZeroRange(meta.ZeroMap, off, size) {
			return nil, nil
		}
		buf := make([]byte, size)
		if _, err := src.ReadAt(buf, int64(off)); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		return chunkEncoder().EncodeAll(buf, make([]byte, 0, size/2)), nil
	}, func(frame []byte) error {
		if len(frame) > 0 {
			if _, err := out.WriteAt(frame, int64(pos)); err != nil {
				return err
			}
		}
		binary.LittleEndian.PutUint64(header[8+12*next:], pos)
		binary.LittleEndian.PutUint32(header[8+12*next+8:], uint32(len(frame)))
		pos += uint64(len(frame))
		next++
		return nil
	})
	if err != nil {
		return err
	}
	if _, err := out.WriteAt(header, 0); err != nil {
		return err
	}
	return out.Sync()
}

// chunks is an open sidecar.
type chunks struct {
	f   *os.File
	off []uint64
	len []uint32
}

// openChunks opens the sidecar at path for the file meta describes; a
// missing sidecar is (nil, nil).
func openChunks(path string, meta *imagev1.FileMeta) (*chunks, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	c, err := readChunkIndex(f, meta)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func readChunkIndex(f *os.File, meta *imagev1.FileMeta) (*chunks, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	n := chunkCount(meta)
	header := make([]byte, 8+12*n)
	if _, err := f.ReadAt(header, 0); err != nil {
		return nil, fmt.Errorf("chunk index: %w", err)
	}
	if string(header[:4]) != chunksMagic || uint64(binary.LittleEndian.Uint32(header[4:])) != n {
		return nil, fmt.Errorf("not a chunk sidecar of %d chunks", n)
	}
	c := &chunks{f: f, off: make([]uint64, n), len: make([]uint32, n)}
	for i := range n {
		c.off[i] = binary.LittleEndian.Uint64(header[8+12*i:])
		c.len[i] = binary.LittleEndian.Uint32(header[8+12*i+8:])
		if c.off[i]+uint64(c.len[i]) > uint64(st.Size()) {
			return nil, fmt.Errorf("chunk %d lies past the end of the sidecar", i)
		}
	}
	return c, nil
}

// frame returns chunk i's zstd frame, or zero for an all-zero chunk.
func (c *chunks) frame(i uint64) (frame []byte, zero bool, err error) {
	if c.len[i] == 0 {
		return nil, true, nil
	}
	b := make([]byte, c.len[i])
	if _, err := c.f.ReadAt(b, int64(c.off[i])); err != nil {
		return nil, false, err
	}
	return b, false, nil
}
