package integration

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/internal/testutil"
)

func TestMain(m *testing.M) {
	// The CLI verbs the tests run (cache, image) call as the operator.
	os.Setenv("VMGRID_OPERATOR_TOKEN", testutil.OperatorToken)
	goleak.VerifyTestMain(m)
}

func start(t *testing.T) *testutil.Server { return testutil.StartServer(t, "") }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// writeFile writes b to a new file in the test's temporary directory.
func writeFile(t *testing.T, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// publish uploads local files as one image with the real client.
func publish(t *testing.T, c *imageclient.Client, spec imageclient.PublishSpec) {
	t.Helper()
	if _, err := c.Publish(ctxT(t), spec, nil); err != nil {
		t.Fatalf("publish %s: %v", spec.Name, err)
	}
}

// wantCode checks that err is the domain error is() recognizes and carries
// the gRPC code want, and that its message mentions each of words.
func wantCode(t *testing.T, err error, is func(error) bool, want codes.Code, words ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %v", want)
	}
	if got := status.Code(err); got != want {
		t.Fatalf("code %v (%v), want %v", got, err, want)
	}
	if is != nil && !is(err) {
		t.Fatalf("%v does not match its errdefs sentinel", err)
	}
	for _, w := range words {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("message %q does not mention %q", err, w)
		}
	}
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tmpEntries lists the store's directory of uploads in progress.
func tmpEntries(t *testing.T, s *testutil.Server) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.Dir, "tmp"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

type journalRec struct {
	block uint64
	data  []byte
}

// committedJournal encodes a WriteBlocks batch in the store's journal format
// (imageserver/disk.go): records [block u64][len u32][crc32c u32][data], then
// a trailer [^0 u64][count u32][0 u32], little endian.
func committedJournal(recs []journalRec) []byte {
	var b []byte
	tab := crc32.MakeTable(crc32.Castagnoli)
	for _, r := range recs {
		b = binary.LittleEndian.AppendUint64(b, r.block)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(r.data)))
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(r.data, tab))
		b = append(b, r.data...)
	}
	b = binary.LittleEndian.AppendUint64(b, ^uint64(0))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(recs)))
	return binary.LittleEndian.AppendUint32(b, 0)
}
