package services

import (
	"context"
	"fmt"
	"math/bits"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
)

// Codec is gRPC's proto codec (same name, same bytes on the wire) with a
// buffer pool sized for bulk messages. gRPC's default pool has no size class
// between 32 KiB and 1 MiB and zeroes a buffer on every Get, so each 64 KiB
// block message cleared 1 MiB when marshalled and again when unmarshalled:
// a third of the CPU of a ReadBlocks stream. Buffers here come in every power
// of two and are not cleared: Marshal overwrites the whole length it asks
// for, and so does the copy in Unmarshal, so no stale byte is ever read.
var Codec encoding.CodecV2 = codec{}

type codec struct{}

func (codec) Name() string { return "proto" }

func messageOf(v any) (proto.Message, bool) {
	switch v := v.(type) {
	case protoadapt.MessageV2:
		return v, true
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(v), true
	}
	return nil, false
}

func (codec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := messageOf(v)
	if !ok {
		return nil, fmt.Errorf("proto: cannot marshal %T, want proto.Message", v)
	}
	size := proto.Size(m)
	opts := proto.MarshalOptions{UseCachedSize: true} // Size just ran
	if mem.IsBelowBufferPoolingThreshold(size) {
		b, err := opts.Marshal(m)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	buf := msgPool.Get(size)
	if _, err := opts.MarshalAppend((*buf)[:0], m); err != nil {
		msgPool.Put(buf)
		return nil, err
	}
	return mem.BufferSlice{mem.NewBuffer(buf, msgPool)}, nil
}

func (codec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := messageOf(v)
	if !ok {
		return fmt.Errorf("proto: cannot unmarshal into %T, want proto.Message", v)
	}
	buf := data.MaterializeToBuffer(msgPool)
	defer buf.Free()
	return proto.Unmarshal(buf.ReadOnlyData(), m)
}

// msgPool keeps buffers of 4 KiB..64 MiB in power-of-two classes.
var msgPool mem.BufferPool = &pow2Pool{}

const minClass, maxClass = 12, 26

type pow2Pool struct {
	classes [maxClass - minClass + 1]sync.Pool
}

func class(n int) int { return max(minClass, bits.Len(uint(n-1))) }

func (p *pow2Pool) Get(n int) *[]byte {
	c := class(n)
	if c > maxClass {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.classes[c-minClass].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<c)
	return &b
}

func (p *pow2Pool) Put(b *[]byte) {
	c := cap(*b)
	if c&(c-1) != 0 || c < 1<<minClass || c > 1<<maxClass {
		return
	}
	p.classes[bits.Len(uint(c))-1-minClass].Put(b)
}

// serverCodec is Codec for servers. A request that does not parse is the
// caller's mistake (InvalidArgument), but gRPC answers Internal for any
// codec error, and for unary calls before any interceptor runs. So the
// server's codec leaves the message as it is, notes the error, and the
// decode interceptors (installed by NewServer with this codec) answer it.
type serverCodec struct{ codec }

// decodeErrs maps a message that did not parse to its error, from the
// codec to the interceptor of the same call.
var decodeErrs sync.Map

func (serverCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := codec{}.Unmarshal(data, v)
	if _, ok := messageOf(v); err != nil && ok {
		decodeErrs.Store(v, err)
		return nil
	}
	return err
}

func decodeErr(m any) error {
	if e, ok := decodeErrs.LoadAndDelete(m); ok {
		return status.Errorf(codes.InvalidArgument, "malformed request message: %v", e)
	}
	return nil
}

func unaryDecodeErrors(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := decodeErr(req); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func streamDecodeErrors(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return h(srv, decodeStream{ss})
}

type decodeStream struct{ grpc.ServerStream }

func (s decodeStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return decodeErr(m)
}
