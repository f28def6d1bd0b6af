package imageserver

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// Upload is a publish in progress. Nothing of it is visible until Commit
// returns; Abort (or a crash) leaves nothing behind.
type Upload struct {
	s        *Store
	header   *imagev1.PublishHeader
	staging  string
	files    []*os.File
	received uint64
	done     bool
}

// DefaultPolicy is the transfer policy of a file kind when the publisher
// does not choose: disks block by block (their working set is small), every
// other kind whole (a VM monitor reads memory state, kernels and configs
// entirely; GVFS §3.2.2).
func DefaultPolicy(k imagev1.FileKind) imagev1.TransferPolicy {
	if k == imagev1.FileKind_FILE_KIND_DISK {
		return imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS
	}
	return imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE
}

// BeginPublish reserves the image name and prepares sparse staging files of
// the announced sizes. The header must already be validated.
func (s *Store) BeginPublish(h *imagev1.PublishHeader) (*Upload, error) {
	if err := s.reserve(h.Name); err != nil {
		return nil, err
	}
	u := &Upload{s: s, header: h, staging: filepath.Join(s.tmpDir(), "publish-"+h.Name+"-"+fsutil.RandomSuffix())}
	if err := os.MkdirAll(filepath.Join(u.staging, zstDir), 0o755); err != nil {
		u.Abort()
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(u.staging, filesDir), 0o755); err != nil {
		u.Abort()
		return nil, err
	}
	for _, pf := range h.Files {
		f, err := os.OpenFile(filepath.Join(u.staging, filesDir, pf.Name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			u.Abort()
			return nil, err
		}
		u.files = append(u.files, f)
		if err := f.Truncate(int64(pf.Size)); err != nil {
			u.Abort()
			return nil, fmt.Errorf("file %q of %d bytes: %w", pf.Name, pf.Size, err)
		}
	}
	return u, nil
}

// Write stores data at off in the file with index idx of the header.
func (u *Upload) Write(idx uint32, off uint64, data []byte) error {
	if int(idx) >= len(u.files) {
		return fmt.Errorf("data for file index %d, but the header announced %d files: %w", idx, len(u.files), errdefs.ErrInvalidArgument)
	}
	pf := u.header.Files[idx]
	if off+uint64(len(data)) > pf.Size {
		return fmt.Errorf("data for %q at %d..%d is past its announced size %d: %w", pf.Name, off, off+uint64(len(data)), pf.Size, errdefs.ErrOutOfRange)
	}
	if _, err := u.files[idx].WriteAt(data, int64(off)); err != nil {
		return err
	}
	u.received += uint64(len(data))
	return nil
}

// Received is the number of data bytes written so far.
func (u *Upload) Received() uint64 { return u.received }

// Commit verifies every file against its SHA-256, computes the meta-data,
// makes the files durable and publishes the image atomically.
func (u *Upload) Commit(sums [][]byte) (*imagev1.Manifest, error) {
	if len(sums) != len(u.files) {
		u.Abort()
		return nil, fmt.Errorf("commit carries %d checksums for %d files: %w", len(sums), len(u.files), errdefs.ErrInvalidArgument)
	}
	h := u.header
	m := &imagev1.Manifest{Name: h.Name, Attributes: h.Attributes, CreatedUnixNano: nowNano()}
	for i, pf := range h.Files {
		bs := pf.BlockSize
		if bs == 0 {
			bs = u.s.defaultBlockSize
		}
		scan, err := ScanFile(u.files[i], bs, true)
		if err != nil {
			u.Abort()
			return nil, fmt.Errorf("scan %q: %w", pf.Name, err)
		}
		if !bytes.Equal(scan.SHA256, sums[i]) {
			u.Abort()
			return nil, fmt.Errorf("file %q: sha256 of received data is %s but the publisher sent %s; the upload was corrupted or incomplete and nothing was published: %w",
				pf.Name, hex.EncodeToString(scan.SHA256), hex.EncodeToString(sums[i]), errdefs.ErrDataLoss)
		}
		if err := u.files[i].Sync(); err != nil {
			u.Abort()
			return nil, err
		}
		policy := pf.Policy
		if policy == imagev1.TransferPolicy_TRANSFER_POLICY_UNSPECIFIED {
			policy = DefaultPolicy(pf.Kind)
		}
		fm := &imagev1.FileMeta{
			Name:         pf.Name,
			Kind:         pf.Kind,
			Size:         scan.Size,
			BlockSize:    bs,
			Policy:       policy,
			ZeroMap:      scan.ZeroMap,
			BlockDigests: scan.Digests,
			Sha256:       scan.SHA256,
			NonzeroBytes: scan.NonZero,
			ChunkSize:    blockproto.ChunkSize,
		}
		m.Files = append(m.Files, fm)
		if policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE && fm.Size > 0 {
			if err := writeChunks(u.files[i], fm, filepath.Join(u.staging, zstDir, pf.Name)); err != nil {
				u.Abort()
				return nil, fmt.Errorf("compress %q: %w", pf.Name, err)
			}
		}
	}
	for _, f := range u.files {
		f.Close()
	}
	u.files = nil
	for _, d := range []string{filesDir, zstDir} {
		if err := fsutil.SyncDir(filepath.Join(u.staging, d)); err != nil {
			u.Abort()
			return nil, err
		}
	}
	if err := u.s.install(u.staging, m, u.s.openImage); err != nil {
		u.Abort()
		return nil, err
	}
	u.done = true
	u.s.log.Info("image published", zap.String("image", m.Name), zap.Int("files", len(m.Files)), zap.Uint64("received", u.received))
	return m, nil
}

// Abort drops the upload. It is safe to call after Commit (it does nothing).
func (u *Upload) Abort() {
	if u.done {
		return
	}
	u.done = true
	for _, f := range u.files {
		f.Close()
	}
	os.RemoveAll(u.staging)
	u.s.release(u.header.Name)
}
