package cli

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/computeserver/vmm"
	"github.com/vmgrid/vmgrid/imagebuild"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// buildFlags are the flags of vmgrid image build.
type buildFlags struct {
	name, dagFile, keep, agentPath string
	execs, kernelArgs, packages    []string
	vcpus, memoryMiB               int
	diskMiB                        int64
	agentTimeout                   time.Duration
	recipe                         string
}

// recipes are the recipes image build knows.
var recipes = []string{"tiny", "debian"}

func imageBuildCmd(g *globals, f *imageFlags) *cobra.Command {
	b := &buildFlags{}
	c := &cobra.Command{
		Use:   "build RECIPE",
		Short: "Build a golden image on this machine (boot it, configure it, suspend it) and publish it",
		Long: `Build a golden image for real and publish it. Both recipes boot Debian's
cloud kernel (the package is fetched and cached) under QEMU (with
init_on_free=1) with the guest agent (--agent; default vmgrid-agent beside
this binary, or this binary, statically linked):

  tiny    a small ext4 root disk with busybox; the agent is the init's hook
          (default 256 MiB disk, 256 MiB memory).
  debian  Debian 12 from debootstrap (minbase, systemd, udev, openssh-server,
          iproute2, ca-certificates and --packages), the mirror taken from this
          machine's apt sources, the result cached by suite, package set and
          recipe version; the agent is a systemd service started when its
          virtio-serial port appears; the guest boots to multi-user.target.
          sshd has no host keys in the image: every clone makes its own
          (default 1024 MiB disk, 512 MiB memory). Needs root and debootstrap.

The optional configuration actions (--exec, chained in order, or --dag FILE)
run in the guest and are recorded with their digests, so requests whose DAG
starts with them match the image and skip them. Then the guest's page cache
is dropped, the guest is suspended to a memory state and the files are
published as one image. A guest whose agent does not answer (or, debian, does
not finish booting) within --agent-timeout fails the build with its
console's last lines; nothing is published.`,
		Example: `  vmgrid image build tiny
  vmgrid image build tiny --name tiny-app --exec 'echo configured > /etc/app.conf'
  vmgrid image build debian --packages curl,python3 --disk-mib 2048`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !slices.Contains(recipes, args[0]) {
				return fmt.Errorf("unknown recipe %q: the recipes are: %s", args[0], strings.Join(recipes, ", "))
			}
			if len(b.packages) > 0 && args[0] != "debian" {
				return fmt.Errorf("--packages: the %s recipe installs no packages (only debian does)", args[0])
			}
			b.recipe = args[0]
			if b.name == "" {
				b.name = args[0]
			}
			return b.run(cmd, g, f)
		},
	}
	fl := c.Flags()
	fl.StringVar(&b.name, "name", "", "name of the published image (default: the recipe's)")
	fl.StringArrayVar(&b.execs, "exec", nil, "shell command run in the guest before it is suspended; repeat (run in order)")
	fl.StringVar(&b.dagFile, "dag", "", "file holding a configuration DAG as JSON, as for vmgrid vm create (instead of --exec)")
	fl.IntVar(&b.vcpus, "vcpus", 1, "virtual CPUs")
	fl.IntVar(&b.memoryMiB, "memory-mib", 0, "guest memory in MiB (0: the recipe's, tiny 256, debian 512)")
	fl.Int64Var(&b.diskMiB, "disk-mib", 0, "root disk size in MiB (0: the recipe's, tiny 256, debian 1024)")
	fl.StringSliceVar(&b.packages, "packages", nil, "debian: more packages to install, comma-separated (checked against this machine's apt lists first)")
	fl.DurationVar(&b.agentTimeout, "agent-timeout", plant.DefaultGoldenTimeout, "how long the guest may take to answer, and then to finish booting, before the build fails")
	fl.StringArrayVar(&b.kernelArgs, "kernel-arg", nil, "extra kernel command line argument; repeat")
	fl.StringVar(&b.agentPath, "agent", "", "static guest agent binary (default: vmgrid-agent beside this binary, else this binary)")
	fl.StringVar(&b.keep, "work-dir", "", "build here and keep the files (default: a temporary directory, removed)")
	return c
}

func (b *buildFlags) run(cmd *cobra.Command, g *globals, f *imageFlags) error {
	return g.withLogger(func(log *zap.Logger) (err error) {
		if b.agentPath == "" {
			if b.agentPath, err = guestAgent(); err != nil {
				return err
			}
		}
		d, err := buildDAG(b.dagFile, "", "", "", b.execs)
		if err != nil {
			return err
		}
		if err := b.checkRecipe(cmd); err != nil {
			return err
		}
		return f.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
			addrs, _ := f.addrList(g) // the verb found them
			return b.build(cmd, log, cl, addrs[0], d)
		})(cmd, nil)
	})
}

// build builds the golden image and publishes it with cl (to the image
// server at addr).
func (b *buildFlags) build(cmd *cobra.Command, log *zap.Logger, cl *imageclient.Client, addr string, d *computev1.ConfigDAG) error {
	ctx := cmd.Context()
	// A long build for a name that is taken would fail only at the end.
	if _, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: b.name}); err == nil {
		return fmt.Errorf("image %q already exists on %s: remove it (vmgrid image rm %s) or pick --name", b.name, addr, b.name)
	} else if !errdefs.IsNotFound(err) {
		return err
	}
	work, cleanup, err := b.workDir()
	if err != nil {
		return err
	}
	defer cleanup()
	start := time.Now()
	gold, err := plant.BuildGolden(ctx, plant.GoldenOptions{
		Name: b.name, WorkDir: work, Driver: &vmm.QEMU{Logger: log}, Publish: cl, Logger: log, Actions: d.Actions,
		Recipe: b.recipeOf(log), AgentTimeout: b.agentTimeout,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "built and published %s on %s in %s (%d files, %d actions performed)\n",
		b.name, addr, time.Since(start).Round(time.Millisecond), len(gold.Files), len(gold.Attrs.Actions))
	return nil
}

// recipeOf is the recipe b names, with the flags applied.
func (b *buildFlags) recipeOf(log *zap.Logger) imagebuild.Recipe {
	if b.recipe == "debian" {
		return &imagebuild.Debian{Agent: b.agentPath, Packages: b.packages, VCPUs: b.vcpus, MemoryMiB: b.memoryMiB,
			DiskSize: b.diskMiB << 20, ExtraCmdline: b.kernelArgs, Logger: log}
	}
	return &imagebuild.Tiny{Hook: plant.GoldenHook, ExtraFiles: map[string]string{"/sbin/vmgrid-agent": b.agentPath},
		VCPUs: b.vcpus, MemoryMiB: b.memoryMiB, DiskSize: b.diskMiB << 20, ExtraCmdline: b.kernelArgs, Logger: log}
}

// checkRecipe fails before anything is built when the recipe's input is
// bad (a package the archive does not have).
func (b *buildFlags) checkRecipe(cmd *cobra.Command) error {
	if d, ok := b.recipeOf(zap.NewNop()).(*imagebuild.Debian); ok {
		if err := d.Bootstrap().Validate(cmd.Context()); err != nil {
			return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// workDir is --work-dir, kept, or a temporary directory that cleanup
// removes.
func (b *buildFlags) workDir() (dir string, cleanup func(), err error) {
	if b.keep != "" {
		return b.keep, func() {}, os.MkdirAll(b.keep, 0o755)
	}
	// Short: the build directory holds unix sockets.
	if dir, err = os.MkdirTemp("/tmp", "vmgrid-build-"); err != nil {
		return "", nil, err
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}
