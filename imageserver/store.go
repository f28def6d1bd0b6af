package imageserver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// On-disk layout of a Store:
//
//	DIR/images/NAME/manifest.pb   the manifest (FULL view)
//	DIR/images/NAME/files/FILE    the file, zero granules as holes
//	DIR/images/NAME/zst/FILE      whole-file files: every chunk compressed
//	                              (chunks.go)
//	DIR/images/NAME/profile.pb    the boot profile, if any
//	DIR/images/NAME/state         writable disks: generation + written-block bitmap
//	DIR/images/NAME/journal/      writable disks: committed, not yet applied batches
//	DIR/tmp/                      uploads in progress and deletions; emptied at start
const (
	manifestFile = "manifest.pb"
	profileFile  = "profile.pb"
	filesDir     = "files"
)

// Store keeps images on local disk. It is safe for concurrent use.
type Store struct {
	dir              string
	log              *zap.Logger
	defaultBlockSize uint32

	mu       sync.RWMutex
	images   map[string]*image
	reserved map[string]bool // names of uploads in progress
}

type image struct {
	m     *imagev1.Manifest // FULL view; treat as immutable, clone to change
	dir   string
	files map[string]*imageFile
	disk  *disk // nil for golden images
}

type imageFile struct {
	meta   *imagev1.FileMeta
	f      *os.File
	chunks *chunks // nil: compressed at request time
}

// OpenStore opens (creating if needed) the store in dir, dropping uploads that
// never finished and applying write batches that were committed but not yet
// applied when the process stopped.
func OpenStore(dir string, log *zap.Logger) (*Store, error) {
	log = services.LoggerOr(log)
	s := &Store{
		dir:              dir,
		log:              log,
		defaultBlockSize: blockproto.DefaultBlockSize,
		images:           map[string]*image{},
		reserved:         map[string]bool{},
	}
	if err := os.RemoveAll(s.tmpDir()); err != nil {
		return nil, fmt.Errorf("clean %s: %w", s.tmpDir(), err)
	}
	for _, d := range []string{s.imagesDir(), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	ents, err := os.ReadDir(s.imagesDir())
	if err != nil {
		return nil, err
	}
	// Golden images first: disks need their base.
	var disks []*imagev1.Manifest
	for _, e := range ents {
		m, err := readManifest(filepath.Join(s.imagesDir(), e.Name(), manifestFile))
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", e.Name(), err)
		}
		if m.Writable {
			disks = append(disks, m)
			continue
		}
		img, err := s.openImage(m)
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", m.Name, err)
		}
		s.images[m.Name] = img
	}
	for _, m := range disks {
		img, err := s.openDisk(m)
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", m.Name, err)
		}
		s.images[m.Name] = img
	}
	log.Info("store opened", zap.String("dir", dir), zap.Int("images", len(s.images)))
	return s, nil
}

func (s *Store) imagesDir() string { return filepath.Join(s.dir, "images") }
func (s *Store) tmpDir() string    { return filepath.Join(s.dir, "tmp") }

func (s *Store) openImage(m *imagev1.Manifest) (*image, error) {
	img := &image{m: m, dir: filepath.Join(s.imagesDir(), m.Name), files: map[string]*imageFile{}}
	for _, fm := range m.Files {
		f, err := os.Open(filepath.Join(img.dir, filesDir, fm.Name))
		if err != nil {
			img.close()
			return nil, err
		}
		imf := &imageFile{meta: fm, f: f}
		img.files[fm.Name] = imf
		if fm.Policy == imagev1.TransferPolicy_TRANSFER_POLICY_WHOLE_FILE && fm.ChunkSize > 0 && !m.Writable {
			if imf.chunks, err = openChunks(filepath.Join(img.dir, zstDir, fm.Name), fm); err != nil {
				s.log.Warn("compressed chunks unusable; compressing at request time", zap.String("image", m.Name), zap.String("file", fm.Name), zap.Error(err))
			}
		}
	}
	return img, nil
}

func (img *image) close() {
	for _, f := range img.files {
		f.f.Close()
		if f.chunks != nil {
			f.chunks.f.Close()
		}
	}
	if img.disk != nil {
		img.disk.data.Close()
	}
}

// readManifest reads and checks a manifest file.
func readManifest(path string) (*imagev1.Manifest, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return DecodeManifest(b)
}

// DecodeManifest decodes a stored manifest and checks that its meta-data is
// consistent (sizes, zero maps, digests), so a damaged file is reported
// instead of served.
func DecodeManifest(b []byte) (*imagev1.Manifest, error) {
	m := &imagev1.Manifest{}
	if err := proto.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("decode manifest: %w", err)
	}
	if err := imagev1.ValidateName("manifest name", m.Name); err != nil {
		return nil, err
	}
	if len(m.Files) == 0 || len(m.Files) > imagev1.MaxFiles {
		return nil, fmt.Errorf("manifest %s: %d files", m.Name, len(m.Files))
	}
	seen := map[string]bool{}
	for _, f := range m.Files {
		if err := imagev1.ValidateName("manifest file name", f.Name); err != nil {
			return nil, err
		}
		if seen[f.Name] {
			return nil, fmt.Errorf("manifest %s: file %s twice", m.Name, f.Name)
		}
		seen[f.Name] = true
		if f.BlockSize < blockproto.MinBlockSize || f.BlockSize > blockproto.MaxBlockSize || f.BlockSize&(f.BlockSize-1) != 0 {
			return nil, fmt.Errorf("manifest %s: file %s: bad block size %d", m.Name, f.Name, f.BlockSize)
		}
		if _, ok := imagev1.FileKind_name[int32(f.Kind)]; !ok {
			return nil, fmt.Errorf("manifest %s: file %s: kind %d is not a FileKind", m.Name, f.Name, f.Kind)
		}
		if _, ok := imagev1.TransferPolicy_name[int32(f.Policy)]; !ok {
			return nil, fmt.Errorf("manifest %s: file %s: policy %d is not a TransferPolicy", m.Name, f.Name, f.Policy)
		}
		if f.Size > imagev1.MaxFileSize {
			return nil, fmt.Errorf("manifest %s: file %s: size %d too large", m.Name, f.Name, f.Size)
		}
		// FetchFile divides by the chunk size and reads a chunk into a
		// MaxBlockSize buffer.
		if f.ChunkSize == 0 || f.ChunkSize > blockproto.ChunkSize {
			return nil, fmt.Errorf("manifest %s: file %s: bad chunk size %d", m.Name, f.Name, f.ChunkSize)
		}
		if m.Writable {
			continue
		}
		nblocks := (f.Size + uint64(f.BlockSize) - 1) / uint64(f.BlockSize)
		if uint64(len(f.BlockDigests)) != nblocks*blockproto.DigestSize {
			return nil, fmt.Errorf("manifest %s: file %s: %d digest bytes for %d blocks", m.Name, f.Name, len(f.BlockDigests), nblocks)
		}
		if len(f.ZeroMap) != blockproto.ZeroMapLen(f.Size) {
			return nil, fmt.Errorf("manifest %s: file %s: zero map of %d bytes for size %d", m.Name, f.Name, len(f.ZeroMap), f.Size)
		}
		if len(f.Sha256) != blockproto.DigestSize {
			return nil, fmt.Errorf("manifest %s: file %s: missing sha256", m.Name, f.Name)
		}
	}
	if m.Writable {
		if len(m.Files) != 1 {
			return nil, fmt.Errorf("manifest %s: a disk has exactly one file", m.Name)
		}
		if err := imagev1.ValidateName("manifest base image", m.BaseImage); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// view returns m as the caller asked: BASIC drops per-block meta-data.
func view(m *imagev1.Manifest, v imagev1.View) *imagev1.Manifest {
	c := proto.Clone(m).(*imagev1.Manifest)
	if v != imagev1.View_VIEW_FULL {
		for _, f := range c.Files {
			f.ZeroMap, f.BlockDigests = nil, nil
		}
	}
	return c
}

// Get returns the manifest of an image or disk.
func (s *Store) Get(name string, v imagev1.View) (*imagev1.Manifest, error) {
	img, err := s.lookupImage(name)
	if err != nil {
		return nil, err
	}
	return view(img.manifest(), v), nil
}

func (img *image) manifest() *imagev1.Manifest {
	if img.disk == nil {
		return img.m
	}
	img.disk.mu.RLock()
	defer img.disk.mu.RUnlock()
	m := proto.Clone(img.m).(*imagev1.Manifest)
	m.Generation = img.disk.gen
	return m
}

func (s *Store) lookupImage(name string) (*image, error) {
	s.mu.RLock()
	img := s.images[name]
	s.mu.RUnlock()
	if img == nil {
		return nil, fmt.Errorf("image %q: %w", name, errdefs.ErrNotFound)
	}
	return img, nil
}

func (s *Store) lookupFile(name, file string) (*image, *imageFile, error) {
	img, err := s.lookupImage(name)
	if err != nil {
		return nil, nil, err
	}
	f := img.files[file]
	if f == nil {
		names := make([]string, 0, len(img.files))
		for n := range img.files {
			names = append(names, n)
		}
		sort.Strings(names)
		return nil, nil, fmt.Errorf("image %q has no file %q (it has %s): %w", name, file, strings.Join(names, ", "), errdefs.ErrNotFound)
	}
	return img, f, nil
}

// current reports whether h still reads the image of its name: a handle
// kept across requests must not outlive a Delete (or serve a deleted image
// after the name was published again).
func (s *Store) current(h *FileHandle) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.images[h.img.m.Name] == h.img
}

// List returns the manifests (BASIC view) that match the filter, by name.
func (s *Store) List(q *imagev1.ListImagesRequest) []*imagev1.Manifest {
	s.mu.RLock()
	imgs := make([]*image, 0, len(s.images))
	for _, img := range s.images {
		imgs = append(imgs, img)
	}
	s.mu.RUnlock()
	var out []*imagev1.Manifest
	for _, img := range imgs {
		m := img.manifest()
		if matches(m, q) {
			out = append(out, view(m, imagev1.View_VIEW_BASIC))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func matches(m *imagev1.Manifest, q *imagev1.ListImagesRequest) bool {
	a := m.Attributes
	if a == nil {
		a = &imagev1.ImageAttributes{}
	}
	switch {
	case q.NamePrefix != "" && !strings.HasPrefix(m.Name, q.NamePrefix),
		q.Arch != "" && q.Arch != a.Arch,
		q.Os != "" && q.Os != a.Os,
		q.MinVcpus > a.Vcpus,
		q.MinMemoryMib > a.MemoryMib,
		q.Kind == imagev1.ListImagesRequest_KIND_GOLDEN && m.Writable,
		q.Kind == imagev1.ListImagesRequest_KIND_WRITABLE && !m.Writable:
		return false
	}
	for k, v := range q.Labels {
		if a.Labels[k] != v {
			return false
		}
	}
	return true
}

// Delete removes an image or disk. A golden image that a disk was created
// from cannot be deleted before the disk.
func (s *Store) Delete(name string) error {
	s.mu.Lock()
	img := s.images[name]
	if img == nil {
		s.mu.Unlock()
		return fmt.Errorf("image %q: %w", name, errdefs.ErrNotFound)
	}
	for _, other := range s.images {
		if other.m.Writable && other.m.BaseImage == name {
			s.mu.Unlock()
			return fmt.Errorf("image %q is the base of disk %q; delete the disk first: %w", name, other.m.Name, errdefs.ErrFailedPrecondition)
		}
	}
	delete(s.images, name)
	s.mu.Unlock()
	// Rename first so the name is gone at once even if removal is slow; open
	// descriptors of readers in flight stay valid until they finish.
	trash := filepath.Join(s.tmpDir(), "deleted-"+name+"-"+fsutil.RandomSuffix())
	if err := os.Rename(img.dir, trash); err != nil {
		return fmt.Errorf("delete %q: %w", name, err)
	}
	if err := fsutil.SyncDir(s.imagesDir()); err != nil {
		return err
	}
	go func() {
		img.close()
		if err := os.RemoveAll(trash); err != nil {
			s.log.Warn("remove deleted image", zap.String("image", name), zap.Error(err))
		}
	}()
	s.log.Info("image deleted", zap.String("image", name))
	return nil
}

// reserve claims a name for an upload or a new disk.
func (s *Store) reserve(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.images[name] != nil {
		return fmt.Errorf("image %q: %w", name, errdefs.ErrAlreadyExists)
	}
	if s.reserved[name] {
		return fmt.Errorf("image %q is being published right now: %w", name, errdefs.ErrAlreadyExists)
	}
	s.reserved[name] = true
	return nil
}

func (s *Store) release(name string) {
	s.mu.Lock()
	delete(s.reserved, name)
	s.mu.Unlock()
}

// install moves a finished staging directory into place and makes the image
// visible.
func (s *Store) install(staging string, m *imagev1.Manifest, open func(*imagev1.Manifest) (*image, error)) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(staging, manifestFile), b); err != nil {
		return err
	}
	final := filepath.Join(s.imagesDir(), m.Name)
	if err := os.Rename(staging, final); err != nil {
		return err
	}
	if err := fsutil.SyncDir(s.imagesDir()); err != nil {
		return err
	}
	img, err := open(m)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.images[m.Name] = img
	delete(s.reserved, m.Name)
	s.mu.Unlock()
	return nil
}

// PutProfile stores the boot profile of an image.
func (s *Store) PutProfile(name string, entries []*imagev1.ProfileEntry) error {
	img, err := s.lookupImage(name)
	if err != nil {
		return err
	}
	for i, e := range entries {
		f := img.files[e.File]
		if f == nil {
			return fmt.Errorf("entries[%d]: image %q has no file %q: %w", i, name, e.File, errdefs.ErrInvalidArgument)
		}
		if nb := blocks(f.meta); e.Block >= nb {
			return fmt.Errorf("entries[%d]: block %d of %q is past its end (%d blocks): %w", i, e.Block, e.File, nb, errdefs.ErrOutOfRange)
		}
	}
	b, err := proto.Marshal(&imagev1.GetProfileResponse{Entries: entries})
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(img.dir, profileFile), b)
}

// GetProfile returns the boot profile of an image (empty when none).
func (s *Store) GetProfile(name string) ([]*imagev1.ProfileEntry, error) {
	img, err := s.lookupImage(name)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(img.dir, profileFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	r := &imagev1.GetProfileResponse{}
	if err := proto.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("profile of %q: %w", name, err)
	}
	return r.Entries, nil
}

func blocks(f *imagev1.FileMeta) uint64 {
	return (f.Size + uint64(f.BlockSize) - 1) / uint64(f.BlockSize)
}

func nowNano() int64 { return time.Now().UnixNano() }
