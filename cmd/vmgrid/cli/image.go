package cli

import (
	"bytes"
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// imageFlags name the image server the image verbs talk to.
type imageFlags struct{ service }

// verb is an image verb's RunE with a client of the image server.
func (f *imageFlags) verb(g *globals, fn verbFunc[*imageclient.Client]) func(*cobra.Command, []string) error {
	return withClient(g, &f.service, imageclient.NewClient, fn)
}

func imageCmd(g *globals) *cobra.Command {
	f := &imageFlags{}
	c := group(&cobra.Command{
		Use:   "image",
		Short: "Publish, list, inspect, fetch and delete images on an image server",
	}, imagePublishCmd(g, f), imageImportCmd(g, f), imageBuildCmd(g, f), imageListCmd(g, f), imageGetCmd(g, f), imageRmCmd(g, f), imageFetchCmd(g, f), imageCreateDiskCmd(g, f))
	f.addrFlag(c.PersistentFlags(), "server", "VMGRID_IMAGESERVER", "127.0.0.1:7070", "image server", func(cx *clientContext) []string { return []string{cx.ImageServer} })
	f.operatorTokenFlag(c.PersistentFlags())
	return c
}

var fileKinds = map[string]imagev1.FileKind{
	"config": imagev1.FileKind_FILE_KIND_CONFIG,
	"disk":   imagev1.FileKind_FILE_KIND_DISK,
	"memory": imagev1.FileKind_FILE_KIND_MEMORY_STATE,
	"kernel": imagev1.FileKind_FILE_KIND_KERNEL,
	"initrd": imagev1.FileKind_FILE_KIND_INITRD,
	"other":  imagev1.FileKind_FILE_KIND_OTHER,
}

// parseFileSpec parses KIND:PATH or KIND:NAME=PATH.
func parseFileSpec(s string) (imageclient.PublishFile, error) {
	kind, rest, ok := strings.Cut(s, ":")
	k, known := fileKinds[kind]
	if !ok || !known || rest == "" {
		return imageclient.PublishFile{}, fmt.Errorf("--file %q: want KIND:PATH or KIND:NAME=PATH with KIND one of config, disk, memory, kernel, initrd, other", s)
	}
	name, path, named := strings.Cut(rest, "=")
	if !named {
		path, name = rest, filepath.Base(rest)
	}
	return imageclient.PublishFile{Name: name, Path: path, Kind: k}, nil
}

func imagePublishCmd(g *globals, f *imageFlags) *cobra.Command {
	var files, labels, actions []string
	attrs := &imagev1.ImageAttributes{}
	var blockSize uint32
	var quiet bool
	c := &cobra.Command{
		Use:   "publish NAME --file KIND:[NAME=]PATH...",
		Short: "Upload a new golden image (visible only once complete and verified)",
		Example: `  vmgrid image publish tiny --file disk:root.raw=./root.raw --file memory:mem.state=./mem.state \
      --file kernel:vmlinuz=./vmlinuz --arch x86_64 --vcpus 1 --memory-mib 256 --os debian-12`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := imageclient.PublishSpec{Name: args[0], Attributes: attrs}
			if len(files) == 0 {
				return fmt.Errorf("an image needs at least one --file")
			}
			for _, s := range files {
				pf, err := parseFileSpec(s)
				if err != nil {
					return err
				}
				pf.BlockSize = blockSize
				spec.Files = append(spec.Files, pf)
			}
			var err error
			if attrs.Labels, err = parseLabels(labels); err != nil {
				return err
			}
			for _, a := range actions {
				parts := strings.SplitN(a, ":", 3)
				if len(parts) != 3 {
					return fmt.Errorf("--action %q: want NAME:KIND:DIGEST", a)
				}
				attrs.Actions = append(attrs.Actions, &imagev1.Action{Name: parts[0], Kind: parts[1], Digest: parts[2]})
			}
			return f.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
				var resp *imagev1.PublishResponse
				took, err := transfer(cmd, quiet, "publishing "+spec.Name, func(update func(done, total uint64)) (err error) {
					resp, err = cl.Publish(cmd.Context(), spec, update)
					return err
				})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "published %s: %d files, %s sent in %s\n", resp.Manifest.Name, len(resp.Manifest.Files), humanBytes(resp.BytesReceived), took)
				return nil
			})(cmd, args)
		},
	}
	fl := c.Flags()
	fl.StringArrayVar(&files, "file", nil, "a file of the image as KIND:PATH or KIND:NAME=PATH (KIND: config, disk, memory, kernel, initrd, other); repeat")
	fl.StringVar(&attrs.Arch, "arch", "x86_64", "guest architecture")
	fl.Uint32Var(&attrs.Vcpus, "vcpus", 1, "virtual CPUs")
	fl.Uint64Var(&attrs.MemoryMib, "memory-mib", 256, "guest memory in MiB")
	fl.StringVar(&attrs.Os, "os", "", "guest operating system, e.g. debian-12")
	fl.StringVar(&attrs.Parent, "parent", "", "image this one derives from")
	fl.StringArrayVar(&labels, "label", nil, "KEY=VALUE label; repeat")
	fl.StringArrayVar(&actions, "action", nil, "configuration action already performed, NAME:KIND:DIGEST, in order; repeat")
	fl.Uint32Var(&blockSize, "block-size", 0, "block size of every file (0: the server's default)")
	fl.BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	return c
}

func parseLabels(labels []string) (map[string]string, error) {
	if len(labels) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return nil, fmt.Errorf("label %q: want KEY=VALUE", l)
		}
		m[k] = v
	}
	return m, nil
}

// imageColumns are the table of image ls and image get.
var imageColumns = []column[*imagev1.Manifest]{
	{name: "NAME", value: func(m *imagev1.Manifest) string { return m.Name }},
	{name: "KIND", value: imageKind},
	{name: "ARCH", value: func(m *imagev1.Manifest) string { return m.GetAttributes().GetArch() }},
	{name: "VCPUS", value: func(m *imagev1.Manifest) string { return fmt.Sprint(m.GetAttributes().GetVcpus()) }},
	{name: "MEMORY", value: func(m *imagev1.Manifest) string { return fmt.Sprintf("%dMiB", m.GetAttributes().GetMemoryMib()) }},
	{name: "OS", value: func(m *imagev1.Manifest) string { return dash(m.GetAttributes().GetOs()) }},
	{name: "FILES", value: func(m *imagev1.Manifest) string { return fmt.Sprint(len(m.Files)) }},
	{name: "SIZE", value: func(m *imagev1.Manifest) string { size, _ := imageBytes(m); return humanBytes(size) }},
	{name: "NON-ZERO", value: func(m *imagev1.Manifest) string {
		if m.Writable {
			return "-"
		}
		_, nz := imageBytes(m)
		return humanBytes(nz)
	}},
	{name: "ACTIONS", value: func(m *imagev1.Manifest) string { return fmt.Sprint(len(m.GetAttributes().GetActions())) }},
	{name: "PARENT", wide: true, value: func(m *imagev1.Manifest) string { return dash(m.GetAttributes().GetParent()) }},
	{name: "BASE", wide: true, value: func(m *imagev1.Manifest) string { return dash(m.BaseImage) }},
	{name: "LABELS", wide: true, value: func(m *imagev1.Manifest) string { return dash(labelList(m.GetAttributes().GetLabels())) }},
}

func imageKind(m *imagev1.Manifest) string {
	if m.Writable {
		return "disk (gen " + strconv.FormatUint(m.Generation, 10) + ")"
	}
	return "golden"
}

// imageBytes is the size of an image's files and their non-zero bytes.
func imageBytes(m *imagev1.Manifest) (size, nonzero uint64) {
	for _, fm := range m.Files {
		size += fm.Size
		nonzero += fm.NonzeroBytes
	}
	return size, nonzero
}

func labelList(labels map[string]string) string {
	var ls []string
	for k, v := range labels {
		ls = append(ls, k+"="+v)
	}
	slices.Sort(ls)
	return strings.Join(ls, ",")
}

var imageKinds = map[string]imagev1.ListImagesRequest_Kind{
	"": imagev1.ListImagesRequest_KIND_ALL, "all": imagev1.ListImagesRequest_KIND_ALL,
	"golden": imagev1.ListImagesRequest_KIND_GOLDEN, "disk": imagev1.ListImagesRequest_KIND_WRITABLE,
}

func imageListCmd(g *globals, f *imageFlags) *cobra.Command {
	req := &imagev1.ListImagesRequest{}
	var labels []string
	var kind string
	var o output
	list := f.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
		resp, err := cl.API.ListImages(cmd.Context(), req)
		if err != nil {
			return err
		}
		return printItems(cmd.OutOrStdout(), &o, resp, resp.Images, imageColumns)
	})
	c := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images and persistent disks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if req.Labels, err = parseLabels(labels); err != nil {
				return err
			}
			k, ok := imageKinds[kind]
			if !ok {
				return fmt.Errorf("--kind %q: want all, golden or disk", kind)
			}
			req.Kind = k
			return list(cmd, args)
		},
	}
	fl := c.Flags()
	fl.StringVar(&req.NamePrefix, "prefix", "", "only names starting with this")
	fl.StringVar(&req.Arch, "arch", "", "only this architecture")
	fl.StringVar(&req.Os, "os", "", "only this operating system")
	fl.Uint32Var(&req.MinVcpus, "min-vcpus", 0, "only images with at least this many vCPUs")
	fl.Uint64Var(&req.MinMemoryMib, "min-memory-mib", 0, "only images with at least this much memory")
	fl.StringArrayVar(&labels, "label", nil, "only images with this KEY=VALUE label; repeat")
	fl.StringVar(&kind, "kind", "all", "all, golden or disk")
	o.register(c)
	return c
}

func imageGetCmd(g *globals, f *imageFlags) *cobra.Command {
	var full bool
	var o output
	c := &cobra.Command{
		Use:     "get NAME",
		Aliases: []string{"show"},
		Short:   "Print an image's manifest",
		Args:    cobra.ExactArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *imageclient.Client) error {
			v := imagev1.View_VIEW_BASIC
			if full {
				v = imagev1.View_VIEW_FULL
			}
			resp, err := cl.API.GetImage(cmd.Context(), &imagev1.GetImageRequest{Name: args[0], View: v})
			if err != nil {
				return err
			}
			return printItems(cmd.OutOrStdout(), &o, resp.Manifest, []*imagev1.Manifest{resp.Manifest}, imageColumns)
		}),
	}
	c.Flags().BoolVar(&full, "full", false, "include zero maps and block digests (-o json, yaml)")
	o.register(c)
	return c
}

func imageRmCmd(g *globals, f *imageFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"delete"},
		Short:   "Delete images or persistent disks",
		Args:    cobra.MinimumNArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *imageclient.Client) error {
			return each(cmd, args, "deleted", func(n string) error {
				_, err := cl.API.DeleteImage(cmd.Context(), &imagev1.DeleteImageRequest{Name: n})
				return err
			})
		}),
	}
}

func imageFetchCmd(g *globals, f *imageFlags) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "fetch IMAGE FILE [--output-file PATH]",
		Short: "Download one file of an image through the compressed whole-file channel",
		Long: `Download one file of an image through the zstd whole-file channel. Zero
chunks are not sent and are left as holes in PATH. The download is written
to PATH.partial and renamed when complete and verified against the file's
SHA-256.`,
		Args: cobra.ExactArgs(2),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *imageclient.Client) error {
			return fetchToFile(cmd, cl, args[0], args[1], cmp.Or(out, args[1]))
		}),
	}
	c.Flags().StringVar(&out, "output-file", "", "where to write the file (default: FILE in the current directory)")
	return c
}

// fetchToFile downloads one file of an image into out.partial and renames
// it to out once its SHA-256 matches. After a failed transfer out.partial
// stays (what arrived is kept for a resumable fetch); a download that does
// not match its digest is removed.
func fetchToFile(cmd *cobra.Command, cl *imageclient.Client, image, file, out string) (err error) {
	meta, err := fileMeta(cmd, cl, image, file)
	if err != nil {
		return err
	}
	tmp := out + ".partial"
	w, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer w.Close()
	if err := w.Truncate(int64(meta.Size)); err != nil {
		return err
	}
	var done uint64
	_, err = transfer(cmd, false, "fetching "+file, func(update func(done, total uint64)) error {
		return cl.FetchFile(cmd.Context(), image, file, 0, 3, func(off uint64, n uint32, data []byte) error {
			if data != nil {
				if _, err := w.WriteAt(data, int64(off)); err != nil {
					return err
				}
			}
			done += uint64(n)
			update(done, meta.Size)
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("fetching %s/%s (%s of %s arrived, kept in %s): %w", image, file, humanBytes(done), humanBytes(meta.Size), tmp, err)
	}
	if err := verify(w, meta); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := w.Sync(); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

func fileMeta(cmd *cobra.Command, cl *imageclient.Client, image, file string) (*imagev1.FileMeta, error) {
	resp, err := cl.API.GetImage(cmd.Context(), &imagev1.GetImageRequest{Name: image})
	if err != nil {
		return nil, err
	}
	for _, fm := range resp.Manifest.Files {
		if fm.Name == file {
			return fm, nil
		}
	}
	return nil, fmt.Errorf("image %s has no file %s", image, file)
}

func verify(f *os.File, meta *imagev1.FileMeta) error {
	if meta.Sha256 == nil {
		return nil
	}
	sum, err := fileSHA256(f)
	if err != nil {
		return err
	}
	if !bytes.Equal(sum, meta.Sha256) {
		return fmt.Errorf("%s: checksum mismatch after download; not saved", meta.Name)
	}
	return nil
}

func imageCreateDiskCmd(g *globals, f *imageFlags) *cobra.Command {
	req := &imagev1.CreateDiskRequest{}
	c := &cobra.Command{
		Use:   "create-disk NAME --from IMAGE [--file FILE]",
		Short: "Create a persistent disk from a golden image without copying it",
		Args:  cobra.ExactArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *imageclient.Client) error {
			req.Name = args[0]
			resp, err := cl.API.CreateDisk(cmd.Context(), req)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created disk %s from %s/%s (%s)\n", resp.Manifest.Name, resp.Manifest.BaseImage, resp.Manifest.BaseFile, humanBytes(resp.Manifest.Files[0].Size))
			return nil
		}),
	}
	c.Flags().StringVar(&req.SourceImage, "from", "", "golden image to create the disk from (required)")
	c.Flags().StringVar(&req.SourceFile, "file", "", "disk file of the image (default: its only disk)")
	_ = c.MarkFlagRequired("from")
	return c
}
