package clonebench

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// sink accepts connections and answers every byte count request: the client
// writes 8 bytes n, the server writes n bytes back.
func sink(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var hdr [8]byte
				buf := make([]byte, 64<<10)
				for {
					if _, err := io.ReadFull(c, hdr[:]); err != nil {
						return
					}
					n := int64(0)
					for _, b := range hdr {
						n = n<<8 | int64(b)
					}
					for n > 0 {
						k := min(n, int64(len(buf)))
						if _, err := c.Write(buf[:k]); err != nil {
							return
						}
						n -= k
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func ask(t testing.TB, c net.Conn, n int64) {
	t.Helper()
	var hdr [8]byte
	for i := 7; i >= 0; i-- {
		hdr[i] = byte(n)
		n >>= 8
	}
	if _, err := c.Write(hdr[:]); err != nil {
		t.Fatal(err)
	}
}

func fetch(t testing.TB, addr string, n int64) time.Duration {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	ask(t, c, n)
	if _, err := io.CopyN(io.Discard, c, n); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// TestWAN checks the emulated link: a small request costs one RTT, a large
// one bytes ÷ bandwidth, two connections share the bandwidth, and the bytes
// are counted. The lower bounds are the emulation's; the upper ones are
// loose, since a loaded host (CI) delays the copying goroutines.
func TestWAN(t *testing.T) {
	const rtt, mbit = 20 * time.Millisecond, 80
	w := NewWAN(rtt, mbit*1e6)
	defer w.Close()
	addr, err := w.Expose("t", sink(t))
	if err != nil {
		t.Fatal(err)
	}
	if d := fetch(t, addr, 1); d < rtt || d > rtt+250*time.Millisecond {
		t.Errorf("a one-byte round trip took %v, want about %v (plus the connection's)", d, rtt)
	}
	const n = 2 << 20
	want := time.Duration(n*8*1000/mbit)*time.Microsecond/1000 + rtt
	if d := fetch(t, addr, n); d < want*9/10 || d > want*3 {
		t.Errorf("%d bytes took %v, want about %v", n, d, want)
	}
	var wg sync.WaitGroup
	start := time.Now()
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); fetch(t, addr, n/2) }()
	}
	wg.Wait()
	if d := time.Since(start); d < want*9/10 || d > want*3 {
		t.Errorf("two connections of %d bytes each took %v, want about %v: they share the link", n/2, d, want)
	}
	if up, down := w.Bytes(); down != 1+2*n || up != 4*8 {
		t.Errorf("counted %d bytes up, %d down; want %d, %d", up, down, 4*8, 1+2*n)
	}
}

// BenchmarkWANThroughput shows what the emulation itself can carry.
func BenchmarkWANThroughput(b *testing.B) {
	for _, c := range []struct {
		name string
		rtt  time.Duration
		mbit float64
	}{{"direct", 0, 0}, {"rtt4ms-unlimited", 4 * time.Millisecond, 0}, {"rtt4ms-1000mbit", 4 * time.Millisecond, 1000}, {"rtt40ms-100mbit", 40 * time.Millisecond, 100}} {
		b.Run(c.name, func(b *testing.B) {
			addr := sink(b)
			if c.name != "direct" {
				w := NewWAN(c.rtt, c.mbit*1e6)
				defer w.Close()
				var err error
				if addr, err = w.Expose("b", addr); err != nil {
					b.Fatal(err)
				}
			}
			const n = 64 << 20
			b.SetBytes(n)
			for b.Loop() {
				fetch(b, addr, n)
			}
		})
	}
}
