package web_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/status"

	"github.com/vmgrid/vmgrid/deploy/grid"
	"github.com/vmgrid/vmgrid/internal/testutil"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services"
)

// Tokens the tests add to the grid's tokens file.
const (
	bobToken      = "bob-token-0001"
	operatorToken = "operator-token-0001"
)

// TestWeb starts one `vmgrid up` grid (two plants, the tiny golden image,
// QEMU guests) and tries its HTTP side: the JSON API with net/http, the
// events stream, and the dashboard in a real headless Chromium.
// httpc is the tests' HTTP client: it trusts the grid's CA.
var httpc = http.DefaultClient

func TestWeb(t *testing.T) {
	testutil.NeedQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	g, err := grid.Up(ctx, grid.Config{Dir: testutil.ShortTempDir(t), Plants: 2, Golden: "tiny", AgentPath: testutil.GuestAgent(t),
		NoFsync: true, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	tc, err := g.ClientTLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	httpc = &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
	appendTokens(t, g, bobToken+" bob", operatorToken+" ops operator")
	t.Run("HTTP/JSON API", func(t *testing.T) { testAPI(ctx, t, g) })
	t.Run("events", func(t *testing.T) { testEvents(ctx, t, g) })
	t.Run("dashboard in Chromium", func(t *testing.T) { testDashboard(ctx, t, g) })
}

func appendTokens(t *testing.T, g *grid.Grid, lines ...string) {
	t.Helper()
	f, err := os.OpenFile(g.TokensFile, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range lines {
		fmt.Fprintln(f, l)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // the shop rereads the tokens file within a second
}

// call sends an API request; it returns the status and the body.
func call(ctx context.Context, t *testing.T, method, url, token, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

// wantError checks an error answer: the status, and a message — at the
// top ({"code", "message"}) or, from a server stream that failed before
// its first message, in {"error": {…}}.
func wantError(t *testing.T, what string, status int, body []byte, wantStatus int) apiError {
	t.Helper()
	var e struct {
		apiError
		Error *apiError
	}
	if json.Unmarshal(body, &e) == nil && e.Error != nil {
		e.apiError = *e.Error
	}
	if status != wantStatus || e.Message == "" {
		t.Fatalf("%s: %d %s, want %d with a message", what, status, body, wantStatus)
	}
	return e.apiError
}

func testAPI(ctx context.Context, t *testing.T, g *grid.Grid) {
	base := strings.TrimSuffix(g.URL(), "/")
	st, body := call(ctx, t, "GET", base+"/v1/vms", "", "")
	wantError(t, "no token", st, body, http.StatusUnauthorized)

	// The same message as the gRPC call's.
	st, body = call(ctx, t, "POST", base+"/v1/vms", g.Token, `{"requestId": "not a valid id!"}`)
	e := wantError(t, "bad request id", st, body, http.StatusBadRequest)
	cc, err := services.Dial(g.Shop.Addr(), g.ClientTLS, services.WithToken(g.Token, g.ClientTLS))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stream, err := shopv1.NewShopServiceClient(cc).CreateVM(ctx, &shopv1.CreateVMRequest{RequestId: "not a valid id!"})
	if err == nil {
		_, err = stream.Recv()
	}
	if msg := status.Convert(err).Message(); msg != e.Message {
		t.Fatalf("HTTP says %q, gRPC %q", e.Message, msg)
	}

	id := createOverHTTP(ctx, t, base, g.Token, `{"requestId": "http-1", "networkDomain": "lab"}`)
	st, body = call(ctx, t, "GET", base+"/v1/vms/"+id, g.Token, "")
	var ad struct{ VmId, State, Plant, Owner string }
	if st != http.StatusOK || json.Unmarshal(body, &ad) != nil || ad.State != "VM_STATE_RUNNING" || ad.Owner != "demo" || ad.Plant == "" {
		t.Fatalf("GET: %d %s", st, body)
	}
	st, body = call(ctx, t, "GET", base+"/v1/vms", g.Token, "")
	var list struct{ Vms []struct{ VmId string } }
	if st != http.StatusOK || json.Unmarshal(body, &list) != nil || len(list.Vms) != 1 || list.Vms[0].VmId != id {
		t.Fatalf("list: %d %s", st, body)
	}
	st, body = call(ctx, t, "GET", base+"/v1/vms/"+id, bobToken, "")
	wantError(t, "another owner's VM", st, body, http.StatusForbidden)
	if st, body = call(ctx, t, "DELETE", base+"/v1/vms/"+id, g.Token, ""); st != http.StatusOK {
		t.Fatalf("DELETE: %d %s", st, body)
	}
	st, body = call(ctx, t, "DELETE", base+"/v1/vms/"+id, g.Token, "")
	wantError(t, "second DELETE", st, body, http.StatusNotFound)
	st, body = call(ctx, t, "GET", base+"/v1/tasks/no-such-task", g.Token, "")
	wantError(t, "unknown task", st, body, http.StatusNotFound)
}

// createOverHTTP creates a VM with POST /v1/vms and reads its progress,
// newline-delimited JSON, up to the classad; it returns the VM's id.
func createOverHTTP(ctx context.Context, t *testing.T, base, token, body string) string {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v1/vms", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("create: %d %s", resp.StatusCode, b)
	}
	var stages []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var m struct {
			Result *struct {
				Stage   string
				Classad *struct{ VmId, State string }
			}
			Error *apiError
		}
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil || m.Error != nil || m.Result == nil {
			t.Fatalf("create: %s (%v)", sc.Bytes(), err)
		}
		stages = append(stages, m.Result.Stage)
		if ad := m.Result.Classad; ad != nil {
			if ad.State != "VM_STATE_RUNNING" || len(stages) < 3 {
				t.Fatalf("create: %v after stages %v", ad, stages)
			}
			return ad.VmId
		}
	}
	t.Fatalf("create: the stream ended after %v: %v", stages, sc.Err())
	return ""
}
