package imagebuild

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestAptMirrorDeb822(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, filepath.Join(dir, "a.sources"), `# security first: not the archive
Types: deb
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm

Types: deb
# a comment inside the stanza
URIs: http://mirror.invalid/debian/
Suites: bookworm bookworm-updates
Components: main
`)
	setAptPaths(t, dir, filepath.Join(dir, "none.list"))
	got, err := AptMirror()
	if err != nil {
		t.Fatal(err)
	}
	if got != "http://mirror.invalid/debian" {
		t.Fatalf("AptMirror = %q", got)
	}
}

func TestAptMirrorOneLine(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "sources.list")
	writeTestFile(t, list, `deb [signed-by=/k.gpg arch=amd64] http://sec.invalid/ bookworm-security main
# deb http://commented.invalid/debian bookworm main
deb http://line.invalid/debian bookworm main contrib
`)
	setAptPaths(t, filepath.Join(dir, "nothing"), list)
	got, err := AptMirror()
	if err != nil {
		t.Fatal(err)
	}
	if got != "http://line.invalid/debian" {
		t.Fatalf("AptMirror = %q", got)
	}
	setAptPaths(t, filepath.Join(dir, "nothing"), filepath.Join(dir, "missing"))
	if _, err := AptMirror(); !errors.Is(err, ErrNoMirror) {
		t.Fatalf("no sources: err = %v, want ErrNoMirror", err)
	}
}

func TestBootstrapKey(t *testing.T) {
	a := Bootstrap{Suite: "bookworm", Variant: "minbase", Packages: []string{"b", "a", "a", " "}, Version: "1"}
	b := Bootstrap{Suite: "bookworm", Variant: "minbase", Packages: []string{"a", "b"}, Version: "1"}
	if a.Key() != b.Key() {
		t.Fatal("key depends on package order or duplicates")
	}
	for _, other := range []Bootstrap{
		{Suite: "trixie", Variant: "minbase", Packages: []string{"a", "b"}, Version: "1"},
		{Suite: "bookworm", Variant: "", Packages: []string{"a", "b"}, Version: "1"},
		{Suite: "bookworm", Variant: "minbase", Packages: []string{"a"}, Version: "1"},
		{Suite: "bookworm", Variant: "minbase", Packages: []string{"a", "b"}, Version: "2"},
	} {
		if other.Key() == a.Key() {
			t.Fatalf("%+v has the same key as %+v", other, a)
		}
	}
}

// TestBootstrapUnknownPackage: a name that is not in the archive fails at
// once, before debootstrap runs (it would download the base system first).
func TestBootstrapUnknownPackage(t *testing.T) {
	if hostCodename() != "bookworm" {
		t.Skip("the check runs against this machine's apt lists, which are not bookworm's")
	}
	b := Bootstrap{Suite: "bookworm", Variant: "minbase", Packages: []string{"iproute2", "no-such-package-vmgrid"}, CacheDir: t.TempDir()}
	_, err := b.Tarball(context.Background())
	if !errors.Is(err, ErrUnknownPackage) {
		t.Fatalf("err = %v, want ErrUnknownPackage", err)
	}
	t.Log(err)
	if _, serr := os.Stat(b.TarballPath()); serr == nil {
		t.Fatal("a tarball was left behind")
	}
	bad := Bootstrap{Suite: "bookworm", Packages: []string{"Bad Name"}}
	if err := bad.Validate(context.Background()); !errors.Is(err, ErrUnknownPackage) {
		t.Fatalf("malformed name: err = %v", err)
	}
}

func setAptPaths(t *testing.T, dir, list string) {
	t.Helper()
	oldDir, oldList := aptSourcesDir, aptSourcesList
	aptSourcesDir, aptSourcesList = dir, list
	t.Cleanup(func() { aptSourcesDir, aptSourcesList = oldDir, oldList })
}

func writeTestFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}
