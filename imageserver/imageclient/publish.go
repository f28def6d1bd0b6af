package imageclient

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// PublishFile is one local file to publish.
type PublishFile struct {
	Name      string
	Path      string
	Kind      imagev1.FileKind
	Policy    imagev1.TransferPolicy // UNSPECIFIED: the server's default for Kind
	BlockSize uint32                 // 0: the server's default
}

// PublishSpec describes an image to publish.
type PublishSpec struct {
	Name       string
	Attributes *imagev1.ImageAttributes
	Files      []PublishFile
}

// Progress is called as data is sent: done and total count non-zero bytes.
type Progress func(done, total uint64)

const publishChunk = 1 << 20

// Publish uploads the files of spec. Holes and all-zero chunks are not sent;
// every file's SHA-256 is computed on the way and checked by the server.
func (c *Client) Publish(ctx context.Context, spec PublishSpec, progress Progress) (*imagev1.PublishResponse, error) {
	h := &imagev1.PublishHeader{Name: spec.Name, Attributes: spec.Attributes}
	files := make([]*os.File, len(spec.Files))
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	var total uint64
	for i, pf := range spec.Files {
		f, err := os.Open(pf.Path)
		if err != nil {
			return nil, err
		}
		files[i] = f
		st, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", pf.Path)
		}
		total += dataBytes(f, uint64(st.Size()))
		h.Files = append(h.Files, &imagev1.PublishFile{Name: pf.Name, Kind: pf.Kind, Size: uint64(st.Size()), Policy: pf.Policy, BlockSize: pf.BlockSize})
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // an error below ends the stream without a commit: nothing is published
	stream, err := c.API.Publish(ctx)
	if err != nil {
		return nil, err
	}
	if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Header{Header: h}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	var done uint64
	sums := make([][]byte, len(files))
	for i, f := range files {
		sum := sha256.New()
		err := forEachDataChunk(f, h.Files[i].Size, publishChunk, func(off uint64, data []byte, zero bool) error {
			sum.Write(data)
			if zero {
				return nil
			}
			if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Data{Data: &imagev1.PublishData{FileIndex: uint32(i), Offset: off, Data: data}}}); err != nil {
				return err
			}
			done += uint64(len(data))
			if progress != nil {
				progress(min(done, total), total)
			}
			return nil
		})
		if err != nil {
			return nil, closeAndRecvErr(stream, err)
		}
		sums[i] = sum.Sum(nil)
	}
	if err := stream.Send(&imagev1.PublishRequest{Msg: &imagev1.PublishRequest_Commit{Commit: &imagev1.PublishCommit{FileSha256: sums}}}); err != nil {
		return nil, closeAndRecvErr(stream, err)
	}
	return stream.CloseAndRecv()
}

// closeAndRecvErr prefers the server's reason over a bare io.EOF from Send.
func closeAndRecvErr(stream imagev1.ImageService_PublishClient, err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := stream.CloseAndRecv(); rerr != nil {
			return rerr
		}
	}
	return err
}

var zeroChunk = make([]byte, publishChunk)

// forEachDataChunk walks a file in chunk-sized pieces, calling fn with the
// bytes (holes come as shared zero slices with zero set; chunks read as all
// zero also have zero set). Data is read once.
func forEachDataChunk(f *os.File, size uint64, chunk int, fn func(off uint64, data []byte, zero bool) error) error {
	buf := make([]byte, chunk)
	fd := int(f.Fd())
	for off := uint64(0); off < size; {
		d, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
		dataStart := uint64(d)
		if errors.Is(err, unix.ENXIO) {
			dataStart = size
		} else if err != nil {
			return err
		}
		for off < dataStart { // a hole
			n := min(uint64(chunk), dataStart-off, uint64(len(zeroChunk)))
			if err := fn(off, zeroChunk[:n], true); err != nil {
				return err
			}
			off += n
		}
		if off >= size {
			break
		}
		hole, err := unix.Seek(fd, int64(off), unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		for end := min(uint64(hole), size); off < end; {
			n := min(uint64(chunk), end-off)
			b := buf[:n]
			if _, err := f.ReadAt(b, int64(off)); err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if err := fn(off, b, blockproto.IsZero(b)); err != nil {
				return err
			}
			off += n
		}
	}
	return nil
}

// dataBytes estimates the bytes in data regions (what Publish may send).
func dataBytes(f *os.File, size uint64) uint64 {
	fd := int(f.Fd())
	var n uint64
	for off := int64(0); uint64(off) < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			break
		}
		n += uint64(h - d)
		off = h
	}
	return n
}
