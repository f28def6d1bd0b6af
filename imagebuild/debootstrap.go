package imagebuild

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vmgrid/vmgrid/services"
	"go.uber.org/zap"
)

// Where AptMirror looks; variables so tests can point them at fixtures.
var (
	aptSourcesDir  = "/etc/apt/sources.list.d"
	aptSourcesList = "/etc/apt/sources.list"
	osReleasePath  = "/etc/os-release"
)

// ErrNoMirror means the machine's apt sources name no Debian archive that
// debootstrap could use.
var ErrNoMirror = errors.New("no Debian mirror in the apt sources")

// ErrUnknownPackage means a package asked for is not in the archive.
var ErrUnknownPackage = errors.New("unknown package")

// AptMirror returns the Debian mirror URL of this machine's apt sources
// (deb822 /etc/apt/sources.list.d/*.sources `URIs:` or one-line
// /etc/apt/sources.list) — never a host written in code. It takes the first
// "deb" source that carries a release suite (bookworm, not
// bookworm-security or -updates): that is the archive debootstrap reads.
func AptMirror() (string, error) {
	var sources []aptSource
	files, _ := filepath.Glob(filepath.Join(aptSourcesDir, "*.sources"))
	slices.Sort(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sources = append(sources, parseDeb822(string(b))...)
	}
	if b, err := os.ReadFile(aptSourcesList); err == nil {
		sources = append(sources, parseOneLine(string(b))...)
	}
	for _, s := range sources {
		for _, suite := range s.suites {
			if !strings.Contains(suite, "-") && !strings.Contains(suite, "/") {
				return strings.TrimRight(s.uri, "/"), nil
			}
		}
	}
	return "", fmt.Errorf("%w (read %s/*.sources and %s)", ErrNoMirror, aptSourcesDir, aptSourcesList)
}

// aptSource is one binary ("deb") source: an archive URI and its suites.
type aptSource struct {
	uri    string
	suites []string
}

// parseDeb822 reads the stanzas of a .sources file (deb822: "Key: value"
// lines, blank lines between stanzas, "#" comments).
func parseDeb822(text string) []aptSource {
	var out []aptSource
	for _, stanza := range regexp.MustCompile(`\n\s*\n`).Split(text, -1) {
		fields := map[string]string{}
		for _, line := range strings.Split(stanza, "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "#") {
				continue
			}
			if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, " ") {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if !slices.Contains(strings.Fields(fields["types"]), "deb") || strings.EqualFold(fields["enabled"], "no") {
			continue
		}
		for _, uri := range strings.Fields(fields["uris"]) {
			out = append(out, aptSource{uri: uri, suites: strings.Fields(fields["suites"])})
		}
	}
	return out
}

// parseOneLine reads sources.list lines: "deb [options] URI suite comp...".
func parseOneLine(text string) []aptSource {
	var out []aptSource
	for _, line := range strings.Split(text, "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			// Options may hold spaces: skip to the word that closes them.
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) > 0 {
				f = f[1:]
			}
		}
		if len(f) >= 2 {
			out = append(out, aptSource{uri: f[0], suites: []string{f[1]}})
		}
	}
	return out
}

// Bootstrap is one debootstrap run, cached as a tarball:
//
//	CacheDir/debootstrap/debs/                 .debs shared by every run (debootstrap --cache-dir)
//	CacheDir/debootstrap/<suite>-<variant>-<key>.tar   the debootstrapped tree, numeric owners
//	CacheDir/debootstrap/.lock                 flock held while building
//
// A run needs root (debootstrap chroots and makes device nodes).
type Bootstrap struct {
	Suite    string   // "bookworm"
	Variant  string   // debootstrap --variant, e.g. "minbase"
	Packages []string // --include
	Mirror   string   // empty: AptMirror()
	CacheDir string   // empty: DefaultCacheDir()
	Version  string   // recipe version, part of the cache key
	Logger   *zap.Logger
}

func (b Bootstrap) log() *zap.Logger { return services.LoggerOr(b.Logger) }

func (b Bootstrap) dir() string {
	d := b.CacheDir
	if d == "" {
		d = DefaultCacheDir()
	}
	if abs, err := filepath.Abs(d); err == nil {
		d = abs // debootstrap --cache-dir wants an absolute path
	}
	return filepath.Join(d, "debootstrap")
}

// packages returns Packages sorted, without blanks and duplicates.
func (b Bootstrap) packages() []string {
	var out []string
	for _, p := range b.Packages {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Key is the cache key: suite, variant, the sorted package set and the
// recipe version. The mirror is not part of it: every mirror serves the
// same suite.
func (b Bootstrap) Key() string {
	h := sha256.New()
	fmt.Fprintf(h, "suite=%s\nvariant=%s\nversion=%s\n", b.Suite, b.Variant, b.Version)
	for _, p := range b.packages() {
		fmt.Fprintf(h, "package=%s\n", p)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// TarballPath is where Tarball keeps the result (it may not exist yet).
func (b Bootstrap) TarballPath() string {
	variant := b.Variant
	if variant == "" {
		variant = "default"
	}
	return filepath.Join(b.dir(), fmt.Sprintf("%s-%s-%s.tar", pathSafe(b.Suite), pathSafe(variant), b.Key()))
}

// packageName is what debootstrap --include accepts (Debian policy names).
var packageName = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)

// Validate checks the request before anything long happens: a suite, and
// package names that are well-formed and, when the suite is this machine's
// own release, known to its apt lists.
func (b Bootstrap) Validate(ctx context.Context) error {
	if b.Suite == "" || !packageName.MatchString(b.Suite) {
		return fmt.Errorf("debootstrap: invalid suite %q", b.Suite)
	}
	for _, p := range b.packages() {
		if !packageName.MatchString(p) {
			return fmt.Errorf("%w %q: not a Debian package name", ErrUnknownPackage, p)
		}
	}
	if hostCodename() != b.Suite || len(b.packages()) == 0 {
		return nil // the machine's lists describe another release; debootstrap will tell
	}
	missing, err := aptMissing(ctx, b.packages())
	if err != nil {
		b.log().Debug("cannot check packages against the apt lists", zap.Error(err))
		return nil
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s not in %s (apt-cache policy); check the names or run apt-get update",
			ErrUnknownPackage, strings.Join(missing, ", "), b.Suite)
	}
	return nil
}

// hostCodename is this machine's release (VERSION_CODENAME of os-release).
func hostCodename() string {
	b, err := os.ReadFile(osReleasePath)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VERSION_CODENAME="); ok {
			return strings.Trim(strings.TrimSpace(v), `"`)
		}
	}
	return ""
}

// aptMissing returns the names apt-cache knows no installable candidate for.
// One apt-cache policy call for all of them (each call costs about a second):
// it prints a "name:" stanza per known package and skips unknown ones.
func aptMissing(ctx context.Context, names []string) ([]string, error) {
	out, err := run(ctx, "", "apt-cache", append([]string{"policy"}, names...)...)
	if err != nil {
		return nil, err
	}
	candidate := map[string]bool{}
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, " ") && strings.HasSuffix(line, ":") {
			cur = strings.TrimSuffix(line, ":")
			cur, _, _ = strings.Cut(cur, ":") // name:amd64
			continue
		}
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate:"); ok && cur != "" {
			candidate[cur] = strings.TrimSpace(v) != "(none)"
		}
	}
	if len(candidate) == 0 {
		return nil, errors.New("apt-cache policy answered nothing (no package lists?)")
	}
	var missing []string
	for _, n := range names {
		if !candidate[n] {
			missing = append(missing, n)
		}
	}
	return missing, nil
}

// Tarball returns the path of the cached rootfs tarball (tar of the
// debootstrapped tree, numeric owners), building it under a file lock if it
// is missing; the key is suite+variant+sorted packages+version. .debs are
// shared between runs in CacheDir/debootstrap/debs (debootstrap --cache-dir)
// so a different package set downloads only what is new.
func (b Bootstrap) Tarball(ctx context.Context) (string, error) {
	final := b.TarballPath()
	if _, err := os.Stat(final); err == nil {
		b.log().Debug("debootstrap tarball from cache", zap.String("tarball", final))
		return final, nil
	}
	if err := b.Validate(ctx); err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Join(b.dir(), "debs"), 0o755); err != nil {
		return "", fmt.Errorf("debootstrap cache: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(b.dir(), ".lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final, nil // another builder finished while we waited
	}
	if err := b.build(ctx, final); err != nil {
		return "", err
	}
	return final, nil
}

// build runs debootstrap into a temporary directory and tars it to final
// (through a temporary name, renamed when complete). The caller holds the lock.
func (b Bootstrap) build(ctx context.Context, final string) error {
	if os.Geteuid() != 0 {
		return errors.New("debootstrap needs root (it chroots and makes device nodes); run the build as root")
	}
	mirror := b.Mirror
	if mirror == "" {
		m, err := AptMirror()
		if err != nil {
			return err
		}
		mirror = m
	}
	tmp, err := os.MkdirTemp(b.dir(), ".build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	target := filepath.Join(tmp, "root")
	start := time.Now()
	args := []string{"--cache-dir=" + filepath.Join(b.dir(), "debs")}
	if b.Variant != "" {
		args = append(args, "--variant="+b.Variant)
	}
	if pk := b.packages(); len(pk) > 0 {
		args = append(args, "--include="+strings.Join(pk, ","))
	}
	args = append(args, b.Suite, target, mirror)
	b.log().Info("debootstrap", zap.Strings("args", args))
	if _, err := run(ctx, "", "debootstrap", args...); err != nil {
		return b.explain(err, target)
	}
	// What apt and debootstrap leave behind is build-time state, not part of
	// the image: downloaded archives (kept in CacheDir/debs) and the lists.
	for _, g := range []string{"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_Packages", "var/lib/apt/lists/*Release*"} {
		m, _ := filepath.Glob(filepath.Join(target, g))
		for _, f := range m {
			_ = os.Remove(f)
		}
	}
	booted := time.Since(start)
	part := filepath.Join(tmp, "rootfs.tar")
	if _, err := run(ctx, "", "tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", part, "-C", target, "."); err != nil {
		return fmt.Errorf("tar the debootstrapped tree: %w", err)
	}
	if err := os.Rename(part, final); err != nil {
		return fmt.Errorf("debootstrap cache: %w", err)
	}
	fi, _ := os.Stat(final)
	b.log().Info("debootstrap tarball built", zap.String("tarball", final), zap.Duration("debootstrap", booted),
		zap.Duration("took", time.Since(start)), zap.Int64("bytes", fi.Size()))
	return nil
}

// couldntFind is debootstrap's complaint about --include names it cannot
// resolve ("E: Couldn't find these debs: foo bar").
var couldntFind = regexp.MustCompile(`Couldn't find these debs: ([^\n]*)`)

// explain turns a failed debootstrap into an error a person can act on:
// unknown packages named as such, else the tail of debootstrap's log.
func (b Bootstrap) explain(err error, target string) error {
	if m := couldntFind.FindStringSubmatch(err.Error()); m != nil {
		return fmt.Errorf("%w: %s (debootstrap of %s)", ErrUnknownPackage, strings.TrimSpace(m[1]), b.Suite)
	}
	if log, rerr := os.ReadFile(filepath.Join(target, "debootstrap", "debootstrap.log")); rerr == nil {
		return fmt.Errorf("%w; debootstrap.log: %s", err, tail(string(log), 1500))
	}
	return err
}

// Extract unpacks the tarball into dest (created), preserving owners, modes,
// devices, xattrs.
func (b Bootstrap) Extract(ctx context.Context, dest string) error {
	tarball, err := b.Tarball(ctx)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return err
	}
	if _, err := run(ctx, "", "tar", "--numeric-owner", "--same-owner", "--xattrs", "--xattrs-include=*",
		"-xpf", tarball, "-C", dest); err != nil {
		return fmt.Errorf("extract %s: %w", filepath.Base(tarball), err)
	}
	return nil
}
