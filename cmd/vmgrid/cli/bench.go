package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	"github.com/vmgrid/vmgrid/integration/clonebench"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

func benchCmd(g *globals) *cobra.Command {
	return group(&cobra.Command{
		Use:   "bench",
		Short: "Benchmarks that run real guests on this machine",
	}, benchCloneCmd(g))
}

func benchCloneCmd(g *globals) *cobra.Command {
	o := clonebench.Options{Compress: true}
	var out string
	var smoke bool
	images := &imageFlags{}
	c := &cobra.Command{
		Use:   "clone",
		Short: "Time cloning a golden image through an emulated WAN (GVFS §4.3)",
		Long: `Build a golden image (--recipe tiny, the default, or debian with --packages),
or fetch a published one (--image NAME, from the image server of --server or
the context), publish it to an in-process image server and time cloning it
on this machine, from the clone request to the clone's guest agent
answering after set_hostname, through an emulated WAN (toxiproxy in-process:
--rtt and --bandwidth-mbit):

  local            golden files on the compute side's disk (the floor)
  full copy        every file over plain TCP across the WAN, then local
  qemu-nbd         root disk over NBD across the WAN, the rest copied first
  vmgrid cold      a fresh compute server reading across the WAN
  vmgrid warm      a second clone on the same compute server
  vmgrid L2        a fresh compute server behind a warm cache proxy
  vmgrid parallel  --plants fresh compute servers at once (makespan)
  limit            local + compressed bytes cold needed / bandwidth + 1 RTT

and the lazy memory rows: cold auto and lazy clones without the image's
working-set profile, a cold lazy clone with it, a warm lazy clone, the same cold rows for the recipe
built with 4x the guest RAM, a workload touching most of the guest's memory
right after an eager and a lazy restore, and a demand block read with the
link idle and while another clone's RAM streams.

It needs QEMU (qemu-system-x86, qemu-utils), fuse3 and root. The guest agent
is built with the go tool unless --agent names a static vmgrid-agent.
Results: a table on stdout, results.json and results.md in --out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if smoke {
				setUnlessChanged(f, "repeats", "1")
				setUnlessChanged(f, "rtt", "4ms")
				setUnlessChanged(f, "bandwidth-mbit", "1000")
				setUnlessChanged(f, "plants", "2")
				if !f.Changed("rows") {
					o.Rows = []string{clonebench.RowLocal, clonebench.RowFullCopy, clonebench.RowNBD, clonebench.RowCold, clonebench.RowL2, clonebench.RowParallel}
				}
			}
			log, err := g.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck
			o.Logger = log.Named("bench")
			o.Command = commandLine(cmd)
			log.Info("clone benchmark", zap.Duration("rtt", o.RTT), zap.Float64("bandwidth_mbit", o.BandwidthMbit),
				zap.Int("repeats", o.Repeats), zap.Int("plants", o.Plants))
			res, err := runCloneBench(cmd, g, images, o)
			if err != nil {
				return err
			}
			if err := res.WriteTable(cmd.OutOrStdout()); err != nil {
				return err
			}
			if out != "" {
				if err := res.WriteFiles(out); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "results: %s/results.json, %s/results.md\n", out, out)
			}
			return nil
		},
	}
	addCloneBenchFlags(c.Flags(), &o, &out, &smoke, images)
	return c
}

// addCloneBenchFlags registers bench clone's flags.
func addCloneBenchFlags(f *pflag.FlagSet, o *clonebench.Options, out *string, smoke *bool, images *imageFlags) {
	f.DurationVar(&o.RTT, "rtt", clonebench.DefaultRTT, "round trip the WAN adds (half each way, whole milliseconds)")
	f.Float64Var(&o.BandwidthMbit, "bandwidth-mbit", clonebench.DefaultBandwidthMbit, "WAN bandwidth in Mbit/s, each direction, shared by all connections (0: unlimited)")
	f.IntVar(&o.Repeats, "repeats", clonebench.DefaultRepeats, "runs of every row (median, min, max)")
	f.IntVar(&o.Plants, "plants", clonebench.DefaultPlants, "compute servers that clone at once in the parallel rows")
	f.BoolVar(&o.Compress, "compress", true, "compute servers ask for zstd-compressed blocks across the WAN")
	f.StringVar(out, "out", "", "directory for results.json and results.md (empty: only print the table)")
	f.StringSliceVar(&o.Rows, "rows", nil, "rows to measure (default all): local, full_copy, qemu_nbd, vmgrid_cold (eager, with vmgrid_warm), vmgrid_lazy (with vmgrid_auto, vmgrid_lazy_profile, vmgrid_warm_lazy), vmgrid_lazy_profile_4x (with vmgrid_lazy_4x: the recipe built again with 4x the RAM), workload_lazy (with workload_eager), demand_read_bulk (with demand_read_idle), vmgrid_l2, vmgrid_parallel, parallel_l2, parallel_local")
	f.BoolVar(smoke, "smoke", false, "quick run for CI: 1 repeat, --rtt 4ms, --bandwidth-mbit 1000, --plants 2, no reference rows, unless given")
	f.StringVar(&o.Agent, "agent", "", "static guest agent binary (default: build cmd/vmgrid-agent with the go tool)")
	f.StringSliceVar(&o.GuestCmdline, "guest-cmdline", nil, "appended to the golden image's kernel command line (e.g. mitigations=off)")
	f.BoolVar(&o.Keep, "keep", false, "keep the run's directory (golden image, QEMU logs) for inspection")
	f.StringVar(&o.WorkDir, "work-dir", "", "where to make the run's temporary directory (default: the system's; keep the path short)")
	f.StringVar(&o.Recipe, "recipe", clonebench.RecipeTiny, "golden image recipe: tiny or debian")
	f.StringSliceVar(&o.Packages, "packages", nil, "debian: more packages to install, comma-separated")
	f.StringVar(&o.Image, "image", "", "clone this published image (fetched from --server) instead of building one")
	images.addrFlag(f, "server", "VMGRID_IMAGESERVER", "127.0.0.1:7070", "image server (for --image)", func(cx *clientContext) []string { return []string{cx.ImageServer} })
	images.operatorTokenFlag(f)
}

// runCloneBench runs the benchmark; with --image, the golden image is
// fetched from the image server first.
func runCloneBench(cmd *cobra.Command, g *globals, images *imageFlags, o clonebench.Options) (*clonebench.Results, error) {
	if o.Image == "" {
		return clonebench.Run(cmd.Context(), o)
	}
	if cmd.Flags().Changed("recipe") || len(o.Packages) > 0 {
		return nil, fmt.Errorf("--image clones a published image: --recipe and --packages do not apply")
	}
	var res *clonebench.Results
	err := images.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
		o.Golden = func(ctx context.Context, dir string) (*plant.Golden, error) {
			return fetchGolden(ctx, cl, o.Image, dir)
		}
		var err error
		res, err = clonebench.Run(cmd.Context(), o)
		return err
	})(cmd, nil)
	return res, err
}

// fetchGolden downloads every file of a published golden image into dir.
func fetchGolden(ctx context.Context, cl *imageclient.Client, name, dir string) (*plant.Golden, error) {
	resp, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name})
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	m := resp.Manifest
	if m.Writable {
		return nil, fmt.Errorf("%s is a persistent disk, not a golden image", name)
	}
	g := &plant.Golden{Dir: dir, Attrs: m.Attributes}
	for _, f := range m.Files {
		path := filepath.Join(dir, filepath.Base(f.Name))
		if _, err := cl.FetchToFile(ctx, name, f.Name, path, 3, nil); err != nil {
			return nil, fmt.Errorf("fetch %s/%s: %w", name, f.Name, err)
		}
		g.Files = append(g.Files, imageclient.PublishFile{Name: f.Name, Path: path, Kind: f.Kind})
	}
	return g, nil
}

func setUnlessChanged(f *pflag.FlagSet, name, value string) {
	if !f.Changed(name) {
		f.Set(name, value) //nolint:errcheck // constant, valid values
	}
}

// commandLine is the command as it could be typed again, with the flags
// that were given.
func commandLine(cmd *cobra.Command) string {
	parts := []string{cmd.CommandPath()}
	cmd.Flags().Visit(func(f *pflag.Flag) {
		parts = append(parts, "--"+f.Name+"="+f.Value.String())
	})
	return strings.Join(parts, " ")
}
