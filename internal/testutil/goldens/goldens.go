// Package goldens builds golden images for tests once per machine: a real
// Debian golden image (debootstrap, systemd, sshd, the agent; booted,
// suspended) takes minutes, so every test that needs one shares the same
// build, kept in imagebuild.DefaultCacheDir()/goldens under a flock and
// keyed by everything that goes into it (recipe version, agent binary,
// kernel). The second test of a CI run takes it from the cache.
package goldens

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// cacheVersion is part of the key: bump it when the golden builder
// (computeserver/plant) changes what a golden image holds (the recipe has
// imagebuild.DebianImageVersion).
const cacheVersion = "2" // 2: golden images carry RAM as a file (plant/lazymem.go)

// Image is a built golden image on local disk, ready to publish.
type Image struct {
	Dir   string
	Attrs *imagev1.ImageAttributes
	Files []imageclient.PublishFile
	// Built is how long the build took (0 when it came from the cache).
	Built time.Duration
}

// manifest is Image on disk (paths relative to the directory).
type manifest struct {
	Attrs json.RawMessage           `json:"attrs"`
	Files []imageclient.PublishFile `json:"files"`
	Built time.Duration             `json:"built"`
}

// Debian returns the Debian golden image with the recipe's base packages
// only (the small set CI builds), building it if this machine has none.
func Debian(tb testing.TB) *Image {
	tb.Helper()
	testutil.NeedQEMU(tb)
	if _, err := exec.LookPath("debootstrap"); err != nil {
		tb.Skip("debootstrap is not installed (deploy/setup.sh installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	agent := testutil.GuestAgent(tb)
	k, err := (&imagebuild.KernelSource{}).Fetch(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	sum, err := fileSum(agent)
	if err != nil {
		tb.Fatal(err)
	}
	h := sha256.Sum256([]byte(cacheVersion + "\n" + imagebuild.DebianVersion + "/" + imagebuild.DebianImageVersion + "\n" + sum + "\n" + k.Package + "=" + k.Version))
	dir := filepath.Join(imagebuild.DefaultCacheDir(), "goldens", "debian-"+hex.EncodeToString(h[:8]))
	img, err := build(ctx, tb, dir, func(work string) (*plant.Golden, error) {
		return plant.BuildGolden(ctx, plant.GoldenOptions{
			Name: "debian", WorkDir: work, Driver: &vmm.QEMU{}, Logger: zaptest.NewLogger(tb),
			Recipe: &imagebuild.Debian{Agent: agent, Kernels: &imagebuild.KernelSource{}},
		})
	})
	if err != nil {
		tb.Fatal(err)
	}
	return img
}

// build returns the image cached in dir, or builds it with do in a short
// work directory (unix sockets) and moves it there, under dir's lock.
func build(ctx context.Context, tb testing.TB, dir string, do func(work string) (*plant.Golden, error)) (*Image, error) {
	if img, err := load(dir); err == nil {
		return img, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, err
	}
	unlock, err := lock(dir + ".lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	if img, err := load(dir); err == nil {
		return img, nil // another test binary built it while we waited
	}
	work, err := os.MkdirTemp(filepath.Dir(dir), ".build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	if len(work) > 60 {
		// Too long for the machine's unix sockets below it: build in /tmp.
		if work, err = os.MkdirTemp("", "vgdeb"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(work)
	}
	start := time.Now()
	g, err := do(work)
	if err != nil {
		return nil, err
	}
	took := time.Since(start)
	tb.Logf("golden image built in %s: %v", took.Round(time.Millisecond), g.Took)
	if err := save(work, g, took); err != nil {
		return nil, err
	}
	if err := os.Rename(work, dir); err != nil {
		if out, cerr := exec.Command("cp", "-a", "--sparse=always", work, dir).CombinedOutput(); cerr != nil {
			return nil, fmt.Errorf("keep the golden image: %w: %s", cerr, out)
		}
	}
	img, err := load(dir)
	if err == nil {
		img.Built = took
	}
	return img, err
}

func save(work string, g *plant.Golden, took time.Duration) error {
	attrs, err := protojson.Marshal(g.Attrs)
	if err != nil {
		return err
	}
	m := manifest{Attrs: attrs, Built: took}
	for _, f := range g.Files {
		rel, err := filepath.Rel(work, f.Path)
		if err != nil {
			return err
		}
		f.Path = rel
		m.Files = append(m.Files, f)
	}
	os.RemoveAll(filepath.Join(work, "m"))              // the build machine's sockets and logs
	os.Remove(filepath.Join(work, "files", "root.raw")) // the root as built; root.raw beside it has the boot folded in
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(work, "golden.json"), b, 0o644)
}

func load(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, "golden.json"))
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	img := &Image{Dir: dir, Attrs: &imagev1.ImageAttributes{}}
	if err := protojson.Unmarshal(m.Attrs, img.Attrs); err != nil {
		return nil, err
	}
	for _, f := range m.Files {
		f.Path = filepath.Join(dir, f.Path)
		if _, err := os.Stat(f.Path); err != nil {
			return nil, err
		}
		img.Files = append(img.Files, f)
	}
	return img, nil
}

// Publish uploads the image to an image server under name.
func (img *Image) Publish(ctx context.Context, cl *imageclient.Client, name string) error {
	_, err := cl.Publish(ctx, imageclient.PublishSpec{Name: name, Attributes: img.Attrs, Files: img.Files}, nil)
	return err
}

func lock(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

func fileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
