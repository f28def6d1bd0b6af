// Package cutproxy is a TCP proxy for tests that can be cut: from then on
// it drops every byte both ways and passes no close either, which is what
// a cut network looks like to the hosts on either side (no reset, only
// silence).
package cutproxy

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy forwards the connections it accepts to its target until Cut.
type Proxy struct {
	ln     net.Listener
	target atomic.Value // string
	cut    atomic.Bool
}

// Start listens on 127.0.0.1 and forwards to target (which may be set
// later with SetTarget, before the first connection). Everything is
// closed when the test ends.
func Start(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{ln: ln}
	p.target.Store(target)
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", p.target.Load().(string))
			if err != nil || p.cut.Load() {
				c.Close()
				if s != nil {
					s.Close()
				}
				continue
			}
			mu.Lock()
			conns = append(conns, c, s)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); p.pipe(s, c) }()
			go func() { defer wg.Done(); p.pipe(c, s) }()
		}
	}()
	return p
}

// Addr is the address to dial instead of the target's.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetTarget sets where new connections go.
func (p *Proxy) SetTarget(addr string) { p.target.Store(addr) }

// Cut makes the proxy silent: bytes are read and dropped, closes are not
// passed on, new connections are refused.
func (p *Proxy) Cut() { p.cut.Store(true) }

func (p *Proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if p.cut.Load() {
			if err != nil {
				return
			}
			continue
		}
		if err != nil {
			dst.Close()
			return
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			src.Close()
			return
		}
	}
}
