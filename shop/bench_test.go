package shop_test

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/internal/testutil"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// BenchmarkCreateVMOverhead measures what the shop adds to a plant's own
// clone time: CreateVM through the shop (matching, auction in etcd, record
// keeping) minus the plant's ready time in the classad. Real grid, real
// guests (warm plants after the first VM).
// Run: go test -run '^$' -bench CreateVMOverhead -benchtime 10x ./shop/
func BenchmarkCreateVMOverhead(b *testing.B) {
	testutil.NeedQEMU(b)
	ctx := context.Background()
	g, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(b), Plants: 2, Golden: "tiny", AgentPath: testutil.GuestAgent(b), NoFsync: true, Insecure: true, Logger: zap.NewNop()})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	c := shopClient(b, g.Shop.Addr(), g.Token)
	var over, total []time.Duration
	for i := 0; i < b.N+1; i++ {
		start := time.Now()
		ad, err := createVM(ctx, c, &shopv1.CreateVMRequest{RequestId: fmt.Sprint("bench", i)})
		if err != nil {
			b.Fatal(err)
		}
		took := time.Since(start)
		if i > 0 { // the first one warms the plants' caches
			total = append(total, took)
			over = append(over, took-time.Duration(ad.ReadyNanos))
		}
		if _, err := c.DestroyVM(ctx, &shopv1.DestroyVMRequest{VmId: ad.VmId}); err != nil {
			b.Fatal(err)
		}
	}
	sort.Slice(over, func(i, j int) bool { return over[i] < over[j] })
	sort.Slice(total, func(i, j int) bool { return total[i] < total[j] })
	b.ReportMetric(float64(over[len(over)/2].Microseconds())/1000, "overhead-p50-ms")
	b.ReportMetric(float64(over[len(over)-1].Microseconds())/1000, "overhead-max-ms")
	b.ReportMetric(float64(total[len(total)/2].Microseconds())/1000, "create-p50-ms")
}
