package clonebench

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
)

// makeGolden builds the golden image of the run's recipe and publishes it,
// or takes the one Options.Golden supplies and publishes that.
func (b *bench) makeGolden(ctx context.Context, dir string, cc *grpc.ClientConn, agentPath string) (*plant.Golden, error) {
	return b.buildRecipe(ctx, image, 0, dir, cc, agentPath)
}

// buildRecipe builds and publishes the run's recipe as name with
// memoryMiB of guest RAM (0: the recipe's own).
func (b *bench) buildRecipe(ctx context.Context, name string, memoryMiB int, dir string, cc *grpc.ClientConn, agentPath string) (*plant.Golden, error) {
	cl := imageclient.NewClient(cc)
	if b.opts.Golden != nil && name == image {
		g, err := b.opts.Golden(ctx, dir)
		if err != nil {
			return nil, err
		}
		if _, err := cl.Publish(ctx, imageclient.PublishSpec{Name: image, Attributes: g.Attrs, Files: g.Files}, nil); err != nil {
			return nil, fmt.Errorf("publish %s: %w", image, err)
		}
		return g, nil
	}
	var recipe imagebuild.Recipe = &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": agentPath},
		ExtraCmdline: b.opts.GuestCmdline, MemoryMiB: memoryMiB, Logger: b.srvLog.Named("imagebuild")}
	if b.opts.Recipe == RecipeDebian {
		recipe = &imagebuild.Debian{Agent: agentPath, Packages: b.opts.Packages, ExtraCmdline: b.opts.GuestCmdline, MemoryMiB: memoryMiB,
			Logger: b.srvLog.Named("imagebuild")}
	}
	return plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: name, WorkDir: dir, Driver: b.driver, Publish: cl, Logger: b.srvLog.Named("golden"), Recipe: recipe,
	})
}

// zstdSize is the size of path compressed with zstd's default level (what
// the memory state costs on a link that compresses).
func zstdSize(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n countWriter
	enc, err := zstd.NewWriter(&n, zstd.WithEncoderConcurrency(1))
	if err != nil {
		return 0, err
	}
	if _, err := io.Copy(enc, f); err != nil {
		return 0, err
	}
	if err := enc.Close(); err != nil {
		return 0, err
	}
	return uint64(n), nil
}

type countWriter uint64

func (c *countWriter) Write(p []byte) (int, error) { *c += countWriter(len(p)); return len(p), nil }
