package cli

import (
	"crypto/sha256"
	"io"
	"os"

	"github.com/vmgrid/vmgrid/services"
)

func fileSHA256(f *os.File) ([]byte, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, 1<<62)); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

func humanBytes(n uint64) string { return services.HumanBytes(n) }
