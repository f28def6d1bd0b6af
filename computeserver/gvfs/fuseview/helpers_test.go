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

// The shared helpers under the names the tests have always used.
var (
	ctxT         = gvfstest.Ctx
	newProxy     = gvfstest.NewProxy
	closeProxy   = gvfstest.CloseProxy
	mount        = gvfstest.Mount
	isMounted    = gvfstest.IsMounted
	publish      = gvfstest.Publish
	writeSparse  = gvfstest.WriteSparse
	sparseData   = gvfstest.SparseData
	diskImage    = gvfstest.DiskImage
	fetchAll     = gvfstest.FetchAll
	readVia      = gvfstest.ReadVia
	firstDiff    = gvfstest.FirstDiff
	sameBytes    = gvfstest.SameBytes
	createDisk   = gvfstest.CreateDisk
	waitComplete = gvfstest.WaitComplete
)

type goldenFile = gvfstest.GoldenFile
