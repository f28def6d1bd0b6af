package dataserver

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/vmgrid/vmgrid/dataserver/internal/asynchash"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/services/fsutil"
)

// On-disk layout of a Store:
//
//	DIR/owners/HH/OWNER/files/PATH   the files (HH: first byte of SHA-256(OWNER), hex)
//	DIR/owners/HH/OWNER/grants.pb    read grants OWNER gave (datav1.Grants)
//	DIR/tmp/                         uploads in progress; emptied at start
//
// A file's SHA-256 lives in its extended attribute user.vmgrid.sha256, set
// and fsynced before the file is renamed into place, so a file and its
// digest appear together, atomically, and a file is never rewritten in
// place: a reader holding it open keeps reading the version it opened.
const (
	ownersDir   = "owners"
	filesDir    = "files"
	grantsFile  = "grants.pb"
	digestXattr = "user.vmgrid.sha256"
)

// Store is the data repository on local disk. It is safe for concurrent use.
type Store struct {
	dir string
	log *zap.Logger
	// MaxFileSize bounds one file (0: no limit but the disk).
	MaxFileSize uint64

	mu     sync.Mutex
	locks  map[string]*sync.Mutex // per owner: namespace changes (renames, deletes, directory pruning)
	grants map[string][]*datav1.ReadGrant
}

// OpenStore opens (creating if needed) the repository in dir, dropping
// uploads that never finished.
func OpenStore(dir string, log *zap.Logger) (*Store, error) {
	log = services.LoggerOr(log)
	s := &Store{dir: dir, log: log, locks: map[string]*sync.Mutex{}, grants: map[string][]*datav1.ReadGrant{}}
	if err := os.RemoveAll(s.tmpDir()); err != nil {
		return nil, fmt.Errorf("clean %s: %w", s.tmpDir(), err)
	}
	for _, d := range []string{filepath.Join(dir, ownersDir), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := s.probeXattr(); err != nil {
		return nil, err
	}
	shards, err := os.ReadDir(filepath.Join(dir, ownersDir))
	if err != nil {
		return nil, err
	}
	owners := 0
	for _, sh := range shards {
		ents, err := os.ReadDir(filepath.Join(dir, ownersDir, sh.Name()))
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			owners++
			b, err := os.ReadFile(filepath.Join(dir, ownersDir, sh.Name(), e.Name(), grantsFile))
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, err
			}
			g := &datav1.Grants{}
			if err := proto.Unmarshal(b, g); err != nil {
				return nil, fmt.Errorf("grants of %s: %w", e.Name(), err)
			}
			s.grants[e.Name()] = g.Grants
		}
	}
	log.Info("data store opened", zap.String("dir", dir), zap.Int("owners", owners))
	return s, nil
}

// probeXattr fails early, with a useful message, on a file system without
// user extended attributes (tmpfs before Linux 6.6, some network mounts).
func (s *Store) probeXattr() error {
	f, err := os.CreateTemp(s.tmpDir(), "probe-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := unix.Fsetxattr(int(f.Fd()), digestXattr, make([]byte, sha256.Size), 0); err != nil {
		return fmt.Errorf("data dir %s: the file system does not keep user extended attributes (%w); the store needs them for each file's SHA-256", s.dir, err)
	}
	return nil
}

func (s *Store) tmpDir() string { return filepath.Join(s.dir, "tmp") }

func (s *Store) ownerDir(owner string) string {
	h := sha256.Sum256([]byte(owner))
	return filepath.Join(s.dir, ownersDir, hex.EncodeToString(h[:1]), owner)
}

func (s *Store) filesRoot(owner string) string { return filepath.Join(s.ownerDir(owner), filesDir) }

// local is where owner's file p lives. p is validated (datav1.ValidatePath),
// so it stays under the owner's files directory.
func (s *Store) local(owner, p string) string {
	return filepath.Join(s.filesRoot(owner), filepath.FromSlash(p))
}

func (s *Store) ownerLock(owner string) *sync.Mutex {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.locks[owner]
	if l == nil {
		l = &sync.Mutex{}
		s.locks[owner] = l
	}
	return l
}

// Covers reports whether a grant of prefix (whole components, without a
// trailing '/') covers p: "in" covers "in" and "in/x", not "input"; ""
// covers everything.
func Covers(prefix, p string) bool {
	return prefix == "" || p == prefix || strings.HasPrefix(p, prefix) && p[len(prefix)] == '/'
}

// readable resolves the owner a read addresses ("" is the caller) and checks
// that caller may read p there; p == "" asks for any grant at all (List).
func (s *Store) readable(caller, owner, p string) (string, error) {
	if owner == "" || owner == caller {
		return caller, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.grants[owner] {
		if g.Grantee == caller && (p == "" || Covers(g.Prefix, p)) {
			return owner, nil
		}
	}
	if p == "" {
		return "", fmt.Errorf("%q has not granted %q read access to any of its files: %w", owner, caller, errdefs.ErrPermissionDenied)
	}
	return "", fmt.Errorf("%q has not granted %q read access to %q: %w", owner, caller, p, errdefs.ErrPermissionDenied)
}

// writable checks that a write addresses the caller's own namespace.
func writable(caller, owner string) error {
	if owner != "" && owner != caller {
		return fmt.Errorf("%q may write only its own files, not %q's: %w", caller, owner, errdefs.ErrPermissionDenied)
	}
	return nil
}

// grantFilter returns the prefixes owner granted caller (nil: caller is owner).
func (s *Store) grantFilter(caller, owner string) []string {
	if owner == caller {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var ps []string
	for _, g := range s.grants[owner] {
		if g.Grantee == caller {
			ps = append(ps, g.Prefix)
		}
	}
	return ps
}

// Open opens a file for reading. The handle reads the version it opened
// even if the file is replaced or deleted meanwhile.
func (s *Store) Open(caller, owner, p string) (*os.File, *datav1.FileInfo, error) {
	owner, err := s.readable(caller, owner, p)
	if err != nil {
		return nil, nil, err
	}
	f, err := os.OpenFile(s.local(owner, p), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil, nil, fmt.Errorf("%s has no file %q: %w", owner, p, errdefs.ErrNotFound)
		}
		return nil, nil, err
	}
	info, err := s.info(f, owner, p)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, info, nil
}

// Stat returns a file's info.
func (s *Store) Stat(caller, owner, p string) (*datav1.FileInfo, error) {
	f, info, err := s.Open(caller, owner, p)
	if err != nil {
		return nil, err
	}
	f.Close()
	return info, nil
}

// info describes an open file. A file without its digest attribute (copied
// in by hand, or by a tool that drops attributes) is hashed once and the
// attribute restored.
func (s *Store) info(f *os.File, owner, p string) (*datav1.FileInfo, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s/%s is a directory, not a file (List shows what it holds): %w", owner, p, errdefs.ErrNotFound)
	}
	sum := make([]byte, sha256.Size)
	n, err := unix.Fgetxattr(int(f.Fd()), digestXattr, sum)
	if err != nil || n != sha256.Size {
		if err != nil && !errors.Is(err, unix.ENODATA) {
			return nil, fmt.Errorf("%s/%s: read digest: %w", owner, p, err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, 0, st.Size())); err != nil {
			return nil, err
		}
		sum = h.Sum(nil)
		if err := unix.Fsetxattr(int(f.Fd()), digestXattr, sum, 0); err != nil {
			s.log.Warn("restore digest attribute", zap.String("owner", owner), zap.String("path", p), zap.Error(err))
		}
	}
	return &datav1.FileInfo{Owner: owner, Path: p, Size: uint64(st.Size()), Sha256: sum, ModifiedUnixNano: st.ModTime().UnixNano()}, nil
}

// List returns up to limit files of owner whose path starts with prefix and
// sorts after after, by path, and the last path returned when more follow.
// A caller listing another owner's files sees only what it was granted.
func (s *Store) List(caller, owner, prefix, after string, limit int) ([]*datav1.FileInfo, string, error) {
	owner, err := s.readable(caller, owner, "")
	if err != nil {
		return nil, "", err
	}
	grants := s.grantFilter(caller, owner)
	root := s.filesRoot(owner)
	// Walk only the directory the prefix names in full.
	start := root
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		start = filepath.Join(root, filepath.FromSlash(prefix[:i]))
	}
	var paths []string
	err = filepath.WalkDir(start, func(lp string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
				return nil // nothing there, or removed while walking
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		rel, err := filepath.Rel(root, lp)
		if err != nil {
			return err
		}
		p := filepath.ToSlash(rel)
		if !strings.HasPrefix(p, prefix) || p <= after {
			return nil
		}
		if grants != nil && !coveredByAny(grants, p) {
			return nil
		}
		paths = append(paths, p)
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	sort.Strings(paths)
	next := ""
	if len(paths) > limit {
		paths = paths[:limit]
		next = paths[limit-1]
	}
	out := make([]*datav1.FileInfo, 0, len(paths))
	for _, p := range paths {
		info, err := s.Stat(owner, owner, p) // permission checked above
		if errdefs.IsNotFound(err) {
			continue // deleted since the walk
		}
		if err != nil {
			return nil, "", err
		}
		out = append(out, info)
	}
	return out, next, nil
}

func coveredByAny(prefixes []string, p string) bool {
	for _, g := range prefixes {
		if Covers(g, p) {
			return true
		}
	}
	return false
}

// Delete removes one of the caller's files, and the directories it leaves
// empty.
func (s *Store) Delete(caller, owner, p string) error {
	if err := writable(caller, owner); err != nil {
		return err
	}
	l := s.ownerLock(caller)
	l.Lock()
	defer l.Unlock()
	lp := s.local(caller, p)
	st, err := os.Lstat(lp)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return fmt.Errorf("%s has no file %q: %w", caller, p, errdefs.ErrNotFound)
		}
		return err
	}
	if st.IsDir() {
		return fmt.Errorf("%s/%s is a directory; delete the files in it: %w", caller, p, errdefs.ErrNotFound)
	}
	if err := os.Remove(lp); err != nil {
		return err
	}
	dir := s.pruneEmpty(caller, filepath.Dir(lp))
	if err := fsutil.SyncDir(dir); err != nil {
		return err
	}
	s.log.Info("file deleted", zap.String("owner", caller), zap.String("path", p))
	return nil
}

// pruneEmpty removes dir and its parents while they are empty, up to the
// owner's files directory, and returns the first directory it kept.
// Called with the owner's lock held, so no upload is creating them.
func (s *Store) pruneEmpty(owner, dir string) string {
	root := s.filesRoot(owner)
	for dir != root && strings.HasPrefix(dir, root) {
		if err := os.Remove(dir); err != nil {
			break // not empty
		}
		dir = filepath.Dir(dir)
	}
	return dir
}

// Upload is a file upload in progress. Nothing of it is visible until
// Commit returns; Abort (or a crash) leaves nothing behind.
type Upload struct {
	s        *Store
	owner    string
	path     string
	f        *os.File
	staging  string
	sum      *asynchash.Hash
	received uint64
	flushed  uint64 // writeback started up to here
	done     bool
}

// BeginUpload starts an upload of caller's file p into a staging file.
func (s *Store) BeginUpload(caller, owner, p string, sizeHint uint64) (*Upload, error) {
	if err := writable(caller, owner); err != nil {
		return nil, err
	}
	if s.MaxFileSize > 0 && sizeHint > s.MaxFileSize {
		return nil, fmt.Errorf("%s: %d bytes exceed the limit of %d bytes per file: %w", p, sizeHint, s.MaxFileSize, errdefs.ErrResourceExhausted)
	}
	staging := filepath.Join(s.tmpDir(), "upload-"+fsutil.RandomSuffix())
	f, err := os.OpenFile(staging, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	return &Upload{s: s, owner: caller, path: p, f: f, staging: staging, sum: asynchash.New(nil, nil)}, nil
}

// Write appends data. data is hashed later, on another goroutine: it must
// not change after Write.
func (u *Upload) Write(data []byte) error {
	if u.done {
		return fmt.Errorf("upload of %q is over: %w", u.path, errdefs.ErrFailedPrecondition)
	}
	if max := u.s.MaxFileSize; max > 0 && u.received+uint64(len(data)) > max {
		return fmt.Errorf("%s: more than the limit of %d bytes per file: %w", u.path, max, errdefs.ErrResourceExhausted)
	}
	if _, err := u.f.Write(data); err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return fmt.Errorf("%s: the data server is out of space: %w", u.path, errdefs.ErrResourceExhausted)
		}
		return err
	}
	u.sum.Write(data)
	u.received += uint64(len(data))
	if u.received-u.flushed >= writebackEvery {
		// Start writing back what arrived so far, so the disk works while
		// data still arrives and the fsync at commit waits only for the
		// tail (a hint: errors surface at that fsync).
		_ = unix.SyncFileRange(int(u.f.Fd()), int64(u.flushed), int64(u.received-u.flushed), unix.SYNC_FILE_RANGE_WRITE)
		u.flushed = u.received
	}
	return nil
}

// writebackEvery is how much an upload writes before it starts writeback.
const writebackEvery = 8 << 20

// Received is the number of bytes written so far.
func (u *Upload) Received() uint64 { return u.received }

// Commit checks the size and SHA-256 the client sent against what arrived,
// makes the file durable and renames it into place (replacing an older
// version atomically).
func (u *Upload) Commit(size uint64, sum []byte) (*datav1.FileInfo, error) {
	if u.done {
		return nil, fmt.Errorf("upload of %q is over: %w", u.path, errdefs.ErrFailedPrecondition)
	}
	defer u.Abort() // no-op once installed
	if size != u.received {
		return nil, fmt.Errorf("%s: received %d bytes but the commit says %d; nothing was stored: %w", u.path, u.received, size, errdefs.ErrDataLoss)
	}
	got := u.sum.Sum()
	if !bytes.Equal(got, sum) {
		return nil, fmt.Errorf("%s: sha256 of the received data is %s but the client sent %s; the upload was corrupted and nothing was stored: %w",
			u.path, hex.EncodeToString(got), hex.EncodeToString(sum), errdefs.ErrDataLoss)
	}
	fd := int(u.f.Fd())
	if err := unix.Fsetxattr(fd, digestXattr, got, 0); err != nil {
		return nil, fmt.Errorf("%s: set digest: %w", u.path, err)
	}
	if err := u.f.Sync(); err != nil {
		return nil, err
	}
	st, err := u.f.Stat()
	if err != nil {
		return nil, err
	}
	if err := u.f.Close(); err != nil {
		return nil, err
	}
	u.f = nil
	if err := u.s.install(u.owner, u.path, u.staging); err != nil {
		return nil, err
	}
	u.done = true
	u.s.log.Info("file stored", zap.String("owner", u.owner), zap.String("path", u.path), zap.Uint64("size", size))
	return &datav1.FileInfo{Owner: u.owner, Path: u.path, Size: size, Sha256: got, ModifiedUnixNano: st.ModTime().UnixNano()}, nil
}

// install renames a finished staging file into place under the owner's
// lock, creating (and syncing) the directories above it.
func (s *Store) install(owner, p, staging string) error {
	l := s.ownerLock(owner)
	l.Lock()
	defer l.Unlock()
	final := s.local(owner, p)
	if err := s.mkdirs(owner, path.Dir(p)); err != nil {
		return err
	}
	if err := os.Rename(staging, final); err != nil {
		if errors.Is(err, syscall.EISDIR) || errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.ENOTEMPTY) {
			return fmt.Errorf("%s/%s is a directory holding other files; a path cannot be both: %w", owner, p, errdefs.ErrFailedPrecondition)
		}
		return err
	}
	return fsutil.SyncDir(filepath.Dir(final))
}

// mkdirs creates the directories of dir (a slash path, "." for the root)
// under the owner's files directory one by one, syncing each parent it adds
// to, so a renamed-in file is reachable after a crash. A file in the way is
// FailedPrecondition.
func (s *Store) mkdirs(owner, dir string) error {
	target := filepath.Join(s.filesRoot(owner), filepath.FromSlash(dir))
	if st, err := os.Stat(target); err == nil && st.IsDir() {
		return nil
	}
	base := filepath.Join(s.dir, ownersDir)
	rel, err := filepath.Rel(base, s.filesRoot(owner)) // HH/OWNER/files
	if err != nil {
		return err
	}
	comps := strings.Split(filepath.ToSlash(rel), "/")
	fixed := len(comps)
	if dir != "." {
		comps = append(comps, strings.Split(dir, "/")...)
	}
	parent := base
	for i, c := range comps {
		next := filepath.Join(parent, c)
		switch err := os.Mkdir(next, 0o755); {
		case err == nil:
			if err := fsutil.SyncDir(parent); err != nil {
				return err
			}
		case errors.Is(err, os.ErrExist):
			st, err := os.Lstat(next)
			if err != nil {
				return err
			}
			if !st.IsDir() {
				return fmt.Errorf("%s/%s is a file, so it cannot hold other files: %w", owner, strings.Join(comps[fixed:i+1], "/"), errdefs.ErrFailedPrecondition)
			}
		default:
			return err
		}
		parent = next
	}
	return nil
}

// Abort drops the upload. It is safe to call after Commit (it does nothing).
func (u *Upload) Abort() {
	if u.done {
		return
	}
	u.done = true
	u.sum.Close()
	if u.f != nil {
		u.f.Close()
	}
	os.Remove(u.staging)
}

// Grant lets grantee read owner's files under prefix.
func (s *Store) Grant(owner, grantee, prefix string) error {
	if grantee == owner {
		return fmt.Errorf("%q can always read its own files: %w", owner, errdefs.ErrInvalidArgument)
	}
	prefix = strings.TrimSuffix(prefix, "/")
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, g := range s.grants[owner] {
		if g.Grantee == grantee && g.Prefix == prefix {
			return nil
		}
	}
	gs := append(append([]*datav1.ReadGrant(nil), s.grants[owner]...), &datav1.ReadGrant{Owner: owner, Grantee: grantee, Prefix: prefix})
	if err := s.saveGrants(owner, gs); err != nil {
		return err
	}
	s.grants[owner] = gs
	s.log.Info("read access granted", zap.String("owner", owner), zap.String("grantee", grantee), zap.String("prefix", prefix))
	return nil
}

// Revoke takes back a grant given with Grant.
func (s *Store) Revoke(owner, grantee, prefix string) error {
	prefix = strings.TrimSuffix(prefix, "/")
	s.mu.Lock()
	defer s.mu.Unlock()
	var gs []*datav1.ReadGrant
	for _, g := range s.grants[owner] {
		if g.Grantee != grantee || g.Prefix != prefix {
			gs = append(gs, g)
		}
	}
	if len(gs) == len(s.grants[owner]) {
		return fmt.Errorf("%q has no grant for %q on prefix %q: %w", owner, grantee, prefix, errdefs.ErrNotFound)
	}
	if err := s.saveGrants(owner, gs); err != nil {
		return err
	}
	s.grants[owner] = gs
	s.log.Info("read access revoked", zap.String("owner", owner), zap.String("grantee", grantee), zap.String("prefix", prefix))
	return nil
}

// Grants returns the grants owner gave and received, sorted.
func (s *Store) Grants(owner string) (given, received []*datav1.ReadGrant) {
	s.mu.Lock()
	defer s.mu.Unlock()
	given = append(given, s.grants[owner]...)
	for _, gs := range s.grants {
		for _, g := range gs {
			if g.Grantee == owner {
				received = append(received, g)
			}
		}
	}
	less := func(l []*datav1.ReadGrant) func(i, j int) bool {
		return func(i, j int) bool {
			a, b := l[i], l[j]
			return a.Owner+"\x00"+a.Grantee+"\x00"+a.Prefix < b.Owner+"\x00"+b.Grantee+"\x00"+b.Prefix
		}
	}
	sort.Slice(given, less(given))
	sort.Slice(received, less(received))
	return given, received
}

func (s *Store) saveGrants(owner string, gs []*datav1.ReadGrant) error {
	b, err := proto.Marshal(&datav1.Grants{Grants: gs})
	if err != nil {
		return err
	}
	dir := s.ownerDir(owner)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, grantsFile), b)
}
