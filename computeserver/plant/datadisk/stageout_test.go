package datadisk

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/vmgrid/vmgrid/services/errdefs"
)

// ext4Image makes an ext4 image of dir as a guest would leave it: mkfs -d
// fills it, and e2fsck -D indexes its big directories (htree), as the
// guest's kernel does while a directory grows.
func ext4Image(t *testing.T, dir string) string {
	t.Helper()
	mkfs, err := tool("mkfs.ext4")
	if err != nil {
		t.Skip(err)
	}
	e2fsck, err := tool("e2fsck")
	if err != nil {
		t.Skip(err)
	}
	img := filepath.Join(t.TempDir(), "data.raw")
	if out, err := exec.Command(mkfs, "-q", "-F", "-d", dir, "-O", "^has_journal", img, "128M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	// Exit status 1: the file system was changed (indexed), as asked.
	if out, err := exec.Command(e2fsck, "-fyD", img).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
			t.Fatalf("e2fsck -D: %v: %s", err, out)
		}
	}
	return img
}

// TestStageOutTenThousandFiles is issue 15 item 11: debugfs lists the
// unused (inode 0) slots of a grown directory, and stage-out took them for
// entries with an empty name ("2 of 10003 entries not uploaded: /out: name
// is required").
func TestStageOutTenThousandFiles(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, StageOutDir)
	if err := os.Mkdir(out, 0o777); err != nil {
		t.Fatal(err)
	}
	const n = 10000
	for i := range n {
		if err := os.WriteFile(filepath.Join(out, fmt.Sprintf("result-%05d.txt", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	x, err := newImageReader(ext4Image(t, dir))
	if err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	files, problems, err := x.walk(ctx, StageOutDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 || len(files) != n {
		t.Fatalf("%d files, %d problems (first: %v); want %d files, none", len(files), len(problems), problems[:min(len(problems), 1)], n)
	}
}

// TestStageOutErrorsHaveCodes: entries the guest left that cannot be
// staged out make a FailedPrecondition, not Unknown.
func TestStageOutErrorsHaveCodes(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, StageOutDir), 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, StageOutDir, "bad name"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := ext4Image(t, dir)
	_, err := StageOut(context.Background(), nil, img, "", "")
	if errdefs.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "bad name") {
		t.Fatalf("want FailedPrecondition naming the entry, got %v (%v)", err, errdefs.Code(err))
	}
	if _, err := StageOut(context.Background(), nil, img+".gone", "", ""); errdefs.Code(err) != codes.NotFound {
		t.Fatalf("missing disk: %v", err)
	}
}
