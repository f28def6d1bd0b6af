// Package web is the shop's HTTP side (`vmgrid shop --http-listen`): the
// HTTP/JSON API, an events stream and the dashboard, on one listener.
//
// # The HTTP/JSON API
//
// /v1/vms, /v1/tasks and their children are grpc-gateway's mapping of
// ShopService (proto/vmgrid/shop/v1/shop_http.yaml, kept outside the
// proto). The gateway does not call the shop in process: it dials the
// shop's own gRPC port, so an HTTP request meets the very interceptors a
// gRPC call meets — authentication, validation, message size limits and
// the one error mapping (services/errdefs) — and an error answers with the
// HTTP status of its gRPC code and the same message. Only the
// Authorization header is passed on as gRPC metadata. Server-streaming
// RPCs (CreateVM, WatchVM, WatchTask) answer newline-delimited JSON, one
// {"result": …} per message and an {"error": …} line if the stream fails.
//
// # Events
//
// GET /v1/events is a server-sent-events stream for the dashboard: the
// caller's overview (their VMs and tasks, everyone's for operators; the
// plants and images) whenever the VM information system changes in etcd,
// the plants' cache statistics every couple of seconds, and the auction
// feed as bids arrive. It authenticates like the API (auth.HTTPCaller);
// browsers read it with fetch, as EventSource cannot send the header.
//
// # The dashboard
//
// / serves static/ (plain HTML, CSS and JavaScript, embedded; no build
// step, nothing from a CDN). It asks for the owner's token, keeps it in
// sessionStorage and sends it with every request.
package web
