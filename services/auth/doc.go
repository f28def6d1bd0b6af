// Package auth says who is calling and whether they may. Every RPC of every
// vmgrid service goes through it; there is no unauthenticated call but the
// health and reflection services.
//
// # Callers
//
// A call carries "authorization: Bearer TOKEN" metadata (the scheme is
// case-insensitive, RFC 7235). A token is either a line of a tokens file or
// a task credential:
//
//   - A tokens file has one "TOKEN NAME [ROLE]" line per caller; blank
//     lines and lines starting with # are ignored. ROLE is owner (the
//     default: a user who owns VMs, tasks and files), operator (runs the
//     grid: sees every owner's things, publishes and deletes images, manages
//     caches), publisher (publishes golden images) or service (a vmgrid
//     service talking to another: the shop to plants, plants to the image
//     server). Tokens are compared in constant time and never logged; the
//     file is reloaded within a second of a change.
//   - A task credential (MintTask) is minted by the shop for one owner and
//     one task or VM request, expires, and is signed with a key the shop and
//     the data servers share (--task-key). It lets a plant read that owner's
//     files and write under that task's output prefix on the data server,
//     and nothing else. Service tokens cannot act for owners: there is no
//     master key that opens everyone's files.
//
// # Policies
//
// Each server states, per full method name, which roles may call it
// (Policy). A method without a policy is refused: a new RPC is closed until
// someone decides who may call it. Handlers ask CallerOf(ctx) (or Owner) who
// is calling and check ownership of the things they touch.
package auth
