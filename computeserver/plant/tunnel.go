package plant

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Migration tunnels. QEMU speaks its migration stream and NBD over unix
// sockets; between the plants they go through MigrationTunnel, a gRPC
// stream per connection that the source opens with its service token and
// the ticket the destination gave it for this VM. The destination connects
// each stream to its QEMU's socket for the channel. Nothing of QEMU's
// listens on the network.

// Socket names in a VM's directory.
const (
	tunnelMigrationSock = "migrate.sock" // the source's end of the migration stream
	tunnelNBDSock       = "mirror.sock"  // the source's end of the disk mirror
	incomingSock        = "incoming.sock"
	incomingNBDSock     = "nbd.sock"
)

// tunnels are the source's ends of a migration's tunnels.
type tunnels struct {
	migration, nbd string
	lns            []net.Listener
	cancel         context.CancelFunc // ends the streams
	wg             sync.WaitGroup
}

// openTunnels listens on the source's ends; each connection QEMU makes is
// carried to the destination.
func (o *outgoing) openTunnels(ctx context.Context) (*tunnels, error) {
	ctx, cancel := context.WithCancel(ctx)
	t := &tunnels{migration: filepath.Join(o.v.dir, tunnelMigrationSock), nbd: filepath.Join(o.v.dir, tunnelNBDSock), cancel: cancel}
	channels := map[string]string{t.migration: computev1.TunnelMigration}
	if len(o.mo.mirrors) > 0 {
		channels[t.nbd] = computev1.TunnelNBD
		for i := range o.mo.mirrors {
			o.mo.mirrors[i].Socket = t.nbd
		}
	}
	for path, ch := range channels {
		os.Remove(path)
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.close()
			return nil, err
		}
		t.lns = append(t.lns, ln)
		t.wg.Go(func() { o.carry(ctx, ln, ch) })
	}
	return t, nil
}

// close ends the tunnels; call it once the destination has the state.
func (t *tunnels) close() {
	t.cancel()
	for _, ln := range t.lns {
		ln.Close()
		os.Remove(ln.Addr().String())
	}
	t.wg.Wait()
}

// carry tunnels every connection accepted on ln until ln closes.
func (o *outgoing) carry(ctx context.Context, ln net.Listener, channel string) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Go(func() {
			defer c.Close()
			if err := o.tunnel(ctx, c, channel); err != nil && ctx.Err() == nil {
				o.log.Warn("migration tunnel", zap.String("channel", channel), zap.Error(err))
			}
		})
	}
}

// tunnel carries one of QEMU's connections to the destination.
func (o *outgoing) tunnel(ctx context.Context, c net.Conn, channel string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := computev1.NewPlantServiceClient(o.cc).MigrationTunnel(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&computev1.TunnelData{VmId: o.v.ad.VmId, Ticket: o.ticket, Channel: channel}); err != nil {
		return err
	}
	return pump(c, s, &o.moved)
}

// tunnelStream is either end of a MigrationTunnel stream.
type tunnelStream interface {
	Send(*computev1.TunnelData) error
	Recv() (*computev1.TunnelData, error)
}

// pump copies c to s and s to c until both directions end, counting the
// bytes in moved. A half that ends closes its direction only (QEMU's
// migration stream is one-way; NBD answers on the same connection).
func pump(c net.Conn, s tunnelStream, moved *atomic.Int64) error {
	errs := make(chan error, 2)
	go func() {
		buf := make([]byte, tunnelChunk)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				moved.Add(int64(n))
				if serr := s.Send(&computev1.TunnelData{Data: buf[:n]}); serr != nil {
					errs <- serr
					return
				}
			}
			if err != nil {
				if cs, ok := s.(interface{ CloseSend() error }); ok {
					cs.CloseSend()
				}
				errs <- ignoreEOF(err)
				return
			}
		}
	}()
	go func() {
		for {
			m, err := s.Recv()
			if err != nil {
				if uc, ok := c.(*net.UnixConn); ok {
					uc.CloseWrite()
				}
				errs <- ignoreEOF(err)
				return
			}
			moved.Add(int64(len(m.Data)))
			if _, err := c.Write(m.Data); err != nil {
				errs <- err
				return
			}
		}
	}()
	// Either direction failing ends both: QEMU sees its connection close.
	err := <-errs
	if err != nil {
		c.Close()
		return err
	}
	return <-errs
}

func ignoreEOF(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// ServeTunnel is the destination's end of a MigrationTunnel stream: its
// first message names a VM migrating in and the ticket it was given; the
// stream is joined to that VM's QEMU socket for the channel.
func (p *Plant) ServeTunnel(ctx context.Context, s tunnelStream) error {
	first, err := s.Recv()
	if err != nil {
		return err
	}
	if first.VmId == "" {
		return fmt.Errorf("the first message of a tunnel names its VM, ticket and channel: %w", errdefs.ErrInvalidArgument)
	}
	v, err := p.lookup(first.VmId)
	if err != nil {
		return err
	}
	v.mu.Lock()
	in := v.incoming
	v.mu.Unlock()
	if in == nil || subtle.ConstantTimeCompare([]byte(in.ticket), []byte(first.Ticket)) != 1 {
		return fmt.Errorf("vm %q is not migrating to plant %s with that ticket: %w", first.VmId, p.cfg.Name, errdefs.ErrPermissionDenied)
	}
	path := filepath.Join(v.dir, incomingSock)
	if first.Channel == computev1.TunnelNBD {
		path = filepath.Join(v.dir, incomingNBDSock)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return fmt.Errorf("vm %q: the machine's %s socket: %w: %w", first.VmId, first.Channel, err, errdefs.ErrUnavailable)
	}
	defer c.Close()
	var moved atomic.Int64
	err = pump(c, s, &moved)
	in.received.Add(moved.Load())
	return err
}
