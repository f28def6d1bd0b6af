package dataserver

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"

	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

func openStore(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := OpenStore(dir, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	return s
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// begin starts an upload of data and writes all of it in 100 KiB pieces.
func begin(t *testing.T, s *Store, owner, p string, data []byte) *Upload {
	t.Helper()
	u, err := s.BeginUpload(owner, "", p, uint64(len(data)))
	if err != nil {
		t.Fatalf("begin upload %s: %v", p, err)
	}
	for off := 0; off < len(data); off += 100 << 10 {
		if err := u.Write(data[off:min(off+100<<10, len(data))]); err != nil {
			t.Fatalf("write %s at %d: %v", p, off, err)
		}
	}
	return u
}

func put(t *testing.T, s *Store, owner, p string, data []byte) *datav1.FileInfo {
	t.Helper()
	sum := sha256.Sum256(data)
	info, err := begin(t, s, owner, p, data).Commit(uint64(len(data)), sum[:])
	if err != nil {
		t.Fatalf("commit %s: %v", p, err)
	}
	return info
}

func read(t *testing.T, s *Store, caller, owner, p string) []byte {
	t.Helper()
	f, _, err := s.Open(caller, owner, p)
	if err != nil {
		t.Fatalf("open %s/%s as %s: %v", owner, p, caller, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func paths(t *testing.T, s *Store, caller, owner, prefix string) []string {
	t.Helper()
	files, next, err := s.List(caller, owner, prefix, "", 1<<20)
	if err != nil {
		t.Fatalf("list %q as %s: %v", prefix, caller, err)
	}
	if next != "" {
		t.Fatalf("one page expected, got next %q", next)
	}
	var ps []string
	for _, f := range files {
		ps = append(ps, f.Path)
	}
	return ps
}

func tmpEntries(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.tmpDir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestDataStoreUploadIsAtomic(t *testing.T) {
	s := openStore(t, t.TempDir())
	data := randomBytes(1, 3<<20+17)
	u := begin(t, s, "alice", "in/video.raw", data)
	if _, err := s.Stat("alice", "", "in/video.raw"); !errdefs.IsNotFound(err) {
		t.Fatalf("stat before commit: %v, want NotFound", err)
	}
	if ps := paths(t, s, "alice", "", ""); len(ps) != 0 {
		t.Fatalf("listed before commit: %v", ps)
	}
	sum := sha256.Sum256(data)
	info, err := u.Commit(uint64(len(data)), sum[:])
	if err != nil {
		t.Fatal(err)
	}
	if info.Owner != "alice" || info.Path != "in/video.raw" || info.Size != uint64(len(data)) || !bytes.Equal(info.Sha256, sum[:]) {
		t.Fatalf("info %v", info)
	}
	if got := read(t, s, "alice", "", "in/video.raw"); !bytes.Equal(got, data) {
		t.Fatal("content differs")
	}
	st, err := s.Stat("alice", "alice", "in/video.raw")
	if err != nil || !bytes.Equal(st.Sha256, sum[:]) || st.ModifiedUnixNano == 0 {
		t.Fatalf("stat %v %v", st, err)
	}
	if e := tmpEntries(t, s); len(e) != 0 {
		t.Fatalf("staging left: %v", e)
	}
	if _, err := u.Commit(uint64(len(data)), sum[:]); err == nil {
		t.Fatal("a second commit succeeded")
	}

	// Replacing a file: a reader that opened the old version keeps it.
	f, _, err := s.Open("alice", "", "in/video.raw")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	put(t, s, "alice", "in/video.raw", []byte("new"))
	old, _ := io.ReadAll(f)
	if !bytes.Equal(old, data) {
		t.Fatal("an open reader saw the replacement")
	}
	if got := read(t, s, "alice", "", "in/video.raw"); string(got) != "new" {
		t.Fatalf("after replace: %q", got)
	}
}

func TestDataStoreEmptyFile(t *testing.T) {
	s := openStore(t, t.TempDir())
	info := put(t, s, "alice", "empty", nil)
	if info.Size != 0 {
		t.Fatalf("size %d", info.Size)
	}
	if got := read(t, s, "alice", "", "empty"); len(got) != 0 {
		t.Fatalf("content %q", got)
	}
}

func TestDataStoreInterruptedUploadLeavesNothing(t *testing.T) {
	s := openStore(t, t.TempDir())
	u := begin(t, s, "alice", "out/result", randomBytes(2, 1<<20))
	u.Abort()
	u.Abort() // twice is fine
	if _, err := s.Stat("alice", "", "out/result"); !errdefs.IsNotFound(err) {
		t.Fatalf("stat after abort: %v", err)
	}
	if e := tmpEntries(t, s); len(e) != 0 {
		t.Fatalf("staging left: %v", e)
	}
	if err := u.Write([]byte("x")); err == nil {
		t.Fatal("write after abort succeeded")
	}
}

func TestDataStoreChecksumMismatch(t *testing.T) {
	s := openStore(t, t.TempDir())
	data := randomBytes(3, 300<<10)
	sum := sha256.Sum256(data)
	bad := sum
	bad[0] ^= 1
	put(t, s, "alice", "kept", []byte("old version"))
	for _, c := range []struct {
		name string
		path string
		size uint64
		sum  []byte
	}{
		{"wrong digest", "new", uint64(len(data)), bad[:]},
		{"wrong size", "new", uint64(len(data)) + 1, sum[:]},
		{"wrong digest over an existing file", "kept", uint64(len(data)), bad[:]},
	} {
		u := begin(t, s, "alice", c.path, data)
		_, err := u.Commit(c.size, c.sum)
		if !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("%s: %v, want DataLoss", c.name, err)
		}
		if e := tmpEntries(t, s); len(e) != 0 {
			t.Fatalf("%s: staging left: %v", c.name, e)
		}
	}
	if _, err := s.Stat("alice", "", "new"); !errdefs.IsNotFound(err) {
		t.Fatalf("a file with a bad digest is visible: %v", err)
	}
	if got := read(t, s, "alice", "", "kept"); string(got) != "old version" {
		t.Fatalf("a failed upload changed the old version: %q", got)
	}
}

func TestDataStoreStagingCleanedAtReopen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	u := begin(t, s, "alice", "half", randomBytes(4, 1<<20))
	// A crash: the upload is never committed nor aborted.
	_ = u
	if len(tmpEntries(t, s)) != 1 {
		t.Fatal("no staging file during the upload")
	}
	s2 := openStore(t, dir)
	if e := tmpEntries(t, s2); len(e) != 0 {
		t.Fatalf("staging left after reopen: %v", e)
	}
	if _, err := s2.Stat("alice", "", "half"); !errdefs.IsNotFound(err) {
		t.Fatalf("stat: %v", err)
	}
	u.Abort()
}

func TestDataStoreOwnersAndGrants(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	put(t, s, "alice", "shared/a", []byte("a"))
	put(t, s, "alice", "shared/sub/b", []byte("b"))
	put(t, s, "alice", "shared-not/c", []byte("c"))
	put(t, s, "alice", "secret", []byte("s"))
	put(t, s, "bob", "mine", []byte("m"))

	// Owners are sharded: alice's files live under her own directory.
	if _, err := os.Stat(filepath.Join(s.filesRoot("alice"), "shared", "sub", "b")); err != nil {
		t.Fatal(err)
	}
	if ps := paths(t, s, "bob", "", ""); len(ps) != 1 || ps[0] != "mine" {
		t.Fatalf("bob sees %v", ps)
	}
	for _, op := range []func() error{
		func() error { _, err := s.Stat("bob", "alice", "secret"); return err },
		func() error { _, err := s.Stat("bob", "alice", "nonexistent"); return err },
		func() error { _, _, err := s.List("bob", "alice", "", "", 10); return err },
		func() error { return s.Delete("bob", "alice", "secret") },
		func() error { _, err := s.BeginUpload("bob", "alice", "x", 0); return err },
	} {
		if err := op(); !errdefs.IsPermissionDenied(err) {
			t.Fatalf("%v, want PermissionDenied", err)
		}
	}

	if err := s.Grant("alice", "bob", "shared/"); err != nil {
		t.Fatal(err)
	}
	if err := s.Grant("alice", "bob", "shared"); err != nil { // the same grant: no-op
		t.Fatal(err)
	}
	if err := s.Grant("alice", "alice", ""); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("self grant: %v", err)
	}
	if got := read(t, s, "bob", "alice", "shared/sub/b"); string(got) != "b" {
		t.Fatalf("shared read %q", got)
	}
	for _, p := range []string{"secret", "shared-not/c"} {
		if _, err := s.Stat("bob", "alice", p); !errdefs.IsPermissionDenied(err) {
			t.Fatalf("%s: %v, want PermissionDenied", p, err)
		}
	}
	if ps := paths(t, s, "bob", "alice", ""); fmt.Sprint(ps) != "[shared/a shared/sub/b]" {
		t.Fatalf("bob lists %v of alice's files", ps)
	}
	if err := s.Delete("bob", "alice", "shared/a"); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("a grant allowed a delete: %v", err)
	}
	given, received := s.Grants("alice")
	if len(given) != 1 || len(received) != 0 || given[0].Prefix != "shared" || given[0].Grantee != "bob" {
		t.Fatalf("grants %v %v", given, received)
	}

	// Grants survive a restart.
	s = openStore(t, dir)
	if _, received := s.Grants("bob"); len(received) != 1 {
		t.Fatalf("bob received %v after reopen", received)
	}
	if err := s.Revoke("alice", "bob", "shared"); err != nil {
		t.Fatal(err)
	}
	if err := s.Revoke("alice", "bob", "shared"); !errdefs.IsNotFound(err) {
		t.Fatalf("second revoke: %v", err)
	}
	if _, err := s.Stat("bob", "alice", "shared/a"); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("after revoke: %v", err)
	}
	if err := s.Grant("alice", "bob", ""); err != nil {
		t.Fatal(err)
	}
	if ps := paths(t, s, "bob", "alice", ""); len(ps) != 4 {
		t.Fatalf("a grant of everything shows %v", ps)
	}
}

func TestDataGrantCovers(t *testing.T) {
	for _, c := range []struct {
		prefix, path string
		want         bool
	}{
		{"", "x", true}, {"in", "in", true}, {"in", "in/x", true}, {"in", "input", false},
		{"in/a", "in/a/b/c", true}, {"in/a", "in/ab", false}, {"in/a", "in", false},
	} {
		if got := Covers(c.prefix, c.path); got != c.want {
			t.Errorf("Covers(%q, %q) = %v", c.prefix, c.path, got)
		}
	}
}

func TestDataStoreFileAndDirectoryConflict(t *testing.T) {
	s := openStore(t, t.TempDir())
	put(t, s, "alice", "a", []byte("file"))
	put(t, s, "alice", "c/d", []byte("file"))
	for _, p := range []string{"a/b", "a/b/c", "c"} {
		sum := sha256.Sum256(nil)
		_, err := begin(t, s, "alice", p, nil).Commit(0, sum[:])
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("%s: %v, want FailedPrecondition", p, err)
		}
	}
	if e := tmpEntries(t, s); len(e) != 0 {
		t.Fatalf("staging left: %v", e)
	}
}

func TestDataStoreDelete(t *testing.T) {
	s := openStore(t, t.TempDir())
	put(t, s, "alice", "x/y/z", []byte("1"))
	put(t, s, "alice", "x/keep", []byte("2"))
	if err := s.Delete("alice", "", "x/y"); !errdefs.IsNotFound(err) {
		t.Fatalf("delete a directory: %v", err)
	}
	if err := s.Delete("alice", "alice", "x/y/z"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.filesRoot("alice"), "x", "y")); !os.IsNotExist(err) {
		t.Fatalf("empty directory kept: %v", err)
	}
	if _, err := s.Stat("alice", "", "x/keep"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"x/y/z", "nope", "x/keep/deeper"} {
		if err := s.Delete("alice", "", p); !errdefs.IsNotFound(err) {
			t.Fatalf("delete %s: %v, want NotFound", p, err)
		}
		if _, err := s.Stat("alice", "", p); !errdefs.IsNotFound(err) {
			t.Fatalf("stat %s: %v, want NotFound", p, err)
		}
	}
	// "x" became a file-free directory only when its last file goes.
	if err := s.Delete("alice", "", "x/keep"); err != nil {
		t.Fatal(err)
	}
	put(t, s, "alice", "x", []byte("now a file"))
}

func TestDataStoreListPagesAndPrefixes(t *testing.T) {
	s := openStore(t, t.TempDir())
	var all []string
	for i := range 23 {
		p := fmt.Sprintf("logs/%d/part-%02d", 2020+i%4, i)
		put(t, s, "alice", p, []byte(p))
		all = append(all, p)
	}
	put(t, s, "alice", "logs-old", nil)
	put(t, s, "alice", "logsx/y", nil)
	var got []string
	after := ""
	for pages := 0; ; pages++ {
		files, next, err := s.List("alice", "", "logs/", after, 5)
		if err != nil {
			t.Fatal(err)
		}
		if pages > 5 || len(files) > 5 {
			t.Fatalf("page %d: %d files", pages, len(files))
		}
		for _, f := range files {
			got = append(got, f.Path)
		}
		if next == "" {
			break
		}
		after = next
	}
	if len(got) != len(all) {
		t.Fatalf("paged list: %d files, want %d", len(got), len(all))
	}
	for i := 1; i < len(got); i++ {
		if got[i-1] >= got[i] {
			t.Fatalf("not sorted: %v", got)
		}
	}
	// A prefix matches strings, not whole components.
	if ps := paths(t, s, "alice", "", "logs/202"); len(ps) != 23 {
		t.Fatalf("logs/202: %d files", len(ps))
	}
	if ps := paths(t, s, "alice", "", "logs"); len(ps) != 25 {
		t.Fatalf("logs: %d files", len(ps))
	}
	if ps := paths(t, s, "alice", "", "logs/2021/"); len(ps) != 6 {
		t.Fatalf("logs/2021/: %v", ps)
	}
	if ps := paths(t, s, "alice", "", "nothing/here"); len(ps) != 0 {
		t.Fatalf("nothing/here: %v", ps)
	}
	if ps := paths(t, s, "alice", "", "logs-old/x"); len(ps) != 0 { // a file where a directory is asked
		t.Fatalf("logs-old/x: %v", ps)
	}
}

// A file put into the store without the digest attribute (copied in by a
// tool that drops attributes) is hashed on first use.
func TestDataStoreRestoresMissingDigest(t *testing.T) {
	s := openStore(t, t.TempDir())
	put(t, s, "alice", "f", []byte("x"))
	p := s.local("alice", "f")
	if err := os.WriteFile(p+".new", []byte("by hand"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p+".new", p); err != nil {
		t.Fatal(err)
	}
	info, err := s.Stat("alice", "", "f")
	if err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256([]byte("by hand")); !bytes.Equal(info.Sha256, want[:]) {
		t.Fatal("wrong digest")
	}
}

func TestDataStoreMaxFileSize(t *testing.T) {
	s := openStore(t, t.TempDir())
	s.MaxFileSize = 10
	if _, err := s.BeginUpload("alice", "", "big", 11); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("size hint over the limit: %v", err)
	}
	u, err := s.BeginUpload("alice", "", "big", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Abort()
	if err := u.Write(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	if err := u.Write([]byte{1}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("write over the limit: %v", err)
	}
}

// Concurrent uploads, replacements, reads and deletes of overlapping paths
// (run with -race): every read sees one whole version.
func TestDataStoreConcurrent(t *testing.T) {
	s := openStore(t, t.TempDir())
	versions := map[[32]byte]bool{}
	var data [][]byte
	for i := range 4 {
		d := randomBytes(uint64(10+i), 64<<10+i)
		data = append(data, d)
		versions[sha256.Sum256(d)] = true
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			for range 40 {
				p := fmt.Sprintf("d%d/f%d", r.IntN(3), r.IntN(3))
				switch r.IntN(4) {
				case 0, 1:
					d := data[r.IntN(len(data))]
					sum := sha256.Sum256(d)
					u, err := s.BeginUpload("alice", "", p, 0)
					if err != nil {
						t.Error(err)
						return
					}
					if err := u.Write(d); err != nil {
						t.Error(err)
						return
					}
					if _, err := u.Commit(uint64(len(d)), sum[:]); err != nil {
						t.Error(err)
						return
					}
				case 2:
					if err := s.Delete("alice", "", p); err != nil && !errdefs.IsNotFound(err) {
						t.Error(err)
						return
					}
				case 3:
					f, info, err := s.Open("alice", "", p)
					if errdefs.IsNotFound(err) {
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					b, err := io.ReadAll(f)
					f.Close()
					if err != nil || !versions[sha256.Sum256(b)] || uint64(len(b)) != info.Size {
						t.Errorf("%s: read %d bytes that are no whole version (%v)", p, len(b), err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if _, _, err := s.List("alice", "", "", "", 100); err != nil {
		t.Fatal(err)
	}
}
