package gvfs_test

import (
	"testing"

	"github.com/vmgrid/vmgrid/computeserver/gvfs/internal/gvfstest"
)

func TestMain(m *testing.M) { gvfstest.Main(m) }
