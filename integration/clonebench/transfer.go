package clonebench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// fileServer is the sending half of the "scp" of the full-copy and
// qemu-nbd rows: plain TCP, no compression, every byte of a file (zero
// blocks too). The receiver sends the names it wants, one per line, then an
// empty line; the server answers with each file's size (8 bytes, big
// endian) and its bytes, in order.
type fileServer struct {
	ln    net.Listener
	files map[string]string // name → path on the image side
	wg    sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startFileServer(files map[string]string) (*fileServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &fileServer{ln: ln, files: files, conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

func (s *fileServer) Addr() string { return s.ln.Addr().String() }

func (s *fileServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serve(c)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			c.Close()
		}()
	}
}

func (s *fileServer) serve(c net.Conn) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		name := strings.TrimSpace(line)
		if name == "" {
			return
		}
		path, ok := s.files[name]
		if !ok {
			return // the receiver sees EOF instead of a size
		}
		if err := sendFile(c, path); err != nil {
			return
		}
	}
}

func sendFile(w io.Writer, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(st.Size()))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err = io.Copy(w, f) // sendfile(2) to a TCP connection
	return err
}

// Close stops accepting and ends the transfers in progress.
func (s *fileServer) Close() {
	s.ln.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// fetchFiles copies the named files from the file server at addr into dir
// over one connection and returns the bytes received.
func fetchFiles(ctx context.Context, addr string, names []string, dir string) (int64, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if _, err := io.WriteString(c, strings.Join(names, "\n")+"\n\n"); err != nil {
		return 0, err
	}
	r := bufio.NewReaderSize(c, 1<<20)
	var total int64
	for _, name := range names {
		var hdr [8]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return total, fmt.Errorf("copy %s: %w", name, orCtx(ctx, err))
		}
		size := int64(binary.BigEndian.Uint64(hdr[:]))
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			return total, err
		}
		n, err := io.CopyN(f, r, size)
		total += n
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return total, fmt.Errorf("copy %s: %w", name, orCtx(ctx, err))
		}
	}
	return total, nil
}

func orCtx(ctx context.Context, err error) error {
	if ctx.Err() != nil && !errors.Is(err, ctx.Err()) {
		return ctx.Err()
	}
	return err
}
