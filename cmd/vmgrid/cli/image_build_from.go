package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// fromFlags registers vmgrid image build's --from flags.
func fromFlags(fl *pflag.FlagSet, b *buildFlags) {
	fl.StringVar(&b.from, "from", "", "build from this image on the image server (an imported one, booted from firmware) instead of a recipe; needs --name")
	fl.DurationVar(&b.guestTimeout, "guest-timeout", plant.DefaultGuestTimeout, "with --from: how long its cold boot may take until its guest agent answers and the boot settles")
}

// runFrom is vmgrid image build --from IMAGE.
func (b *buildFlags) runFrom(cmd *cobra.Command, g *globals, f *imageFlags, args []string) error {
	switch {
	case b.from == "":
		return fmt.Errorf("name a recipe (tiny) or --from IMAGE")
	case len(args) > 0:
		return fmt.Errorf("give a recipe (%s) or --from %s, not both", args[0], b.from)
	case b.name == "" || b.name == b.from:
		return fmt.Errorf("--from %s needs --name NEW, the name of the image to publish", b.from)
	}
	return g.withLogger(func(log *zap.Logger) error {
		d, err := buildDAG(b.dagFile, "", "", "", b.execs)
		if err != nil {
			return err
		}
		return f.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
			addrs, _ := f.addrList(g)
			return b.buildFrom(cmd, log, cl, addrs[0], d)
		})(cmd, nil)
	})
}

func (b *buildFlags) buildFrom(cmd *cobra.Command, log *zap.Logger, cl *imageclient.Client, addr string, d *computev1.ConfigDAG) error {
	if err := nameFree(cmd.Context(), cl, addr, b.name); err != nil {
		return err
	}
	work, cleanup, err := b.workDir()
	if err != nil {
		return err
	}
	defer cleanup()
	start := time.Now()
	gold, err := plant.BuildGolden(cmd.Context(), plant.GoldenOptions{
		Name: b.name, From: b.from, GuestTimeout: b.guestTimeout, WorkDir: work, Driver: &vmm.QEMU{Logger: log},
		Publish: cl, Logger: log, Actions: d.Actions,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "built %s from %s and published it on %s in %s (%d files, %d actions performed; boot %s)\n",
		b.name, b.from, addr, time.Since(start).Round(time.Millisecond), len(gold.Files), len(gold.Attrs.Actions), gold.Took["boot"].Round(time.Millisecond))
	return nil
}

// nameFree checks that no image has the name yet: a long build (minutes of
// a cold boot) for a name that is taken would fail only at the end.
func nameFree(ctx context.Context, cl *imageclient.Client, addr, name string) error {
	if _, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name}); err == nil {
		return fmt.Errorf("image %q already exists on %s: remove it (vmgrid image rm %s) or pick --name: %w", name, addr, name, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}
