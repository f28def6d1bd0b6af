package imagebuild

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// WriteInitramfs writes the tree rootDir, plus device nodes, as an
// uncompressed "newc" cpio archive: the format the kernel unpacks as its
// initramfs. Written here rather than with cpio(1) so that device nodes need
// no privilege and the archive is reproducible (owner root, time 0, sorted):
// the same inputs give the same bytes, and the same block digests.
// Uncompressed because decompressing under TCG costs more than the bytes.
func WriteInitramfs(rootDir, out string, nodes []DeviceNode) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	w := &cpioWriter{w: bufio.NewWriterSize(f, 1<<20)}
	err = w.tree(rootDir, nodes)
	if err == nil {
		err = w.trailer()
	}
	if err == nil {
		err = w.w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(out)
		return fmt.Errorf("initramfs %s: %w", out, err)
	}
	return nil
}

type cpioWriter struct {
	w   *bufio.Writer
	ino uint32
	off int64
}

const (
	cpioDir  = 0o040000
	cpioReg  = 0o100000
	cpioLink = 0o120000
	cpioChr  = 0o020000
	cpioBlk  = 0o060000
)

func (c *cpioWriter) tree(rootDir string, nodes []DeviceNode) error {
	type entry struct {
		name string
		fn   func() error
	}
	var entries []entry
	err := filepath.WalkDir(rootDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(rootDir, p)
		if rel == "." {
			return nil
		}
		name := filepath.ToSlash(rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		perm := uint32(fi.Mode().Perm())
		if fi.Mode()&fs.ModeSticky != 0 {
			perm |= 0o1000
		}
		switch {
		case fi.IsDir():
			entries = append(entries, entry{name, func() error { return c.entry(name, cpioDir|perm, 2, 0, 0, nil, 0) }})
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			entries = append(entries, entry{name, func() error {
				return c.entry(name, cpioLink|0o777, 1, 0, 0, strings.NewReader(target), int64(len(target)))
			}})
		case fi.Mode().IsRegular():
			entries = append(entries, entry{name, func() error {
				f, err := os.Open(p)
				if err != nil {
					return err
				}
				defer f.Close()
				return c.entry(name, cpioReg|perm, 1, 0, 0, f, fi.Size())
			}})
		default:
			return fmt.Errorf("%s: unsupported file type %v", p, fi.Mode().Type())
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, n := range nodes {
		name := strings.TrimPrefix(path.Clean("/"+n.Path), "/")
		typ := uint32(cpioBlk)
		if n.Char {
			typ = cpioChr
		}
		entries = append(entries, entry{name, func() error {
			return c.entry(name, typ|uint32(n.Perm.Perm()), 1, n.Major, n.Minor, nil, 0)
		}})
	}
	// Sorted, so parents come before their children and the archive does
	// not depend on directory order.
	sort.SliceStable(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	for _, e := range entries {
		if err := e.fn(); err != nil {
			return err
		}
	}
	return nil
}

func (c *cpioWriter) entry(name string, mode, nlink, rmajor, rminor uint32, data io.Reader, size int64) error {
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, len(name)+1, 0)
	if err := c.write([]byte(hdr + name + "\x00")); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	if data != nil {
		n, err := io.Copy(c.w, data)
		c.off += n
		if err != nil {
			return err
		}
		if n != size {
			return fmt.Errorf("%s changed size while archiving", name)
		}
	}
	return c.pad()
}

func (c *cpioWriter) trailer() error {
	c.ino = 0
	return c.entry("TRAILER!!!", 0, 1, 0, 0, nil, 0)
}

func (c *cpioWriter) write(b []byte) error {
	n, err := c.w.Write(b)
	c.off += int64(n)
	return err
}

func (c *cpioWriter) pad() error {
	if r := c.off % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}
