package imagebuild

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/services"
	"go.uber.org/zap"
)

// DefaultKernelPackage is Debian's meta package that always depends on the
// current cloud kernel (virtio, NVMe and ext4 support, few drivers).
const DefaultKernelPackage = "linux-image-cloud-amd64"

// aptListsDir holds the package indexes apt-cache answers from; its state is
// the key under which a resolution is remembered.
var aptListsDir = "/var/lib/apt/lists"

// imagePackage matches a concrete kernel image package
// (linux-image-6.1.0-56-cloud-amd64), as opposed to a meta package.
var imagePackage = regexp.MustCompile(`^linux-image-[0-9]`)

// KernelSource fetches a Debian kernel image package and keeps it extracted
// in a cache directory, one directory per package version:
//
//	CacheDir/kernels/debs/<pkg>_<version>_<arch>.deb   the package as downloaded
//	CacheDir/kernels/<pkg>_<version>/                  dpkg -x of it (boot/, lib/modules/)
//	CacheDir/kernels/resolved.json                     meta package → version, per apt index state
//	CacheDir/kernels/.lock                             flock held while downloading or extracting
//
// Concurrent builders (goroutines or processes) are safe: the download and
// the extraction happen under the lock, into a temporary directory that is
// renamed into place when complete.
type KernelSource struct {
	// CacheDir is the cache root; empty means DefaultCacheDir().
	CacheDir string
	// Package is a meta package (followed to the linux-image-<release>
	// package it depends on) or a concrete image package. Empty means
	// DefaultKernelPackage.
	Package string
	// Logger receives progress; nil logs nothing.
	Logger *zap.Logger
}

// Kernel is an extracted kernel package.
type Kernel struct {
	Package string `json:"package"` // linux-image-6.1.0-56-cloud-amd64
	Version string `json:"version"` // 6.1.192-2 (Debian package version)
	Release string `json:"release"` // 6.1.0-56-cloud-amd64 (uname -r)
	// Root is the extracted package tree.
	Root string `json:"root"`
	// Vmlinuz is the kernel image for QEMU's -kernel.
	Vmlinuz string `json:"vmlinuz"`
	// ModulesDir is Root/lib/modules/<Release>. It has no modules.dep
	// (depmod runs at install time, not in the package): use Modules to
	// resolve load order.
	ModulesDir string `json:"modules_dir"`
	// Cached reports that Fetch found the tree in the cache and neither
	// downloaded nor extracted anything.
	Cached bool `json:"-"`
}

func (s *KernelSource) log() *zap.Logger { return services.LoggerOr(s.Logger) }

func (s *KernelSource) dir() string {
	d := s.CacheDir
	if d == "" {
		d = DefaultCacheDir()
	}
	return filepath.Join(d, "kernels")
}

func (s *KernelSource) pkg() string {
	if s.Package == "" {
		return DefaultKernelPackage
	}
	return s.Package
}

// Fetch returns the current kernel of s.Package, downloading and extracting
// it only when this version is not in the cache yet.
func (s *KernelSource) Fetch(ctx context.Context) (*Kernel, error) {
	start := time.Now()
	dir := s.dir()
	if err := os.MkdirAll(filepath.Join(dir, "debs"), 0o755); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	pkg, version, err := s.resolve(ctx)
	if err != nil {
		return nil, err
	}
	final := filepath.Join(dir, pathSafe(pkg+"_"+version))
	if k, err := openKernel(final, pkg, version); err == nil {
		k.Cached = true
		s.log().Debug("kernel from cache", zap.String("package", pkg), zap.String("version", version), zap.Duration("took", time.Since(start)))
		return k, nil
	}

	unlock, err := lockFile(ctx, filepath.Join(dir, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Another builder may have finished while we waited for the lock.
	if k, err := openKernel(final, pkg, version); err == nil {
		k.Cached = true
		return k, nil
	}
	deb, err := s.download(ctx, pkg, version)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(dir, ".extract-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if _, err := run(ctx, "", "dpkg", "-x", deb, tmp); err != nil {
		return nil, fmt.Errorf("extract %s: %w", filepath.Base(deb), err)
	}
	if _, err := openKernel(tmp, pkg, version); err != nil {
		return nil, fmt.Errorf("package %s=%s: %w", pkg, version, err)
	}
	if err := publishDir(tmp, final); err != nil {
		return nil, fmt.Errorf("kernel cache: %w", err)
	}
	s.log().Info("kernel package extracted", zap.String("package", pkg), zap.String("version", version),
		zap.String("dir", final), zap.Duration("took", time.Since(start)))
	return openKernel(final, pkg, version)
}

// openKernel describes the extracted package tree at root, or fails when it
// is not (yet) one.
func openKernel(root, pkg, version string) (*Kernel, error) {
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(matches) != 1 {
		return nil, fmt.Errorf("no single boot/vmlinuz-* in %s (found %d)", root, len(matches))
	}
	release := strings.TrimPrefix(filepath.Base(matches[0]), "vmlinuz-")
	mods := filepath.Join(root, "lib", "modules", release)
	if fi, err := os.Stat(mods); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("no lib/modules/%s in %s", release, root)
	}
	return &Kernel{Package: pkg, Version: version, Release: release, Root: root, Vmlinuz: matches[0], ModulesDir: mods}, nil
}

// download returns the cached .deb of pkg=version, fetching it with
// apt-get download (and apt-get update once, when that fails) if needed.
// The caller holds the cache lock.
func (s *KernelSource) download(ctx context.Context, pkg, version string) (string, error) {
	debs := filepath.Join(s.dir(), "debs")
	if m, _ := filepath.Glob(filepath.Join(debs, pathSafe(pkg+"_"+version)+"_*.deb")); len(m) == 1 {
		return m[0], nil
	}
	tmp, err := os.MkdirTemp(s.dir(), ".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	start := time.Now()
	get := func() error {
		_, err := run(ctx, tmp, "apt-get", "download", "-q", pkg+"="+version)
		return err
	}
	if err := get(); err != nil {
		s.log().Info("apt-get download failed; updating the package lists", zap.Error(err))
		if uerr := aptUpdate(ctx); uerr != nil {
			return "", fmt.Errorf("download %s=%s: %w (apt-get update: %v)", pkg, version, err, uerr)
		}
		if err := get(); err != nil {
			return "", fmt.Errorf("download %s=%s: %w", pkg, version, err)
		}
	}
	m, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(m) != 1 {
		return "", fmt.Errorf("apt-get download %s=%s left %d .deb files", pkg, version, len(m))
	}
	final := filepath.Join(debs, filepath.Base(m[0]))
	if err := os.Rename(m[0], final); err != nil {
		return "", err
	}
	s.log().Info("kernel package downloaded", zap.String("file", final), zap.Duration("took", time.Since(start)))
	return final, nil
}

func aptUpdate(ctx context.Context) error {
	_, err := run(ctx, "", "apt-get", "update", "-qq")
	return err
}

// resolved is the memo of one resolution: apt-cache costs about a second
// per call (Debian's container images disable apt's binary cache), which
// would dominate a warm build.
type resolved struct {
	Package string `json:"package"`
	Version string `json:"version"`
	Lists   string `json:"lists"` // aptListsStamp at resolution time
}

// resolve finds the concrete image package and version that s.Package
// means today. The answer is remembered until the apt indexes change.
func (s *KernelSource) resolve(ctx context.Context) (pkg, version string, err error) {
	memo := filepath.Join(s.dir(), "resolved.json")
	stamp := aptListsStamp()
	memos := map[string]resolved{}
	if b, err := os.ReadFile(memo); err == nil {
		_ = json.Unmarshal(b, &memos)
	}
	if r, ok := memos[s.pkg()]; ok && stamp != "" && r.Lists == stamp {
		return r.Package, r.Version, nil
	}
	pkg, version, err = aptResolve(ctx, s.pkg())
	if err != nil {
		s.log().Info("apt-cache failed; updating the package lists", zap.Error(err))
		if uerr := aptUpdate(ctx); uerr != nil {
			return "", "", fmt.Errorf("resolve kernel package %s: %w (apt-get update: %v)", s.pkg(), err, uerr)
		}
		stamp = aptListsStamp()
		if pkg, version, err = aptResolve(ctx, s.pkg()); err != nil {
			return "", "", fmt.Errorf("resolve kernel package %s: %w", s.pkg(), err)
		}
	}
	memos[s.pkg()] = resolved{Package: pkg, Version: version, Lists: stamp}
	if b, err := json.Marshal(memos); err == nil {
		// Written whole and renamed: concurrent builders never read half a file.
		tmp := fmt.Sprintf("%s.%d.tmp", memo, os.Getpid())
		if os.WriteFile(tmp, b, 0o644) == nil {
			_ = os.Rename(tmp, memo)
		}
	}
	return pkg, version, nil
}

// aptResolve asks apt-cache for the candidate of name and, when name is a
// meta package, follows its dependency on a linux-image-<release> package.
func aptResolve(ctx context.Context, name string) (pkg, version string, err error) {
	fields, err := aptShow(ctx, name)
	if err != nil {
		return "", "", err
	}
	if imagePackage.MatchString(name) {
		return name, fields["Version"], nil
	}
	for _, dep := range strings.Split(fields["Depends"], ",") {
		// First alternative only: "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2) | other".
		dep = strings.TrimSpace(strings.Split(dep, "|")[0])
		depName, rest, _ := strings.Cut(dep, " ")
		if !imagePackage.MatchString(depName) {
			continue
		}
		if v, ok := strings.CutPrefix(strings.Trim(strings.TrimSpace(rest), "()"), "= "); ok {
			return depName, strings.TrimSpace(v), nil
		}
		return aptResolve(ctx, depName)
	}
	return "", "", fmt.Errorf("%s depends on no linux-image-<release> package (Depends: %q)", name, fields["Depends"])
}

// aptShow returns the control fields of the candidate version of name.
func aptShow(ctx context.Context, name string) (map[string]string, error) {
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return nil, err
	}
	fields := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break // first stanza only
		}
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, " ") {
			fields[k] = strings.TrimSpace(v)
		}
	}
	if fields["Version"] == "" {
		return nil, fmt.Errorf("apt-cache show %s: no candidate version", name)
	}
	return fields, nil
}

// aptListsStamp summarises the package indexes (names, sizes, mtimes): it
// changes whenever apt-get update fetches something new. Empty when there
// are no indexes (a fresh machine), which never matches a memo.
func aptListsStamp() string {
	entries, err := os.ReadDir(aptListsDir)
	if err != nil {
		return ""
	}
	h := sha256.New()
	n := 0
	for _, e := range entries {
		if !e.Type().IsRegular() || e.Name() == "lock" {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		fmt.Fprintf(h, "%s %d %d\n", e.Name(), fi.Size(), fi.ModTime().UnixNano())
		n++
	}
	if n == 0 {
		return ""
	}
	return hex.EncodeToString(h.Sum(nil))
}

// pathSafe turns a package version into a file name component the way apt
// names its archives (an epoch's colon becomes %3a).
func pathSafe(s string) string {
	return strings.NewReplacer(":", "%3a", "/", "_").Replace(s)
}
