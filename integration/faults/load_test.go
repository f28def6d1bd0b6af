//go:build faults

package faults

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Client loads that run while a role is killed, and what they were told.

// loop runs op until ctx ends, every op bounded by a timeout, and counts
// the calls and the failures.
type loop struct {
	wg          sync.WaitGroup
	mu          sync.Mutex
	calls, errs int
}

func (l *loop) start(ctx context.Context, timeout time.Duration, op func(context.Context, int) error) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			octx, cancel := context.WithTimeout(ctx, timeout)
			err := op(octx, i)
			cancel()
			l.mu.Lock()
			l.calls++
			if err != nil {
				l.errs++
			}
			l.mu.Unlock()
			if err != nil {
				time.Sleep(50 * time.Millisecond) // a dead server refuses at once
			}
		}
	}()
}

func (l *loop) wait() (calls, errs int) {
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls, l.errs
}

// underLoad runs the loads, kills p with SIGKILL after warm, restarts it
// after down and lets the loads run for after more.
func underLoad(t *testing.T, p *proc, warm, down, after time.Duration, start func(ctx context.Context)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	start(ctx)
	time.Sleep(warm)
	p.kill9()
	time.Sleep(down)
	p.restart()
	time.Sleep(after)
	cancel()
}

// --- data server: uploads acknowledged must be there with their digest

type uploads struct {
	mu    sync.Mutex
	acked map[string][32]byte
}

func (u *uploads) op(c *dataclient.Client, prefix string) func(context.Context, int) error {
	return func(ctx context.Context, i int) error {
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		b := make([]byte, 1+rng.IntN(256<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		path := fmt.Sprintf("%s/f%05d", prefix, i)
		if _, err := c.UploadReader(ctx, bytes.NewReader(b), int64(len(b)), path, nil); err != nil {
			return err
		}
		u.mu.Lock()
		u.acked[path] = sha256.Sum256(b)
		u.mu.Unlock()
		return nil
	}
}

// verify reads back every acknowledged upload; it returns the lost ones.
func (u *uploads) verify(t *testing.T, c *dataclient.Client) (lost int) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for path, sum := range u.acked {
		var buf bytes.Buffer
		_, err := c.ReadRange(ctx, path, 0, 0, &buf)
		if err != nil || sha256.Sum256(buf.Bytes()) != sum {
			t.Errorf("acknowledged upload %s: %v (digest ok: %v)", path, err, err == nil && sha256.Sum256(buf.Bytes()) == sum)
			lost++
		}
	}
	return lost
}

// --- image server and cache proxy: reads must answer the same bytes

// fileSum reads a whole file through FetchFile.
func fileSum(ctx context.Context, c *imageclient.Client, image, file string) ([32]byte, error) {
	h := sha256.New()
	var next uint64
	err := c.FetchFile(ctx, image, file, 0, 0, func(off uint64, n uint32, data []byte) error {
		if off != next {
			return fmt.Errorf("chunk at %d, want %d", off, next)
		}
		if data == nil {
			data = make([]byte, n) // a zero chunk
		}
		h.Write(data)
		next = off + uint64(n)
		return nil
	})
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s, err
}

// goldenFile is a file of the golden image "tiny" of the given kind.
func goldenFile(t *testing.T, c *imageclient.Client, kind imagev1.FileKind) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := c.API.GetImage(ctx, &imagev1.GetImageRequest{Name: "tiny"})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range m.GetManifest().GetFiles() {
		if f.GetKind() == kind {
			return f.GetName()
		}
	}
	t.Fatalf("tiny has no %v file", kind)
	return ""
}

// reads checks every read answered after the fault against the sum before.
type reads struct {
	mu          sync.Mutex
	good, wrong int
	image, file string
	want        [32]byte
}

func (r *reads) op(c *imageclient.Client) func(context.Context, int) error {
	return func(ctx context.Context, _ int) error {
		s, err := fileSum(ctx, c, r.image, r.file)
		if err != nil {
			return err
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if s != r.want {
			r.wrong++
			return fmt.Errorf("%s/%s: wrong bytes", r.image, r.file)
		}
		r.good++
		return nil
	}
}

// --- the shop: VMs acknowledged must be there, destroys must hold, and
// requests cut off are answered when retried with their request id

type vmLoad struct {
	prefix    string
	mu        sync.Mutex
	live      map[string]string // request id → VM id, created and not destroyed
	destroyed map[string]string // request id → VM id, destroyed (acknowledged)
	pending   map[string]bool   // request ids with no answer
}

func newVMLoad(prefix string) *vmLoad {
	return &vmLoad{prefix: prefix, live: map[string]string{}, destroyed: map[string]string{}, pending: map[string]bool{}}
}

// op creates a VM, reads it back and destroys three of four.
func (l *vmLoad) op(c shopv1.ShopServiceClient) func(context.Context, int) error {
	return func(ctx context.Context, i int) error {
		id := fmt.Sprintf("%s-%03d", l.prefix, i)
		l.set(func() { l.pending[id] = true })
		ad, err := createVM(ctx, c, tinyVM(id))
		if err != nil {
			return err
		}
		vm := ad.GetVmId()
		l.set(func() { delete(l.pending, id); l.live[id] = vm })
		if _, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: vm}); err != nil {
			return err
		}
		if i%4 == 1 {
			return nil
		}
		if _, err := c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: vm}); err != nil {
			return err
		}
		l.set(func() { delete(l.live, id); l.destroyed[id] = vm })
		return nil
	}
}

func (l *vmLoad) set(f func()) { l.mu.Lock(); f(); l.mu.Unlock() }

// verify checks what the load was told, retries what it was not told and
// destroys every VM it made. It returns the acknowledged operations and
// those lost.
func (l *vmLoad) verify(t *testing.T, c shopv1.ShopServiceClient) (acked, lost int) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for id, vm := range l.live {
		acked++
		if _, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: vm}); err != nil {
			t.Errorf("VM %s (request %s) created and acknowledged: %v", vm, id, err)
			lost++
		}
	}
	for id, vm := range l.destroyed {
		acked++
		if _, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: vm}); !errdefs.IsNotFound(err) {
			t.Errorf("VM %s (request %s) destroyed and acknowledged: GetVM answers %v, want NotFound", vm, id, err)
			lost++
		}
	}
	l.destroyAll(ctx, t, c)
	for id := range l.pending {
		ad, err := createVM(ctx, c, tinyVM(id))
		if err != nil {
			t.Errorf("request %s, cut off by the fault, retried with its request id: %v", id, err)
			continue
		}
		l.live[id] = ad.GetVmId()
		l.destroyAll(ctx, t, c)
	}
	return acked, lost
}

func (l *vmLoad) destroyAll(ctx context.Context, t *testing.T, c shopv1.ShopServiceClient) {
	for id, vm := range l.live {
		if _, err := c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: vm}); err != nil {
			t.Errorf("destroy %s (request %s): %v", vm, id, err)
		}
		delete(l.live, id)
	}
}

// --- publishes: an acknowledged image is complete after the fault

type publishes struct {
	dir   string
	mu    sync.Mutex
	acked map[string][32]byte // image → sum of its one file
}

func newPublishes(t *testing.T, dir string) *publishes {
	return &publishes{dir: dir, acked: map[string][32]byte{}}
}

func (p *publishes) op(c *imageclient.Client) func(context.Context, int) error {
	return func(ctx context.Context, i int) error {
		rng := rand.New(rand.NewPCG(uint64(i), 11))
		b := make([]byte, 4096+rng.IntN(512<<10))
		for j := range b {
			b[j] = byte(rng.Uint32() | 1)
		}
		path := filepath.Join(p.dir, fmt.Sprintf("cfg%04d", i))
		if err := os.WriteFile(path, b, 0o644); err != nil {
			return err
		}
		name := fmt.Sprintf("kill9-pub-%04d", i)
		_, err := c.Publish(ctx, imageclient.PublishSpec{Name: name, Files: []imageclient.PublishFile{
			{Name: "app.conf", Path: path, Kind: imagev1.FileKind_FILE_KIND_CONFIG}}}, nil)
		if err != nil {
			return err
		}
		p.mu.Lock()
		p.acked[name] = sha256.Sum256(b)
		p.mu.Unlock()
		return nil
	}
}

// verify reads every acknowledged image back, and deletes the images.
func (p *publishes) verify(t *testing.T, c *imageclient.Client) (lost int) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for name, sum := range p.acked {
		if s, err := fileSum(ctx, c, name, "app.conf"); err != nil || s != sum {
			t.Errorf("acknowledged image %s: %v (right bytes: %v)", name, err, s == sum)
			lost++
		}
	}
	list, err := c.API.ListImages(ctx, &imagev1.ListImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range list.GetImages() {
		if strings.HasPrefix(m.GetName(), "kill9-pub-") {
			_, _ = c.API.DeleteImage(ctx, &imagev1.DeleteImageRequest{Name: m.GetName()})
		}
	}
	return lost
}
