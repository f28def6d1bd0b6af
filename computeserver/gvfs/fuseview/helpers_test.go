package fuseview_test

import (
	"os"
	"testing"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		childMain(mode) // a compute server of crash_test.go
		return
	}
	gvfstest.Main(m)
}
