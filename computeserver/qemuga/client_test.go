package qemuga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// fakeGA answers like qemu-ga (a unit test of the protocol layer; the real
// qemu-ga is exercised by the plant's tests under QEMU). It first sends a
// stale answer, as a port reopened mid-exchange would.
func fakeGA(t *testing.T, conn net.Conn) {
	files := map[int64]*bytes.Buffer{}
	r := bufio.NewReader(conn)
	send := func(v any) { b, _ := json.Marshal(map[string]any{"return": v}); conn.Write(append(b, '\n')) }
	conn.Write([]byte(`{"return": {"stale": true}}` + "\n"))
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req struct {
			Execute   string         `json:"execute"`
			Arguments map[string]any `json:"arguments"`
		}
		if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &req); err != nil {
			t.Errorf("bad request %q", line)
			return
		}
		switch req.Execute {
		case "guest-sync-delimited":
			conn.Write([]byte{0xff})
			send(req.Arguments["id"])
		case "guest-ping":
			send(map[string]any{})
		case "guest-exec":
			send(map[string]any{"pid": 7})
		case "guest-exec-status":
			send(map[string]any{"exited": true, "exitcode": 3, "out-data": []byte("hi\n")})
		case "guest-file-open":
			if req.Arguments["mode"] == "w" || files[1] == nil {
				files[1] = &bytes.Buffer{}
			}
			send(1)
		case "guest-file-write":
			b, _ := json.Marshal(req.Arguments["buf-b64"])
			var data []byte
			json.Unmarshal(b, &data)
			files[1].Write(data)
			send(map[string]any{"count": len(data)})
		case "guest-file-read":
			send(map[string]any{"count": files[1].Len(), "buf-b64": files[1].Bytes(), "eof": true})
		case "guest-file-close":
			send(map[string]any{})
		default:
			b, _ := json.Marshal(map[string]any{"error": map[string]any{"class": "CommandNotFound", "desc": "no " + req.Execute}})
			conn.Write(append(b, '\n'))
		}
	}
}

func TestClient(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qga.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			fakeGA(t, conn)
			conn.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Sync(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := c.Exec(ctx, Command{Path: "/bin/echo", Args: []string{"hi"}})
	if err != nil || res.ExitCode != 3 || string(res.Stdout) != "hi\n" {
		t.Fatalf("exec: %+v, %v", res, err)
	}
	if err := c.WriteFile(ctx, "/etc/x", []byte("content")); err != nil {
		t.Fatal(err)
	}
	if b, err := c.ReadFile(ctx, "/etc/x", 1<<20); err != nil || string(b) != "content" {
		t.Fatalf("read: %q, %v", b, err)
	}
	var qerr *Error
	if err := c.SetTime(ctx, time.Now()); err == nil || !errors.As(err, &qerr) || qerr.Class != "CommandNotFound" {
		t.Fatalf("unknown command: %v", err)
	}
}
