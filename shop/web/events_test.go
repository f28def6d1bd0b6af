package web_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/deploy/grid"
)

type sse struct {
	name string
	data json.RawMessage
}

// follow reads the events stream as token; events come on the channel
// until ctx ends.
func follow(ctx context.Context, t *testing.T, base, token string) <-chan sse {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "GET", base+"/v1/events", nil)
	req.Header.Set("Authorization", "bearer "+token) // any case of the scheme
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	ch := make(chan sse, 256)
	go func() {
		defer resp.Body.Close()
		defer close(ch)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 16<<20)
		var ev sse
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = json.RawMessage(strings.TrimPrefix(line, "data: "))
			case line == "":
				select {
				case ch <- ev:
				case <-ctx.Done():
					return
				}
				ev = sse{}
			}
		}
	}()
	return ch
}

type overview struct {
	Plants []struct{ Name string }
	VMs    []struct{ VmId, State, Owner string }
}

// until reads events until one satisfies ok.
func until(t *testing.T, ch <-chan sse, what string, ok func(sse) bool) {
	t.Helper()
	timeout := time.After(5 * time.Minute)
	for {
		select {
		case ev, open := <-ch:
			if !open {
				t.Fatalf("%s: the stream ended", what)
			}
			if ok(ev) {
				return
			}
		case <-timeout:
			t.Fatalf("%s: not seen", what)
		}
	}
}

func overviewHas(ev sse, vmID, state string) bool {
	var o overview
	if ev.name != "overview" || json.Unmarshal(ev.data, &o) != nil {
		return false
	}
	for _, vm := range o.VMs {
		if vm.VmId == vmID && (state == "" || vm.State == state) {
			return true
		}
	}
	return false
}

// Owners see their VMs in the stream, operators everyone's, other owners
// none of them; bids, the auction's winner and the plants' cache
// statistics come as they happen.
func testEvents(ctx context.Context, t *testing.T, g *grid.Grid) {
	base := strings.TrimSuffix(g.URL(), "/")
	if st, body := call(ctx, t, "GET", base+"/v1/events", "wrong-token-123", ""); st != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d %s", st, body)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	ops, bob := follow(sctx, t, base, operatorToken), follow(sctx, t, base, bobToken)
	until(t, ops, "an overview with both plants", func(ev sse) bool {
		var o overview
		return ev.name == "overview" && json.Unmarshal(ev.data, &o) == nil && len(o.Plants) == 2
	})
	id := createOverHTTP(ctx, t, base, g.Token, `{"requestId": "events-1"}`)
	var bid, won bool
	until(t, ops, "the VM running, its bids and its auction's winner", func(ev sse) bool {
		bid = bid || ev.name == "bid" && strings.Contains(string(ev.data), id)
		won = won || ev.name == "won" && strings.Contains(string(ev.data), id)
		return bid && won && overviewHas(ev, id, "VM_STATE_RUNNING")
	})
	until(t, ops, "cache statistics of a plant", func(ev sse) bool {
		return ev.name == "stats" && strings.Contains(string(ev.data), "fetchedBytes")
	})
	if st, body := call(ctx, t, "DELETE", base+"/v1/vms/"+id, g.Token, ""); st != http.StatusOK {
		t.Fatalf("DELETE: %d %s", st, body)
	}
	until(t, ops, "the VM gone", func(ev sse) bool { return ev.name == "overview" && !overviewHas(ev, id, "") })
	stop()
	for ev := range bob {
		if overviewHas(ev, id, "") {
			t.Fatalf("bob saw demo's VM: %s", ev.data)
		}
	}
}
