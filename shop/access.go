package shop

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// Access streams (exec, console, port-forward): the shop checks that the VM
// is the caller's and running on a plant, then relays the stream to that
// plant as it is — the caller needs no plant address, and the plant sees
// only the shop's service token.

// accessPlant returns the plant client of a running VM of the caller's.
func (s *Shop) accessPlant(ctx context.Context, vmID string) (computev1.PlantServiceClient, error) {
	r, _, err := s.owned(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if s.vms.lost(r) {
		return nil, fmt.Errorf("vm %q is lost: its plant %s stopped answering: %w", vmID, r.Plant, errdefs.ErrUnavailable)
	}
	if r.State != computev1.VMState_VM_STATE_RUNNING || r.PlantAddr == "" {
		return nil, fmt.Errorf("vm %q is %s, not running: %w", vmID, r.State, errdefs.ErrFailedPrecondition)
	}
	return s.plants.get(r.PlantAddr)
}

func errNoStart(what string) error {
	return fmt.Errorf("the first message of a %s stream must be start: %w", what, errdefs.ErrInvalidArgument)
}

// ExecStream implements ShopService.ExecStream.
func (s *Shop) ExecStream(stream shopv1.ShopService_ExecStreamServer) error {
	return relayAccess(s, stream, "exec", func(m *computev1.ExecStreamRequest) string { return m.GetStart().GetVmId() },
		computev1.PlantServiceClient.ExecStream)
}

// Console implements ShopService.Console.
func (s *Shop) Console(stream shopv1.ShopService_ConsoleServer) error {
	return relayAccess(s, stream, "console", func(m *computev1.ConsoleRequest) string { return m.GetStart().GetVmId() },
		computev1.PlantServiceClient.Console)
}

// PortForward implements ShopService.PortForward.
func (s *Shop) PortForward(stream shopv1.ShopService_PortForwardServer) error {
	return relayAccess(s, stream, "port-forward", func(m *computev1.PortForwardRequest) string { return m.GetStart().GetVmId() },
		computev1.PlantServiceClient.PortForward)
}

// relayAccess reads the stream's start, finds the VM's plant (vmOf the start
// names the VM; empty: the first message is no start), opens the same
// stream there and relays both ways until the plant ends it.
func relayAccess[Req, Resp any](s *Shop, down grpc.BidiStreamingServer[Req, Resp], kind string, vmOf func(*Req) string,
	open func(computev1.PlantServiceClient, context.Context, ...grpc.CallOption) (grpc.BidiStreamingClient[Req, Resp], error)) error {
	first, err := down.Recv()
	if err != nil {
		return err
	}
	vmID := vmOf(first)
	if vmID == "" {
		return errNoStart(kind)
	}
	c, err := s.accessPlant(down.Context(), vmID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(down.Context())
	defer cancel()
	up, err := open(c, ctx)
	if err != nil {
		return fmt.Errorf("plant of vm %q: %w", vmID, err)
	}
	opened := s.metrics.accessOpen.WithLabelValues(kind)
	opened.Inc()
	defer opened.Dec()
	in, out := s.metrics.accessBytes.WithLabelValues(kind, "in"), s.metrics.accessBytes.WithLabelValues(kind, "out")
	in.Add(size(first))
	if err := up.Send(first); err != nil {
		return upstreamErr(up, err)
	}
	go func() {
		for {
			m, err := down.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					_ = up.CloseSend()
				} else {
					cancel()
				}
				return
			}
			in.Add(size(m))
			if up.Send(m) != nil {
				return // up.Recv reports why
			}
		}
	}()
	for {
		m, err := up.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		out.Add(size(m))
		if err := down.Send(m); err != nil {
			return err
		}
	}
}

// upstreamErr is why a send to the plant failed: its stream's status.
func upstreamErr[Req, Resp any](up grpc.BidiStreamingClient[Req, Resp], err error) error {
	if errors.Is(err, io.EOF) {
		if _, rerr := up.Recv(); rerr != nil && !errors.Is(rerr, io.EOF) {
			return rerr
		}
	}
	return err
}

// size is the encoded size of a relayed message (generated messages are
// all proto.Message).
func size(m any) float64 { return float64(proto.Size(m.(proto.Message))) }
