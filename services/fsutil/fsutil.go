// Package fsutil holds the durable-file helpers the stores share: a file
// is written to a temporary name, fsynced, renamed into place, and its
// directory fsynced, so a crash leaves the old file or the new one, never
// half of either.
package fsutil

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
)

// WriteFileAtomic writes b to path through a temporary file, fsyncs it and
// renames it into place, then fsyncs the directory.
func WriteFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncDir fsyncs a directory, making renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// RandomSuffix is a short random hex string for temporary names.
func RandomSuffix() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
