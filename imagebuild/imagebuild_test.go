package imagebuild

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// These tests use the real tools (apt, dpkg, mkfs.ext4, debugfs, busybox)
// and the real kernel package. The kernel cache is DefaultCacheDir(), shared
// between test runs and packages, so a machine downloads the package once.

func requireTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"apt-get", "dpkg", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: install deploy/packages.txt (deploy/setup.sh)", tool)
		}
	}
}

func fetchKernel(t *testing.T) *Kernel {
	t.Helper()
	requireTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := (&KernelSource{Logger: zaptest.NewLogger(t)}).Fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestKernelFetchUsesCache(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	src := &KernelSource{Logger: zaptest.NewLogger(t)}
	start := time.Now()
	k1, err := src.Fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	start = time.Now()
	k2, err := src.Fetch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	second := time.Since(start)
	t.Logf("fetch %s=%s: first %v (cached=%v), second %v", k1.Package, k1.Version, first, k1.Cached, second)
	if !k2.Cached || k2.Root != k1.Root {
		t.Fatalf("second fetch did not come from the cache: %+v vs %+v", k2, k1)
	}
	if !strings.HasPrefix(k1.Package, "linux-image-") || !strings.HasSuffix(k1.Vmlinuz, "vmlinuz-"+k1.Release) {
		t.Fatalf("unexpected kernel %+v", k1)
	}
	if second > 500*time.Millisecond {
		t.Errorf("a cached fetch took %v; it should not call apt", second)
	}
}

// Several builders racing on an empty cache extract the package once and
// all get the same complete tree.
func TestKernelCacheConcurrentBuilders(t *testing.T) {
	shared := fetchKernel(t)
	sharedSrc := &KernelSource{}
	cache := t.TempDir()
	// Seed the new cache with the downloaded package and the resolution so
	// the test does not hit the network or apt-cache.
	debs, _ := filepath.Glob(filepath.Join(sharedSrc.dir(), "debs", pathSafe(shared.Package+"_"+shared.Version)+"_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("shared cache holds %d .deb for %s", len(debs), shared.Package)
	}
	src := &KernelSource{CacheDir: cache}
	if err := os.MkdirAll(filepath.Join(src.dir(), "debs"), 0o755); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(src.dir(), "debs", filepath.Base(debs[0]))
	if err := os.Link(debs[0], dst); err != nil {
		if err := copyFile(debs[0], dst, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	memo, err := os.ReadFile(filepath.Join(sharedSrc.dir(), "resolved.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src.dir(), "resolved.json"), memo, 0o644); err != nil {
		t.Fatal(err)
	}

	const n = 4
	var wg sync.WaitGroup
	kernels := make([]*Kernel, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kernels[i], errs[i] = (&KernelSource{CacheDir: cache}).Fetch(context.Background())
		}()
	}
	wg.Wait()
	extracted := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if !kernels[i].Cached {
			extracted++
		}
		if kernels[i].Root != kernels[0].Root {
			t.Fatalf("builders disagree: %s vs %s", kernels[i].Root, kernels[0].Root)
		}
	}
	if extracted != 1 {
		t.Fatalf("package extracted %d times, want once", extracted)
	}
	if left, _ := filepath.Glob(filepath.Join(src.dir(), ".extract-*")); len(left) != 0 {
		t.Fatalf("temporary directories left behind: %v", left)
	}
}

func TestModulesDependencyOrder(t *testing.T) {
	k := fetchKernel(t)
	mods, err := k.Modules(TinyModules...)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	var names []string
	for i, m := range mods {
		pos[m.Name] = i
		names = append(names, m.Name)
	}
	t.Logf("load order: %s", strings.Join(names, " "))
	for _, want := range TinyModules {
		if _, ok := pos[want]; !ok {
			t.Errorf("module %s missing from %v", want, names)
		}
	}
	for _, m := range mods {
		for _, d := range m.Depends {
			if p, ok := pos[d]; ok && p > pos[m.Name] {
				t.Errorf("%s loads before its dependency %s", m.Name, d)
			}
		}
	}
	// Built-in drivers need no loading; unknown ones are an error.
	if mods, err := k.Modules("nvme", "ext4"); err != nil || len(mods) != 0 {
		t.Errorf("built-in modules: got %v, %v; want none", mods, err)
	}
	if _, err := k.Modules("no_such_module"); err == nil {
		t.Error("an unknown module was accepted")
	}
}

func TestTinyBuildTwiceUsesCache(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	extra := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(extra, []byte("#!/bin/sh\necho agent\n"), 0o750); err != nil {
		t.Fatal(err)
	}
	recipe := &Tiny{
		Logger:     zaptest.NewLogger(t),
		Hook:       "echo hello from the hook\n",
		ExtraFiles: map[string]string{"/usr/local/bin/agent": extra},
	}
	var took [2]time.Duration
	var imgs [2]*Image
	for i := range 2 {
		start := time.Now()
		img, err := recipe.Build(ctx, filepath.Join(t.TempDir(), "tiny"))
		if err != nil {
			t.Fatal(err)
		}
		took[i], imgs[i] = time.Since(start), img
	}
	t.Logf("tiny build: first %v, second %v (kernel %s)", took[0], took[1], imgs[0].KernelRelease)
	if took[1] > 5*time.Second {
		t.Errorf("second build took %v: the kernel cache was not used", took[1])
	}
	img := imgs[1]
	if img.Cmdline != TinyCmdline || img.Attributes.MemoryMiB != 256 || img.Attributes.VCPUs != 1 || img.Attributes.Arch != "x86_64" {
		t.Errorf("unexpected image description %+v", img)
	}
	if fi, err := os.Stat(img.Kernel); err != nil || fi.Size() < 1<<20 {
		t.Fatalf("kernel %s: %v", img.Kernel, err)
	}
	if fi, err := os.Stat(img.RootDisk); err != nil || fi.Size() != 256<<20 {
		t.Fatalf("root disk %s: size %v, %v", img.RootDisk, fi, err)
	}
	back, err := ReadManifest(filepath.Dir(img.RootDisk))
	if err != nil || back.RootDisk != img.RootDisk || back.Kernel != img.Kernel || len(back.Modules) != len(img.Modules) {
		t.Fatalf("manifest round trip: %+v, %v", back, err)
	}

	// The disk is a clean ext4 file system with the userland in it.
	if out, err := exec.Command("e2fsck", "-fn", img.RootDisk).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	debugfs := func(req string) string {
		out, err := exec.Command("debugfs", "-R", req, img.RootDisk).CombinedOutput()
		if err != nil {
			t.Fatalf("debugfs -R %q: %v\n%s", req, err, out)
		}
		return string(out)
	}
	root := debugfs("ls -p /")
	for _, name := range []string{"/bin/", "/sbin/", "/dev/", "/etc/", "/proc/", "/lib/"} {
		if !strings.Contains(root, strings.Trim(name, "/")) {
			t.Errorf("root directory lacks %s:\n%s", name, root)
		}
	}
	if s := debugfs("stat /bin/busybox"); !strings.Contains(s, "Type: regular") {
		t.Errorf("/bin/busybox is not a regular file:\n%s", s)
	}
	if s := debugfs("stat /bin/sh"); !strings.Contains(s, "Type: symlink") || !strings.Contains(s, "/bin/busybox") {
		t.Errorf("/bin/sh is not a busybox applet link:\n%s", s)
	}
	init := debugfs("cat /sbin/init")
	for _, want := range []string{ReadyMarker, "mount -t devtmpfs", "insmod /lib/modules/" + img.KernelRelease + "/kernel/drivers/virtio/virtio_ring.ko", HookPath, "poweroff -f"} {
		if !strings.Contains(init, want) {
			t.Errorf("/sbin/init lacks %q:\n%s", want, init)
		}
	}
	if s := debugfs("cat " + HookPath); !strings.Contains(s, "hello from the hook") {
		t.Errorf("hook not installed: %s", s)
	}
	if s := debugfs("cat /usr/local/bin/agent"); !strings.Contains(s, "echo agent") {
		t.Errorf("extra file not installed: %s", s)
	}
	for path, want := range map[string]string{"/dev/console": "number: 05:01", "/dev/null": "number: 01:03"} {
		s := debugfs("stat " + path)
		if !strings.Contains(s, "Type: character special") || !strings.Contains(s, want) {
			t.Errorf("%s is not the character device %s:\n%s", path, want, s)
		}
	}
	if s := debugfs("ls -p /lib/modules/" + img.KernelRelease + "/kernel/drivers/virtio"); !strings.Contains(s, "virtio_pci.ko") {
		t.Errorf("modules not installed:\n%s", s)
	}
}

// cpioEntries lists the names and modes of a newc archive.
func cpioEntries(t *testing.T, path string) map[string]uint32 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]uint32{}
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad cpio header at %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+namesize-1])
		if name == "TRAILER!!!" {
			return entries
		}
		entries[name] = uint32(mode)
		off = align(align(off+110+namesize) + size)
	}
}

func TestTinyInitramfs(t *testing.T) {
	requireTools(t)
	img, err := (&Tiny{}).Build(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	entries := cpioEntries(t, img.Initrd)
	want := map[string]uint32{
		"init":        0o100755,
		"bin/busybox": 0o100755,
		"bin/sh":      0o120777,
		"newroot":     0o040755,
		"dev/console": 0o020600,
		"dev/null":    0o020666,
		"lib/modules/" + img.KernelRelease + "/kernel/drivers/block/virtio_blk.ko": 0o100644,
	}
	for name, mode := range want {
		if got, ok := entries[name]; !ok || got != mode {
			t.Errorf("initramfs entry %s: mode %o (present %v), want %o", name, got, ok, mode)
		}
	}
	// Reproducible: the same inputs give the same bytes.
	img2, err := (&Tiny{}).Build(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(img.Initrd)
	b, _ := os.ReadFile(img2.Initrd)
	if !bytes.Equal(a, b) {
		t.Error("two builds gave different initramfs bytes")
	}
	if img.RootInterface != RootVirtio || !strings.Contains(img.Cmdline, "root=/dev/vda") {
		t.Errorf("default root: %s, %q", img.RootInterface, img.Cmdline)
	}
	nvme, err := (&Tiny{Root: RootNVMe, Quiet: true}).Build(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if nvme.Cmdline != TinyCmdlineNVMe+" quiet" || nvme.RootInterface != RootNVMe {
		t.Errorf("NVMe root: %s, %q", nvme.RootInterface, nvme.Cmdline)
	}
}

func TestTinyInitLoadsDependenciesFirst(t *testing.T) {
	mods := []Module{
		{Name: "virtio_ring", RelPath: "kernel/drivers/virtio/virtio_ring.ko"},
		{Name: "virtio", RelPath: "kernel/drivers/virtio/virtio.ko", Depends: []string{"virtio_ring"}},
	}
	s := tinyInit("6.1.0-test", mods)
	a := strings.Index(s, "insmod /lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko")
	b := strings.Index(s, "insmod /lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko")
	m := strings.Index(s, ReadyMarker)
	d := strings.Index(s, "mount -t devtmpfs")
	if d < 0 || a < d || b < a || m < b {
		t.Fatalf("init does not mount devtmpfs, load modules in order, then print the marker:\n%s", s)
	}
	s = tinyInitramfsInit("6.1.0-test", mods)
	a = strings.Index(s, "insmod /lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko")
	b = strings.Index(s, "insmod /lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko")
	d = strings.Index(s, "mount -t devtmpfs")
	sw := strings.Index(s, "exec switch_root /newroot")
	if d < 0 || a < d || b < a || sw < b {
		t.Fatalf("initramfs init does not mount devtmpfs, load modules in order, then switch root:\n%s", s)
	}
}
