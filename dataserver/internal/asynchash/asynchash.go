// Package asynchash computes a SHA-256 on its own goroutine, for the data
// server's uploads and its client's transfers.
package asynchash

import (
	"crypto/sha256"
	"hash"
	"sync"
)

// Hash computes a SHA-256 on its own goroutine, so hashing (about as
// costly as the rest of a transfer together) overlaps the caller's I/O
// instead of adding to it. Slices passed to Write are read later: they must
// not change afterwards. Sum or Close ends the goroutine.
type Hash struct {
	ch   chan []byte
	done chan struct{}
	h    hash.Hash
	once sync.Once
}

// New continues h (nil: a new SHA-256). release, when not nil, is
// called with every slice once it is hashed (to reuse its buffer).
func New(h hash.Hash, release func([]byte)) *Hash {
	if h == nil {
		h = sha256.New()
	}
	a := &Hash{ch: make(chan []byte, 8), done: make(chan struct{}), h: h}
	go func() {
		defer close(a.done)
		for b := range a.ch {
			a.h.Write(b)
			if release != nil {
				release(b)
			}
		}
	}()
	return a
}

// Write queues b to be hashed; b must not change afterwards.
func (a *Hash) Write(b []byte) { a.ch <- b }

// Close stops the goroutine; it is safe to call more than once.
func (a *Hash) Close() {
	a.once.Do(func() { close(a.ch) })
	<-a.done
}

// Sum waits for every byte written and returns the digest.
func (a *Hash) Sum() []byte {
	a.Close()
	return a.h.Sum(nil)
}
