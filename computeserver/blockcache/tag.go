package blockcache

import (
	"crypto/sha256"
	"encoding/binary"
	"hash/crc32"
)

// tagSize is the size of one tag record in the tags file. Records never
// straddle a 512-byte sector, so a record is written whole or not at all on
// the devices we run on; its own checksum catches the rest.
const tagSize = 64

const (
	flagValid = 1 << 0
	flagDirty = 1 << 1
)

// tagMagic marks a record of this format (bytes 56..60).
var tagMagic = [4]byte{'b', 'c', 't', '1'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the frame-data checksum kept in the tag (CRC-32C, hardware
// accelerated on amd64 and arm64).
func checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// fileHash is the first 128 bits of SHA-256 of a file id. Tags store it in
// place of the id; 128 bits of a cryptographic hash make a collision between
// two different ids (crafted or not) a practical impossibility, and the name
// table checks for one anyway when it records a name.
type fileHash [16]byte

func hashFile(name string) fileHash {
	sum := sha256.Sum256([]byte(name))
	var h fileHash
	copy(h[:], sum[:16])
	return h
}

// base is the start of the file's run of sets: block b of the file lives in
// set (base+b) mod sets, so consecutive blocks fill consecutive sets.
func (h fileHash) base() uint64 { return binary.LittleEndian.Uint64(h[:8]) }

// tag is the decoded form of one record.
//
//	[0:4)   flags (valid, dirty)
//	[4:8)   length of the block in bytes (the last block of a file may be short)
//	[8:16)  block index
//	[16:32) file hash
//	[32:40) write sequence number
//	[40:48) LRU stamp (per set)
//	[48:52) CRC-32C of the frame data (length bytes)
//	[52:56) reserved, zero
//	[56:60) magic "bct1"
//	[60:64) CRC-32C of bytes [0:60)
//
// All integers are little endian. A record that fails its checksum (for
// example the zeros of a never-written sparse region) is a free frame.
type tag struct {
	flags  uint32
	length uint32
	block  uint64
	fh     fileHash
	seq    uint64
	lru    uint64
	crc    uint32
}

func (t *tag) valid() bool { return t.flags&flagValid != 0 }
func (t *tag) dirty() bool { return t.flags&flagDirty != 0 }

func (t *tag) encode(b []byte) {
	_ = b[tagSize-1]
	le := binary.LittleEndian
	le.PutUint32(b[0:], t.flags)
	le.PutUint32(b[4:], t.length)
	le.PutUint64(b[8:], t.block)
	copy(b[16:32], t.fh[:])
	le.PutUint64(b[32:], t.seq)
	le.PutUint64(b[40:], t.lru)
	le.PutUint32(b[48:], t.crc)
	le.PutUint32(b[52:], 0)
	copy(b[56:60], tagMagic[:])
	le.PutUint32(b[60:], crc32.Checksum(b[:60], castagnoli))
}

// decodeTag returns the record in b and whether it is intact. An intact
// record may still be invalid (a freed frame).
func decodeTag(b []byte) (tag, bool) {
	_ = b[tagSize-1]
	le := binary.LittleEndian
	if [4]byte(b[56:60]) != tagMagic || le.Uint32(b[60:]) != crc32.Checksum(b[:60], castagnoli) {
		return tag{}, false
	}
	t := tag{
		flags:  le.Uint32(b[0:]),
		length: le.Uint32(b[4:]),
		block:  le.Uint64(b[8:]),
		seq:    le.Uint64(b[32:]),
		lru:    le.Uint64(b[40:]),
		crc:    le.Uint32(b[48:]),
	}
	copy(t.fh[:], b[16:32])
	return t, true
}
