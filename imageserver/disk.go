package imageserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/imageserver/blockproto"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// A persistent disk is a copy-on-write view of a golden image's file: blocks
// written through WriteBlocks live in a sparse data file and are marked in a
// bitmap; every other block is read from the golden file. Creating one copies
// nothing.
//
// A WriteBlocks batch is first written to a journal file; at commit the
// journal is fsynced and renamed to journal/GEN (the commit point), then
// applied to the data file and the state file (generation + bitmap), then
// removed. A restart re-applies every journal newer than the state, so a
// committed batch is never lost and an uncommitted one never seen.
const (
	stateFile  = "state"
	journalDir = "journal"
	dataFile   = "data"
)

type disk struct {
	base    *imageFile
	data    *os.File
	dir     string
	applyMu sync.Mutex // one commit at a time

	mu      sync.RWMutex // readers vs. applying a batch
	gen     uint64
	present []byte // one bit per block
}

func (d *disk) has(block uint64) bool { return d.present[block/8]&(1<<(block%8)) != 0 }

// CreateDisk creates a persistent disk from a golden image's file (the only
// disk of the image when file is empty).
func (s *Store) CreateDisk(name, source, file string, labels map[string]string) (*imagev1.Manifest, error) {
	src, err := s.lookupImage(source)
	if err != nil {
		return nil, err
	}
	if src.m.Writable {
		return nil, fmt.Errorf("%q is itself a persistent disk; create disks from golden images: %w", source, errdefs.ErrFailedPrecondition)
	}
	if file == "" {
		var disks []string
		for _, f := range src.m.Files {
			if f.Kind == imagev1.FileKind_FILE_KIND_DISK {
				disks = append(disks, f.Name)
			}
		}
		if len(disks) != 1 {
			return nil, fmt.Errorf("image %q has %d disk files (%s); name one with source_file: %w", source, len(disks), strings.Join(disks, ", "), errdefs.ErrInvalidArgument)
		}
		file = disks[0]
	}
	_, bf, err := s.lookupFile(source, file)
	if err != nil {
		return nil, err
	}
	if err := s.reserve(name); err != nil {
		return nil, err
	}
	staging := filepath.Join(s.tmpDir(), "disk-"+name+"-"+fsutil.RandomSuffix())
	fail := func(err error) (*imagev1.Manifest, error) {
		os.RemoveAll(staging)
		s.release(name)
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(staging, journalDir), 0o755); err != nil {
		return fail(err)
	}
	df, err := os.Create(filepath.Join(staging, dataFile))
	if err != nil {
		return fail(err)
	}
	err = df.Truncate(int64(bf.meta.Size))
	df.Close()
	if err != nil {
		return fail(err)
	}
	nb := blocks(bf.meta)
	if err := writeState(staging, 0, make([]byte, (nb+7)/8)); err != nil {
		return fail(err)
	}
	attrs := &imagev1.ImageAttributes{}
	if src.m.Attributes != nil {
		attrs = proto.Clone(src.m.Attributes).(*imagev1.ImageAttributes)
	}
	attrs.Parent = source
	attrs.Labels = labels
	m := &imagev1.Manifest{
		Name:            name,
		Attributes:      attrs,
		Writable:        true,
		BaseImage:       source,
		BaseFile:        file,
		CreatedUnixNano: nowNano(),
		Files: []*imagev1.FileMeta{{
			Name:      bf.meta.Name,
			Kind:      bf.meta.Kind,
			Size:      bf.meta.Size,
			BlockSize: bf.meta.BlockSize,
			Policy:    imagev1.TransferPolicy_TRANSFER_POLICY_BLOCKS,
			ChunkSize: blockproto.ChunkSize,
		}},
	}
	if err := s.install(staging, m, s.openDisk); err != nil {
		return fail(err)
	}
	s.log.Info("disk created", zap.String("disk", name), zap.String("from", source+"/"+file))
	return m, nil
}

func writeState(dir string, gen uint64, present []byte) error {
	b := make([]byte, 8, 8+len(present))
	binary.LittleEndian.PutUint64(b, gen)
	return fsutil.WriteFileAtomic(filepath.Join(dir, stateFile), append(b, present...))
}

// openDisk opens a disk whose base image is already loaded and applies
// committed journals left by a crash.
func (s *Store) openDisk(m *imagev1.Manifest) (*image, error) {
	s.mu.RLock()
	base := s.images[m.BaseImage]
	s.mu.RUnlock()
	if base == nil {
		return nil, fmt.Errorf("base image %q is missing", m.BaseImage)
	}
	bf := base.files[m.BaseFile]
	if bf == nil {
		return nil, fmt.Errorf("base file %q/%q is missing", m.BaseImage, m.BaseFile)
	}
	if f := m.Files[0]; f.Size != bf.meta.Size || f.BlockSize != bf.meta.BlockSize {
		return nil, fmt.Errorf("disk of %d bytes in %d-byte blocks over a base file of %d bytes in %d-byte blocks", f.Size, f.BlockSize, bf.meta.Size, bf.meta.BlockSize)
	}
	dir := filepath.Join(s.imagesDir(), m.Name)
	st, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	nb := blocks(bf.meta)
	if len(st) != 8+int((nb+7)/8) {
		return nil, fmt.Errorf("state file of %d bytes for %d blocks", len(st), nb)
	}
	data, err := os.OpenFile(filepath.Join(dir, dataFile), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	d := &disk{base: bf, data: data, dir: dir, gen: binary.LittleEndian.Uint64(st), present: st[8:]}
	img := &image{m: m, dir: dir, disk: d, files: map[string]*imageFile{m.Files[0].Name: {meta: m.Files[0], f: data}}}
	if err := d.replay(s.log); err != nil {
		data.Close()
		return nil, fmt.Errorf("replay journal: %w", err)
	}
	return img, nil
}

func (d *disk) replay(log *zap.Logger) error {
	ents, err := os.ReadDir(filepath.Join(d.dir, journalDir))
	if err != nil {
		return err
	}
	var gens []uint64
	for _, e := range ents {
		path := filepath.Join(d.dir, journalDir, e.Name())
		g, err := strconv.ParseUint(e.Name(), 10, 64)
		if err != nil { // an uncommitted batch (*.tmp): never visible
			os.Remove(path)
			continue
		}
		gens = append(gens, g)
	}
	sort.Slice(gens, func(i, j int) bool { return gens[i] < gens[j] })
	for _, g := range gens {
		path := filepath.Join(d.dir, journalDir, strconv.FormatUint(g, 10))
		if g <= d.gen { // applied before the crash, not yet removed
			os.Remove(path)
			continue
		}
		recs, err := readJournal(path, d.base.meta)
		if err != nil {
			return fmt.Errorf("journal %d: %w", g, err)
		}
		if err := d.apply(g, recs); err != nil {
			return err
		}
		os.Remove(path)
		log.Info("replayed committed write batch", zap.String("disk", filepath.Base(d.dir)), zap.Uint64("generation", g), zap.Int("blocks", len(recs)))
	}
	return nil
}

type journalRec struct {
	block uint64
	data  []byte
}

// Journal format: records of [block u64][len u32][crc32c u32][data], then a
// trailer [^0 u64][count u32][0 u32]. Little endian.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func readJournal(path string, meta *imagev1.FileMeta) ([]journalRec, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	var recs []journalRec
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, fmt.Errorf("truncated journal: %w", err)
		}
		block := binary.LittleEndian.Uint64(hdr[0:])
		n := binary.LittleEndian.Uint32(hdr[8:])
		sum := binary.LittleEndian.Uint32(hdr[12:])
		if block == ^uint64(0) {
			if int(n) != len(recs) {
				return nil, fmt.Errorf("trailer counts %d records, found %d", n, len(recs))
			}
			return recs, nil
		}
		if n > meta.BlockSize || block >= blocks(meta) {
			return nil, fmt.Errorf("bad record for block %d (%d bytes)", block, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, fmt.Errorf("truncated record: %w", err)
		}
		if crc32.Checksum(data, castagnoli) != sum {
			return nil, errors.New("record checksum mismatch")
		}
		recs = append(recs, journalRec{block, data})
	}
}

// apply writes records into the data file and makes them visible as
// generation gen.
func (d *disk) apply(gen uint64, recs []journalRec) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	bs := uint64(d.base.meta.BlockSize)
	for _, r := range recs {
		if _, err := d.data.WriteAt(r.data, int64(r.block*bs)); err != nil {
			return err
		}
		d.present[r.block/8] |= 1 << (r.block % 8)
	}
	if err := d.data.Sync(); err != nil {
		return err
	}
	if err := writeState(d.dir, gen, d.present); err != nil {
		return err
	}
	d.gen = gen
	return nil
}

// Batch is a WriteBlocks batch in progress.
type Batch struct {
	s      *Store
	img    *image
	expect uint64
	path   string
	f      *os.File
	w      *bufio.Writer
	count  uint32
	done   bool
}

// BeginWrite starts a batch for a persistent disk. expectGen, when not 0,
// must equal the disk's generation at commit.
func (s *Store) BeginWrite(name string, expectGen uint64) (*Batch, error) {
	img, err := s.lookupImage(name)
	if err != nil {
		return nil, err
	}
	if img.disk == nil {
		return nil, fmt.Errorf("%q is a golden image and golden images are immutable; create a persistent disk from it with CreateDisk: %w", name, errdefs.ErrFailedPrecondition)
	}
	path := filepath.Join(img.disk.dir, journalDir, fsutil.RandomSuffix()+".tmp")
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	return &Batch{s: s, img: img, expect: expectGen, path: path, f: f, w: bufio.NewWriterSize(f, 1<<20)}, nil
}

// Add appends one block write to the batch. A block is written whole: its
// data is block_size bytes, or what is left of the disk for the last block.
func (b *Batch) Add(block uint64, data []byte) error {
	meta := b.img.disk.base.meta
	nb := blocks(meta)
	if block >= nb {
		return fmt.Errorf("block %d is past the end of disk %q (%d blocks of %d bytes): %w", block, b.img.m.Name, nb, meta.BlockSize, errdefs.ErrOutOfRange)
	}
	want := min(uint64(meta.BlockSize), meta.Size-block*uint64(meta.BlockSize))
	if uint64(len(data)) != want {
		return fmt.Errorf("block %d of disk %q needs exactly %d bytes, got %d: %w", block, b.img.m.Name, want, len(data), errdefs.ErrInvalidArgument)
	}
	var hdr [16]byte
	binary.LittleEndian.PutUint64(hdr[0:], block)
	binary.LittleEndian.PutUint32(hdr[8:], uint32(len(data)))
	binary.LittleEndian.PutUint32(hdr[12:], crc32.Checksum(data, castagnoli))
	if _, err := b.w.Write(hdr[:]); err != nil {
		return err
	}
	if _, err := b.w.Write(data); err != nil {
		return err
	}
	b.count++
	return nil
}

// Commit makes the batch durable, then visible, and returns the new
// generation and the number of blocks written.
func (b *Batch) Commit() (uint64, uint64, error) {
	var hdr [16]byte
	binary.LittleEndian.PutUint64(hdr[0:], ^uint64(0))
	binary.LittleEndian.PutUint32(hdr[8:], b.count)
	if _, err := b.w.Write(hdr[:]); err != nil {
		b.Abort()
		return 0, 0, err
	}
	if err := b.w.Flush(); err != nil {
		b.Abort()
		return 0, 0, err
	}
	if err := b.f.Sync(); err != nil {
		b.Abort()
		return 0, 0, err
	}
	d := b.img.disk
	d.applyMu.Lock()
	defer d.applyMu.Unlock()
	d.mu.RLock()
	gen := d.gen
	d.mu.RUnlock()
	if b.expect != 0 && b.expect != gen {
		b.Abort()
		return 0, 0, fmt.Errorf("disk %q is at generation %d, the writer expected %d; someone else wrote it: %w", b.img.m.Name, gen, b.expect, errdefs.ErrFailedPrecondition)
	}
	gen++
	committed := filepath.Join(d.dir, journalDir, strconv.FormatUint(gen, 10))
	if err := os.Rename(b.path, committed); err != nil {
		b.Abort()
		return 0, 0, err
	}
	b.f.Close()
	b.done = true
	if err := fsutil.SyncDir(filepath.Dir(committed)); err != nil {
		return 0, 0, err
	}
	// Durable from here: a crash now is repaired by replay at the next start.
	recs, err := readJournal(committed, d.base.meta)
	if err != nil {
		return 0, 0, err
	}
	if err := d.apply(gen, recs); err != nil {
		return 0, 0, err
	}
	os.Remove(committed)
	return gen, uint64(b.count), nil
}

// Abort drops an uncommitted batch.
func (b *Batch) Abort() {
	if b.done {
		return
	}
	b.done = true
	b.f.Close()
	os.Remove(b.path)
}
