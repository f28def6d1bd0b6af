package imageserver

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// FileHandle is a resolved image file, for many reads without lookups.
type FileHandle struct {
	img *image
	f   *imageFile
}

// Meta is the file's meta-data (FULL view for golden images).
func (h *FileHandle) Meta() *imagev1.FileMeta { return h.f.meta }

// OpenFile resolves an image's file.
func (s *Store) OpenFile(image, file string) (*FileHandle, error) {
	img, f, err := s.lookupFile(image, file)
	if err != nil {
		return nil, err
	}
	return &FileHandle{img: img, f: f}, nil
}

// ReadBlock reads block index of the file into buf (which must hold a
// block). Zero blocks are answered from the zero map without touching disk.
func (h *FileHandle) ReadBlock(index uint64, buf []byte) (blockproto.Block, error) {
	meta := h.f.meta
	nb := blocks(meta)
	if index >= nb {
		return blockproto.Block{}, fmt.Errorf("block %d of %q/%q is past its end (%d blocks of %d bytes): %w", index, h.img.m.Name, meta.Name, nb, meta.BlockSize, errdefs.ErrOutOfRange)
	}
	bs := uint64(meta.BlockSize)
	off := index * bs
	n := min(bs, meta.Size-off)
	if d := h.img.disk; d != nil {
		d.mu.RLock()
		defer d.mu.RUnlock()
		if !d.has(index) {
			return (&FileHandle{f: d.base}).readGolden(index, off, n, buf)
		}
		data := buf[:n]
		if _, err := d.data.ReadAt(data, int64(off)); err != nil && !errors.Is(err, io.EOF) {
			return blockproto.Block{}, h.readErr(err)
		}
		sum := sha256.Sum256(data)
		return blockproto.Block{Data: data, Length: uint32(n), Digest: sum[:]}, nil
	}
	return h.readGolden(index, off, n, buf)
}

func (h *FileHandle) readGolden(index, off, n uint64, buf []byte) (blockproto.Block, error) {
	meta := h.f.meta
	digest := meta.BlockDigests[index*blockproto.DigestSize : (index+1)*blockproto.DigestSize]
	if blockproto.IsZeroRange(meta.ZeroMap, off, n) {
		return blockproto.Block{Zero: true, Length: uint32(n), Digest: digest}, nil
	}
	data := buf[:n]
	if _, err := h.f.f.ReadAt(data, int64(off)); err != nil && !errors.Is(err, io.EOF) {
		return blockproto.Block{}, h.readErr(err)
	}
	return blockproto.Block{Data: data, Length: uint32(n), Digest: digest}, nil
}

// readErr reports a read from a file that Delete closed as NotFound, what a
// reader arriving a moment later would get, instead of an internal error.
func (h *FileHandle) readErr(err error) error {
	if errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("file %q: the image was deleted: %w", h.f.meta.Name, errdefs.ErrNotFound)
	}
	return err
}

// Frame returns the chunk at off (a multiple of the chunk size) as the zstd
// frame compressed at publish, or zero for an all-zero chunk; ok is false
// when the file has no compressed chunks.
func (h *FileHandle) Frame(off uint64) (frame []byte, zero, ok bool, err error) {
	c := h.f.chunks
	if c == nil || h.img.disk != nil {
		return nil, false, false, nil
	}
	i := off / uint64(h.f.meta.ChunkSize)
	if off%uint64(h.f.meta.ChunkSize) != 0 || i >= uint64(len(c.off)) {
		return nil, false, false, fmt.Errorf("offset %d of %q is not the start of a chunk: %w", off, h.f.meta.Name, errdefs.ErrInvalidArgument)
	}
	frame, zero, err = c.frame(i)
	if err != nil {
		return nil, false, false, h.readErr(err)
	}
	return frame, zero, true, nil
}

// ReadRange reads [off, off+len(buf)) of the file into buf, for whole-file
// transfers, and reports whether the range is all zero per the zero map
// (then buf is left untouched). Writable disks are read block by block.
func (h *FileHandle) ReadRange(off uint64, buf []byte) (zero bool, err error) {
	meta := h.f.meta
	if off+uint64(len(buf)) > meta.Size {
		return false, fmt.Errorf("range %d..%d of %q is past its end (%d bytes): %w", off, off+uint64(len(buf)), meta.Name, meta.Size, errdefs.ErrOutOfRange)
	}
	if h.img.disk == nil {
		if blockproto.IsZeroRange(meta.ZeroMap, off, uint64(len(buf))) {
			return true, nil
		}
		_, err := h.f.f.ReadAt(buf, int64(off))
		if errors.Is(err, io.EOF) {
			err = nil
		}
		if err != nil {
			return false, h.readErr(err)
		}
		return false, nil
	}
	bs := uint64(meta.BlockSize)
	tmp := make([]byte, bs)
	for pos := off; pos < off+uint64(len(buf)); {
		b, err := h.ReadBlock(pos/bs, tmp)
		if err != nil {
			return false, err
		}
		in := pos % bs
		end := min(uint64(b.Length), in+off+uint64(len(buf))-pos)
		dst := buf[pos-off : pos-off+end-in]
		if b.Zero {
			clear(dst)
		} else {
			copy(dst, b.Data[in:end])
		}
		pos += end - in
	}
	return blockproto.IsZero(buf), nil
}
