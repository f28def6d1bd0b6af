package imageclient

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// FetchToFile fetches image/file into path through the compressed channel,
// zero chunks left as holes. Data goes to path+".partial" first, in order,
// so the partial file's length says how far it got: a failed call leaves
// it, and the next call resumes from its last whole chunk. The file is
// fsynced and renamed into place only once its SHA-256 matches the
// manifest's; a partial file of another version of the file is detected by
// that check and fetched again whole. progress (nil: none) is called as
// chunks arrive, never ahead of them.
func (c *Client) FetchToFile(ctx context.Context, image, file, path string, retries int, progress Progress) (*imagev1.FileMeta, error) {
	meta, err := c.fileMeta(ctx, image, file)
	if err != nil {
		return nil, err
	}
	partial := path + ".partial"
	f, err := os.OpenFile(partial, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	from, err := resumeOffset(f, meta)
	if err != nil {
		return nil, err
	}
	if err := c.fetchInto(ctx, f, meta, image, from, retries, progress); err != nil {
		return nil, err
	}
	if err := checkSHA256(f, meta); err != nil && from > 0 {
		// The prefix may come from another version of the file: once more,
		// whole.
		if err := f.Truncate(0); err != nil {
			return nil, err
		}
		if err := c.fetchInto(ctx, f, meta, image, 0, retries, progress); err != nil {
			return nil, err
		}
		err = checkSHA256(f, meta)
	}
	if err != nil {
		os.Remove(partial) // its content is wrong: resuming it cannot help
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, err
	}
	return meta, os.Rename(partial, path)
}

func (c *Client) fileMeta(ctx context.Context, image, file string) (*imagev1.FileMeta, error) {
	resp, err := c.API.GetImage(ctx, &imagev1.GetImageRequest{Name: image})
	if err != nil {
		return nil, err
	}
	for _, fm := range resp.Manifest.GetFiles() {
		if fm.Name == file {
			return fm, nil
		}
	}
	return nil, fmt.Errorf("image %s has no file %s: %w", image, file, errdefs.ErrNotFound)
}

// resumeOffset is where a fetch into the partial file f goes on: the start
// of the last chunk it holds whole (a chunk cut short by a crash is cut off),
// or 0 when f is longer than the file, so of another version.
func resumeOffset(f *os.File, meta *imagev1.FileMeta) (uint64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	cs := uint64(meta.ChunkSize)
	if cs == 0 {
		cs = blockproto.ChunkSize
	}
	have := uint64(st.Size())
	from := have / cs * cs
	if have > meta.Size {
		from = 0
	}
	if from != have {
		if err := f.Truncate(int64(from)); err != nil {
			return 0, err
		}
	}
	return from, nil
}

// fetchInto writes the file from offset from on into f, extending f over
// zero chunks so its length always ends at the last chunk received.
func (c *Client) fetchInto(ctx context.Context, f *os.File, meta *imagev1.FileMeta, image string, from uint64, retries int, progress Progress) error {
	if progress != nil {
		progress(from, meta.Size)
	}
	err := c.FetchFile(ctx, image, meta.Name, from, retries, func(off uint64, n uint32, data []byte) error {
		var err error
		if data != nil {
			_, err = f.WriteAt(data, int64(off))
		} else {
			err = f.Truncate(int64(off + uint64(n)))
		}
		if err == nil && progress != nil {
			progress(off+uint64(n), meta.Size)
		}
		return err
	})
	if err != nil {
		return err
	}
	return f.Truncate(int64(meta.Size)) // an empty file sends no chunk
}

func checkSHA256(f *os.File, meta *imagev1.FileMeta) error {
	if meta.Sha256 == nil {
		return nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, int64(meta.Size))); err != nil {
		return err
	}
	if got := h.Sum(nil); !bytes.Equal(got, meta.Sha256) {
		return fmt.Errorf("%s: fetched data has sha256 %s, the manifest says %s; not saved: %w",
			meta.Name, hex.EncodeToString(got), hex.EncodeToString(meta.Sha256), errdefs.ErrDataLoss)
	}
	return nil
}
