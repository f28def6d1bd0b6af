package web

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"time"

	"google.golang.org/protobuf/proto"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/auth"
)

const (
	// settle lets a burst of changes (one creation writes several records)
	// become one overview.
	settle    = 150 * time.Millisecond
	keepalive = 15 * time.Second
)

// events serves GET /v1/events (see the package doc).
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	c, err := s.cfg.Auth.HTTPCaller(r, auth.RoleOwner, auth.RoleOperator)
	if err != nil {
		writeError(w, err)
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	sub, history := s.hub.subscribe()
	defer s.hub.unsubscribe(sub)
	send := func(name string, data []byte) {
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", name, data)
		fl.Flush()
	}
	hello, _ := json.Marshal(map[string]string{"name": c.Name, "role": string(c.Role)})
	send("hello", hello)
	for _, b := range history {
		send("stats", b)
	}
	s.stream(r.Context(), c, sub, send)
}

// stream sends the caller's overview now and after every change, and
// what the hub broadcasts, until the client or the hub goes.
func (s *Server) stream(ctx context.Context, c auth.Caller, sub *subscriber, send func(string, []byte)) {
	ping := time.NewTicker(keepalive)
	defer ping.Stop()
	due := time.After(0)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.hub.done:
			return
		case <-sub.dirty:
			if due == nil {
				due = time.After(settle)
			}
		case <-due:
			due = nil
			b, err := s.overview(ctx, c)
			if err != nil {
				b, _ = json.Marshal(map[string]string{"message": err.Error()})
				send("problem", b)
				continue
			}
			send("overview", b)
		case ev := <-sub.events:
			send(ev.name, ev.data)
		case <-ping.C:
			send("ping", []byte("{}"))
		}
	}
}

// overview is the caller's overview as JSON: messages in the API's JSON.
func (s *Server) overview(ctx context.Context, c auth.Caller) ([]byte, error) {
	o, err := s.cfg.Source.Overview(ctx, c)
	if err != nil {
		return nil, err
	}
	out := struct {
		Plants []plantJSON       `json:"plants"`
		VMs    []json.RawMessage `json:"vms"`
		Tasks  []json.RawMessage `json:"tasks"`
		Images []json.RawMessage `json:"images"`
	}{Plants: s.plants(), VMs: []json.RawMessage{}, Tasks: []json.RawMessage{}, Images: []json.RawMessage{}}
	sort.Slice(o.VMs, func(i, j int) bool { return o.VMs[i].CreatedUnixNano < o.VMs[j].CreatedUnixNano })
	sort.Slice(o.Tasks, func(i, j int) bool { return o.Tasks[i].SubmittedUnixNano < o.Tasks[j].SubmittedUnixNano })
	for _, m := range o.VMs {
		out.VMs = appendJSON(out.VMs, m)
	}
	for _, m := range o.Tasks {
		out.Tasks = appendJSON(out.Tasks, m)
	}
	for _, m := range o.Images {
		out.Images = appendJSON(out.Images, compactImage(m))
	}
	return json.Marshal(out)
}

func appendJSON(to []json.RawMessage, m proto.Message) []json.RawMessage {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return to
	}
	return append(to, b)
}

// compactImage leaves out the per-block meta-data: a page needs sizes.
func compactImage(m *imagev1.Manifest) *imagev1.Manifest {
	m = proto.Clone(m).(*imagev1.Manifest)
	for _, f := range m.Files {
		f.ZeroMap, f.BlockDigests = nil, nil
	}
	return m
}

type plantJSON struct {
	Name          string            `json:"name"`
	Addr          string            `json:"addr"`
	Arch          string            `json:"arch"`
	MemoryMiB     uint64            `json:"memoryMib"`
	MemoryFreeMiB uint64            `json:"memoryFreeMib"`
	Running       int               `json:"running"`
	Domains       []string          `json:"domains"`
	Images        map[string]uint64 `json:"images"`
	Offer         float64           `json:"offer"`
	Won           int               `json:"won"`
	Draining      bool              `json:"draining,omitempty"`
}

func (s *Server) plants() []plantJSON {
	won := s.hub.wins()
	out := []plantJSON{}
	for _, p := range s.cfg.Source.Plants() {
		out = append(out, plantJSON{Name: p.Name, Addr: p.Addr, Arch: p.Arch, MemoryMiB: p.MemoryMiB, MemoryFreeMiB: p.MemoryFreeMiB,
			Running: p.Running, Domains: p.Domains, Images: p.Images, Offer: p.Offer, Won: won[p.Name], Draining: p.Draining})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
