package web

import (
	"context"
	"encoding/json"
	"net/http"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// jsonOpts is how the API and the events write messages: proto3's JSON
// mapping (lowerCamelCase names, enums by name), every field present.
var jsonOpts = protojson.MarshalOptions{EmitUnpopulated: true}

// newGateway maps the HTTP/JSON API onto the shop's gRPC port (cc).
func newGateway(ctx context.Context, cc *grpc.ClientConn) (*runtime.ServeMux, error) {
	mux := runtime.NewServeMux(
		// The gateway passes Authorization on by itself; no other header of
		// the client's becomes metadata.
		runtime.WithIncomingHeaderMatcher(func(string) (string, bool) { return "", false }),
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{MarshalOptions: jsonOpts}),
	)
	if err := shopv1.RegisterShopServiceHandlerClient(ctx, mux, shopv1.NewShopServiceClient(cc)); err != nil {
		return nil, err
	}
	return mux, nil
}

// writeError answers err the way the gateway does: the HTTP status of its
// gRPC code, {"code", "message"}.
func writeError(w http.ResponseWriter, err error) {
	st := status.Convert(errdefs.ToGRPC(err))
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(runtime.HTTPStatusFromCode(st.Code()))
	_ = json.NewEncoder(w).Encode(map[string]any{"code": st.Code(), "message": st.Message()})
}
