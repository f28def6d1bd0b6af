package plant

import (
	"context"
	"os"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/internal/testutil"
)

func needQEMU(t *testing.T) { testutil.NeedQEMU(t) }

func tinyRecipe(t *testing.T) *imagebuild.Tiny {
	return &imagebuild.Tiny{
		Hook:       GoldenHook,
		ExtraFiles: map[string]string{"/sbin/vmgrid-agent": testutil.GuestAgent(t)},
		Logger:     zaptest.NewLogger(t),
	}
}

func TestBuildGolden(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := testutil.ShortTempDir(t)
	g, err := BuildGolden(ctx, GoldenOptions{Name: "tiny", Recipe: tinyRecipe(t), WorkDir: dir, Driver: &vmm.QEMU{}, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range g.Files {
		st, err := os.Stat(f.Path)
		if err != nil || st.Size() == 0 {
			t.Fatalf("%s: %v", f.Name, err)
		}
		t.Logf("%s: %d bytes", f.Name, st.Size())
	}
	t.Logf("took %v", g.Took)
}
