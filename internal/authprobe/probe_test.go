package authprobe

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/auth"
)

func TestProbeCountsRefusals(t *testing.T) {
	tk := &auth.Tokens{}
	if err := tk.AddRole("publisher-token", "pub", auth.RolePublisher); err != nil {
		t.Fatal(err)
	}
	a := &auth.Authenticator{Tokens: tk, Policy: auth.ImagePolicy()}
	un, st := a.Interceptors()
	gs := grpc.NewServer(grpc.ChainUnaryInterceptor(un...), grpc.ChainStreamInterceptor(st...))
	imagev1.RegisterImageServiceServer(gs, imagev1.UnimplementedImageServiceServer{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l)
	defer gs.Stop()
	cc, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx := context.Background()
	n := len(imagev1.ImageService_ServiceDesc.Methods) + len(imagev1.ImageService_ServiceDesc.Streams)
	r := Probe(ctx, cc, "", []codes.Code{codes.Unauthenticated}, 5*time.Second, imagev1.ImageService_ServiceDesc)
	if r.Total != n || r.Refused != n {
		t.Fatalf("no token: %+v", r)
	}
	r = Probe(ctx, cc, "Bearer wrong-token", []codes.Code{codes.Unauthenticated}, 5*time.Second, imagev1.ImageService_ServiceDesc)
	if r.Refused != n {
		t.Fatalf("wrong token: %+v", r)
	}
	// A publisher may not write disks: those two are refused, the rest get
	// through to the (unimplemented) handlers.
	r = Probe(ctx, cc, "Bearer publisher-token", []codes.Code{codes.PermissionDenied}, 5*time.Second, imagev1.ImageService_ServiceDesc)
	if r.Refused != 2 || len(r.Admitted) != n-2 {
		t.Fatalf("publisher: %+v", r)
	}
}
