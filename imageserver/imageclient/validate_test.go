package imageclient_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// TestPublishRefusesUnknownEnums: kind=99 or policy=99 is refused as
// InvalidArgument naming the field, and nothing is stored (issue 15 item
// 10: both were stored in the manifest).
func TestPublishRefusesUnknownEnums(t *testing.T) {
	s := testutil.StartServer(t, "")
	src := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(src, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		file  imageclient.PublishFile
		field string
	}{
		{imageclient.PublishFile{Name: "f", Path: src, Kind: 99}, "files[0].kind"},
		{imageclient.PublishFile{Name: "f", Path: src, Kind: imagev1.FileKind_FILE_KIND_DISK, Policy: 99}, "files[0].policy"},
	} {
		_, err := s.Client.Publish(context.Background(), imageclient.PublishSpec{Name: "img", Files: []imageclient.PublishFile{c.file}}, nil)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%s: %v, want InvalidArgument naming %s", c.field, err, c.field)
		}
	}
	if got := s.Store.List(&imagev1.ListImagesRequest{}); len(got) != 0 {
		t.Fatalf("%d images stored", len(got))
	}
	_, err := s.Client.API.GetImage(context.Background(), &imagev1.GetImageRequest{Name: "img", View: 99})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "view") {
		t.Fatalf("GetImage view=99: %v, want InvalidArgument naming view", err)
	}
}
