package services

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestCodecRoundTrip(t *testing.T) {
	for _, n := range []int{0, 10, 16 << 10, 64 << 10, 1<<20 + 3, 3 << 20} {
		in := wrapperspb.Bytes(bytes.Repeat([]byte{0xa5}, n))
		for range 3 { // again with recycled buffers
			data, err := Codec.Marshal(in)
			if err != nil {
				t.Fatal(err)
			}
			want, _ := proto.Marshal(in)
			if !bytes.Equal(data.Materialize(), want) {
				t.Fatalf("%d bytes: encoding differs from proto.Marshal", n)
			}
			out := &wrapperspb.BytesValue{}
			if err := Codec.Unmarshal(data, out); err != nil {
				t.Fatal(err)
			}
			data.Free()
			if !proto.Equal(in, out) {
				t.Fatalf("%d bytes: round trip differs", n)
			}
		}
	}
	if _, err := Codec.Marshal("not a message"); err == nil {
		t.Fatal("marshalled a string")
	}
	if Codec.Name() != "proto" {
		t.Fatal("the codec must keep the proto content-subtype on the wire")
	}
}

func TestPow2Pool(t *testing.T) {
	p := &pow2Pool{}
	for _, n := range []int{1, 4096, 4097, 65536 + 40, 1 << 26, 1<<26 + 1} {
		b := p.Get(n)
		if len(*b) != n {
			t.Fatalf("Get(%d): len %d", n, len(*b))
		}
		if c := cap(*b); c < n || (n <= 1<<26 && c&(c-1) != 0) {
			t.Fatalf("Get(%d): cap %d", n, c)
		}
		p.Put(b)
	}
	small := make([]byte, 100)
	p.Put(&small) // not a class size: dropped, not handed out short
	if b := p.Get(4096); cap(*b) < 4096 {
		t.Fatalf("cap %d", cap(*b))
	}
}
