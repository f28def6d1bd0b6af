//go:build faults

package faults

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// kill9Plant kills a plant running a VM while a persistent disk is written
// through its FUSE view and VMs are created through the shop: the shop
// marks the VM LOST within seconds, the restarted plant serves (over the
// dead mount) and stops the QEMUs it left, and every write acknowledged
// through the view is there afterwards.
func (g *grid) kill9Plant(t *testing.T) {
	p := g.plants[0]
	c := g.shopClient(ownerToken)
	ic := imageclient.NewClient(g.dial(g.images.addr, operatorToken))
	w := &diskWrites{path: filepath.Join(p.mnt, g.persistentDisk(t, ic, "kill9-pd"))}
	vm := g.vmOn(t, c, p.spec.Name)
	before := qemusUnder(p.spec.DataDir)
	if len(before) == 0 {
		t.Fatalf("no QEMU of %s runs under %s", vm, p.spec.DataDir)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := newVMLoad("kill9-plant")
	var lp loop
	lp.start(ctx, 30*time.Second, l.op(c))
	w.start(t)
	time.Sleep(1500 * time.Millisecond)
	p.kill9()
	killed := time.Now()
	w.waitStopped(t, 10*time.Second)

	waitFor(t, 30*time.Second, "the shop to mark the VM of the dead plant LOST", func() bool {
		ad, err := c.GetVM(ctx, &shopv1.GetVMRequest{VmId: vm})
		return err == nil && ad.GetState() == computev1.VMState_VM_STATE_LOST
	})
	t.Logf("plant killed: its VM LOST after %v", time.Since(killed).Round(100*time.Millisecond))

	restart := time.Now()
	p.restart() // fails the test unless it serves within a minute
	t.Logf("the plant serves again %v after its restart", time.Since(restart).Round(100*time.Millisecond))
	g.stillServing(t, p)
	waitFor(t, 20*time.Second, "the QEMUs of the killed plant to go", func() bool { return len(alive(before)) == 0 })
	if bad := killLeftovers(alive(before)); len(bad) > 0 {
		t.Errorf("unkillable QEMUs after the plant's restart: %v", bad)
	}
	cancel()
	lp.wait()

	lost := w.verify(t)
	writesAcked.Add(int64(len(w.acked)))
	writesLost.Add(int64(lost))
	t.Logf("persistent disk: %d writes acknowledged through the view before the kill, %d lost", len(w.acked), lost)
	if len(w.acked) == 0 {
		t.Error("no write was acknowledged before the kill")
	}
	g.waitPlants(2, 30*time.Second)
	if _, err := c.DestroyVM(context.Background(), &shopv1.DestroyVMRequest{VmId: vm}); err != nil {
		t.Errorf("destroy the lost VM: %v", err)
	}
	acked, vlost := l.verify(t, c)
	writesAcked.Add(int64(acked))
	writesLost.Add(int64(vlost))
	survived(t)
}

// stillServing checks that a restarted plant still serves, with no pause:
// the lost VM is destroyed through the shop as soon as the plant is
// registered again (the shop must reach a plant that is back at once). One
// that stopped on its own is reported and started once more, so the suite
// goes on with a whole grid.
func (g *grid) stillServing(t *testing.T, p *plant) {
	if p.running() && healthy(p.addr) == nil {
		return
	}
	p.mu.Lock()
	err := p.waitErr
	p.mu.Unlock()
	t.Errorf("the plant restarted after kill -9 stopped serving on its own (exit: %v)", err)
	if !p.running() {
		p.restart()
	}
}

// alive are the pids of pids still running.
func alive(pids []int) []int {
	var out []int
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil && !zombie(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// vmOn creates VMs through the shop until one lands on plant (the others
// are destroyed) and returns its id.
func (g *grid) vmOn(t *testing.T, c shopv1.ShopServiceClient, plant string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var others []string
	defer func() {
		for _, id := range others {
			_, _ = c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: id})
		}
	}()
	for i := range 6 {
		ad, err := createVM(ctx, c, tinyVM("on-"+plant+"-"+string(rune('a'+i))))
		if err != nil {
			t.Fatal(err)
		}
		if ad.GetPlant() == plant {
			return ad.GetVmId()
		}
		others = append(others, ad.GetVmId())
	}
	t.Fatalf("no VM landed on %s in 6 tries", plant)
	return ""
}

// persistentDisk creates a persistent disk of 16 MiB and returns the path
// of its file below a plant's view.
func (g *grid) persistentDisk(t *testing.T, c *imageclient.Client, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := filepath.Join(g.sub("disks"), name+".raw")
	if err := os.WriteFile(src, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Publish(ctx, imageclient.PublishSpec{Name: name + "-src", Files: []imageclient.PublishFile{
		{Name: "disk.raw", Path: src, Kind: imagev1.FileKind_FILE_KIND_DISK}}}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.API.CreateDisk(ctx, &imagev1.CreateDiskRequest{Name: name, SourceImage: name + "-src", SourceFile: "disk.raw"}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(name, "disk.raw")
}

// diskWrites writes 4 KiB blocks, each once, through a FUSE view (write
// then fsync: acknowledged) until a write fails.
type diskWrites struct {
	path  string
	mu    sync.Mutex
	acked map[int64][]byte
	err   error
	done  chan struct{}
}

func (w *diskWrites) start(t *testing.T) {
	f, err := os.OpenFile(w.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("open the disk through the view: %v", err)
	}
	w.acked, w.done = map[int64][]byte{}, make(chan struct{})
	go func() {
		defer close(w.done)
		defer f.Close()
		rng := rand.New(rand.NewPCG(5, 5))
		for off := int64(0); off < 16<<20; off += 4096 {
			b := make([]byte, 4096)
			for i := range b {
				b[i] = byte(rng.Uint32() | 1)
			}
			if _, err := f.WriteAt(b, off); err != nil {
				w.err = err
				return
			}
			if err := f.Sync(); err != nil {
				w.err = err
				return
			}
			w.mu.Lock()
			w.acked[off] = b
			w.mu.Unlock()
		}
	}()
}

// waitStopped waits for the writer to notice the dead view.
func (w *diskWrites) waitStopped(t *testing.T, d time.Duration) {
	select {
	case <-w.done:
		t.Logf("the writer stopped on the dead view: %v", w.err)
	case <-time.After(d):
		t.Fatalf("a write through the dead view did not return in %v", d)
	}
}

// verify reads each acknowledged block back through the (new) view.
func (w *diskWrites) verify(t *testing.T) (lost int) {
	f, err := os.Open(w.path)
	if err != nil {
		t.Fatalf("open the disk through the restarted view: %v", err)
	}
	defer f.Close()
	b := make([]byte, 4096)
	for off, want := range w.acked {
		if _, err := f.ReadAt(b, off); err != nil || !bytes.Equal(b, want) {
			lost++
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d acknowledged writes are not on the disk after the plant's restart", lost, len(w.acked))
	}
	return lost
}
