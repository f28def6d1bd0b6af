package vnet

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/vmgrid/vmgrid/computeserver/vnet/vnettest"
)

// The kernel's share of guest networking, without QEMU: TCP between the
// dialers of two plants on two hosts (namespaces) across the VXLAN, next
// to the host's loopback.
//
//	go test -run '^$' -bench . -benchtime 3s ./computeserver/vnet/

func benchPair(b *testing.B) (dial func() (net.Conn, error), ln net.Listener) {
	lan := vnettest.NewLAN(b)
	ha, hb := lan.Host(), lan.Host()
	var ms []*Manager
	for i, h := range []vnettest.Host{ha, hb} {
		m, err := New(Config{Underlay: h.Addr, Netns: h.Netns, Prefix: PrefixFor(fmt.Sprint(b.Name(), i))}, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(m.Close)
		if _, err := m.Attach(9, cidr(fmt.Sprintf("10.79.0.%d/24", i+1)), "vm"); err != nil {
			b.Fatal(err)
		}
		ms = append(ms, m)
	}
	for _, m := range ms {
		if err := m.SetPeers(9, []string{ms[0].Endpoint(), ms[1].Endpoint()}); err != nil {
			b.Fatal(err)
		}
	}
	ns, err := ms[1].dialer(9)
	if err != nil {
		b.Fatal(err)
	}
	if err := inNS(ns, func() error {
		var err error
		ln, err = net.Listen("tcp4", "10.79.0.2:7001")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	return func() (net.Conn, error) { return ms[0].Dial(context.Background(), 9, "10.79.0.2:7001") }, ln
}

func loopback(b *testing.B) (func() (net.Conn, error), net.Listener) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	return func() (net.Conn, error) { return net.Dial("tcp4", ln.Addr().String()) }, ln
}

func throughput(b *testing.B, dial func() (net.Conn, error), ln net.Listener) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	c, err := dial()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}

func roundTrip(b *testing.B, dial func() (net.Conn, error), ln net.Listener) {
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.Copy(c, c)
	}()
	c, err := dial()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p := []byte{1}
	start := time.Now()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(p); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, p); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/float64(b.N), "µs/rtt")
}

func BenchmarkThroughputLoopback(b *testing.B) { d, ln := loopback(b); throughput(b, d, ln) }
func BenchmarkThroughputVXLAN(b *testing.B)    { d, ln := benchPair(b); throughput(b, d, ln) }
func BenchmarkRoundTripLoopback(b *testing.B)  { d, ln := loopback(b); roundTrip(b, d, ln) }
func BenchmarkRoundTripVXLAN(b *testing.B)     { d, ln := benchPair(b); roundTrip(b, d, ln) }

// BenchmarkAttach is what the network step costs a CreateVM on the plant:
// a new segment (bridge, VXLAN) and a tap, or a tap on a segment the plant
// has (Detach, on the destroy path, is not timed); and the dialer
// namespace a first DialGuest makes.
func BenchmarkAttach(b *testing.B) {
	h := vnettest.NewLAN(b).Host()
	m, err := New(Config{Underlay: h.Addr, Netns: h.Netns, Prefix: PrefixFor(b.Name())}, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(m.Close)
	b.Run("new segment", func(b *testing.B) {
		for i := range b.N {
			at, err := m.Attach(uint32(100+i%1000), cidr("10.80.0.1/24"), "vm")
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			at.Tap.Close()
			m.Detach(uint32(100+i%1000), "vm")
			b.StartTimer()
		}
	})
	b.Run("dialer", func(b *testing.B) {
		for i := range b.N {
			b.StopTimer()
			vni := uint32(2000 + i%1000)
			at, err := m.Attach(vni, cidr("10.80.0.1/24"), "vm")
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := m.dialer(vni); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			at.Tap.Close()
			m.Detach(vni, "vm")
			b.StartTimer()
		}
	})
	b.Run("tap on a segment", func(b *testing.B) {
		if _, err := m.Attach(50, cidr("10.80.0.1/24"), "keep"); err != nil {
			b.Fatal(err)
		}
		for i := range b.N {
			id := fmt.Sprint("vm", i)
			at, err := m.Attach(50, cidr("10.80.0.1/24"), id)
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			at.Tap.Close()
			m.Detach(50, id)
			b.StartTimer()
		}
	})
}
