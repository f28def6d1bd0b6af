package authprobe

import (
	"slices"
	"sort"

	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/services/auth"
)

// Served returns, as descriptors Probe takes, every service a running
// server registered (grpc.Server.GetServiceInfo) but the public ones
// (health, reflection): probing what a server really serves, not a list
// someone keeps, finds the RPC nobody thought of.
func Served(info map[string]grpc.ServiceInfo) []grpc.ServiceDesc {
	var descs []grpc.ServiceDesc
	for name, si := range info {
		if len(si.Methods) > 0 && auth.Public("/"+name+"/"+si.Methods[0].Name) {
			continue
		}
		sd := grpc.ServiceDesc{ServiceName: name}
		for _, m := range si.Methods {
			if m.IsClientStream || m.IsServerStream {
				sd.Streams = append(sd.Streams, grpc.StreamDesc{StreamName: m.Name, ClientStreams: m.IsClientStream, ServerStreams: m.IsServerStream})
			} else {
				sd.Methods = append(sd.Methods, grpc.MethodDesc{MethodName: m.Name})
			}
		}
		descs = append(descs, sd)
	}
	sort.Slice(descs, func(i, j int) bool { return descs[i].ServiceName < descs[j].ServiceName })
	return descs
}

// Only returns sd with just the named methods (unary or streaming).
func Only(sd grpc.ServiceDesc, methods ...string) grpc.ServiceDesc {
	out := grpc.ServiceDesc{ServiceName: sd.ServiceName}
	for _, m := range sd.Methods {
		if slices.Contains(methods, m.MethodName) {
			out.Methods = append(out.Methods, m)
		}
	}
	for _, s := range sd.Streams {
		if slices.Contains(methods, s.StreamName) {
			out.Streams = append(out.Streams, s)
		}
	}
	return out
}
