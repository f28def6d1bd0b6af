//go:build faults

package faults

import (
	"context"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// kill -9 of each role under load, restarted on the same ports and
// directories.

func (g *grid) kill9DataServer(t *testing.T) {
	c := dataclient.NewClient(g.dial(g.data.addr, ownerToken))
	u := &uploads{acked: map[string][32]byte{}}
	var l loop
	underLoad(t, g.data, 1500*time.Millisecond, 500*time.Millisecond, time.Second, func(ctx context.Context) {
		for w := range 3 {
			l.start(ctx, 10*time.Second, u.op(c, "kill9/w"+string(rune('0'+w))))
		}
	})
	calls, errs := l.wait()
	lost := u.verify(t, c)
	writesAcked.Add(int64(len(u.acked)))
	writesLost.Add(int64(lost))
	t.Logf("data server: %d uploads (%d failed around the kill), %d acknowledged, %d lost", calls, errs, len(u.acked), lost)
	if len(u.acked) == 0 || errs == 0 {
		t.Errorf("the load did not straddle the kill: %d acknowledged, %d failed", len(u.acked), errs)
	}
	survived(t)
}

// kill9Images kills the image server while files are read from it and
// images are published; reads answer the same bytes and acknowledged
// publishes are complete afterwards.
func (g *grid) kill9Images(t *testing.T) {
	c := imageclient.NewClient(g.dial(g.images.addr, operatorToken))
	r := &reads{image: "tiny", file: goldenFile(t, c, imagev1.FileKind_FILE_KIND_KERNEL)}
	want, err := fileSum(context.Background(), c, r.image, r.file)
	if err != nil {
		t.Fatal(err)
	}
	r.want = want
	p := newPublishes(t, g.sub("publish"))
	var l loop
	underLoad(t, g.images, 1500*time.Millisecond, 500*time.Millisecond, 1500*time.Millisecond, func(ctx context.Context) {
		l.start(ctx, 20*time.Second, r.op(c))
		l.start(ctx, 20*time.Second, p.op(c))
	})
	calls, errs := l.wait()
	lost := p.verify(t, c)
	writesAcked.Add(int64(len(p.acked)))
	writesLost.Add(int64(lost))
	t.Logf("image server: %d calls (%d failed around the kill), %d good reads, %d wrong; %d publishes acknowledged, %d lost",
		calls, errs, r.good, r.wrong, len(p.acked), lost)
	if r.wrong > 0 || r.good == 0 || errs == 0 {
		t.Errorf("reads: %d good, %d wrong, %d failed", r.good, r.wrong, errs)
	}
	survived(t)
}

// kill9Proxy kills the cache proxy while files are read through it.
func (g *grid) kill9Proxy(t *testing.T) {
	c := imageclient.NewClient(g.dial(g.proxy.addr, operatorToken))
	direct := imageclient.NewClient(g.dial(g.images.addr, operatorToken))
	r := &reads{image: "tiny", file: goldenFile(t, direct, imagev1.FileKind_FILE_KIND_MEMORY_STATE)}
	want, err := fileSum(context.Background(), direct, r.image, r.file)
	if err != nil {
		t.Fatal(err)
	}
	r.want = want
	var l loop
	underLoad(t, g.proxy, 1500*time.Millisecond, 500*time.Millisecond, 1500*time.Millisecond, func(ctx context.Context) {
		l.start(ctx, 20*time.Second, r.op(c))
		l.start(ctx, 20*time.Second, r.op(c))
	})
	calls, errs := l.wait()
	t.Logf("cache proxy: %d reads (%d failed around the kill), %d good, %d wrong", calls, errs, r.good, r.wrong)
	if r.wrong > 0 || r.good == 0 {
		t.Errorf("reads through the proxy: %d good, %d wrong", r.good, r.wrong)
	}
	// After the restart the proxy answers at once, from its cache or upstream.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if s, err := fileSum(ctx, c, r.image, r.file); err != nil || s != want {
		t.Errorf("a read through the restarted proxy: %v (right bytes: %v)", err, s == want)
	}
	survived(t)
}

// kill9Shop kills the shop while VMs are created, read and destroyed.
func (g *grid) kill9Shop(t *testing.T) {
	c := g.shopClient(ownerToken)
	l := newVMLoad("kill9-shop")
	var lp loop
	underLoad(t, g.shop, 2*time.Second, 500*time.Millisecond, 2*time.Second, func(ctx context.Context) {
		lp.start(ctx, 30*time.Second, l.op(c))
	})
	calls, errs := lp.wait()
	acked, lost := l.verify(t, c)
	writesAcked.Add(int64(acked))
	writesLost.Add(int64(lost))
	t.Logf("shop: %d create/get/destroy rounds (%d cut off), %d acknowledged operations checked, %d lost, %d retried",
		calls, errs, acked, lost, len(l.pending))
	if acked == 0 {
		t.Error("nothing was acknowledged around the kill")
	}
	survived(t)
}
