package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/computeserver/plant"
	"github.com/vmgrid/vmgrid/imageserver/imageclient"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
)

// guestAgents are the values of --agent.
var guestAgents = map[string]imagev1.GuestAgent{
	"vmgrid":     imagev1.GuestAgent_GUEST_AGENT_VMGRID,
	"qemu-ga":    imagev1.GuestAgent_GUEST_AGENT_QEMU_GA,
	"cloud-init": imagev1.GuestAgent_GUEST_AGENT_CLOUD_INIT,
}

// importFlags are the flags of vmgrid image import.
type importFlags struct {
	disk, agent, arch, os string
	vcpus, memoryMiB      int
	labels                []string
	quiet                 bool
}

func imageImportCmd(g *globals, f *imageFlags) *cobra.Command {
	in := &importFlags{}
	c := &cobra.Command{
		Use:   "import NAME --disk FILE",
		Short: "Publish a raw or qcow2 disk made elsewhere (a cloud image) as a golden image that boots from firmware",
		Long: `Import a disk image made elsewhere — a distribution's cloud image, say — and
publish it as a golden image without a memory state. The disk (raw or
qcow2) is checked (qemu-img check) and converted to a sparse raw disk
(qemu-img convert): qcow2 zero clusters and unallocated space become holes,
which the image server records as zero blocks, so they are never stored or
sent. Clones of it boot from firmware (SeaBIOS, the disk's own boot loader
and kernel) on a redo log over the golden disk, and are configured through
the path --agent names: "cloud-init" (a NoCloud seed the plant writes:
hostname, users with SSH keys, files, commands; the plant reads the outcome
on the serial console and uses qemu-ga afterwards where the guest has it),
"qemu-ga" (the QEMU guest agent on virtio-serial) or "vmgrid" (vmgrid's own
agent in the image). The image's attributes record both: boot=firmware and
guest_agent. A corrupt or truncated disk is refused with what is wrong, and
nothing is published. vmgrid image build --from NAME makes a golden image
with a memory state of it.`,
		Example: `  vmgrid image import debian-12 --disk debian-12-genericcloud-amd64.qcow2 --os debian-12
  vmgrid image import app --disk app.raw --agent qemu-ga --vcpus 2 --memory-mib 1024`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			kind, ok := guestAgents[in.agent]
			if !ok {
				return fmt.Errorf("--agent %q: want vmgrid, qemu-ga or cloud-init", in.agent)
			}
			if in.disk == "" {
				return fmt.Errorf("--disk FILE is required")
			}
			labels, err := parseLabels(in.labels)
			if err != nil {
				return err
			}
			return f.verb(g, func(cmd *cobra.Command, _ []string, cl *imageclient.Client) error {
				return in.run(cmd, cl, args[0], kind, labels)
			})(cmd, args)
		},
	}
	fl := c.Flags()
	fl.StringVar(&in.disk, "disk", "", "the disk image to import: raw or qcow2")
	fl.StringVar(&in.agent, "agent", "cloud-init", "how plants configure the guest: vmgrid, qemu-ga or cloud-init")
	fl.IntVar(&in.vcpus, "vcpus", 1, "virtual CPUs of its machines")
	fl.IntVar(&in.memoryMiB, "memory-mib", 512, "guest memory in MiB of its machines")
	fl.StringVar(&in.arch, "arch", "x86_64", "guest architecture")
	fl.StringVar(&in.os, "os", "", "guest operating system, e.g. debian-12")
	fl.StringArrayVar(&in.labels, "label", nil, "KEY=VALUE label; repeat")
	fl.BoolVarP(&in.quiet, "quiet", "q", false, "no progress bar")
	return c
}

func (in *importFlags) run(cmd *cobra.Command, cl *imageclient.Client, name string, kind imagev1.GuestAgent, labels map[string]string) error {
	ctx := cmd.Context()
	if _, err := cl.API.GetImage(ctx, &imagev1.GetImageRequest{Name: name}); err == nil {
		return fmt.Errorf("image %q already exists: remove it (vmgrid image rm %s) or pick another name: %w", name, name, errdefs.ErrAlreadyExists)
	} else if !errdefs.IsNotFound(err) {
		return err
	}
	work, err := os.MkdirTemp("", "vmgrid-import-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	start := time.Now()
	format, err := ImportDisk(ctx, in.disk, filepath.Join(work, plant.RootFile))
	if err != nil {
		return err
	}
	converted := time.Since(start)
	cfgPath := filepath.Join(work, plant.ConfigFile)
	b, _ := json.MarshalIndent(plant.FirmwareConfig(in.vcpus, in.memoryMiB, kind), "", "  ")
	if err := os.WriteFile(cfgPath, b, 0o644); err != nil {
		return err
	}
	if labels == nil {
		labels = map[string]string{}
	}
	labels["imported-from"], labels["imported-format"] = filepath.Base(in.disk), format
	spec := imageclient.PublishSpec{Name: name, Attributes: &imagev1.ImageAttributes{
		Arch: in.arch, Vcpus: uint32(in.vcpus), MemoryMib: uint64(in.memoryMiB), Os: in.os, Labels: labels,
		Boot: imagev1.Boot_BOOT_FIRMWARE, GuestAgent: kind,
	}, Files: []imageclient.PublishFile{
		{Name: plant.ConfigFile, Path: cfgPath, Kind: imagev1.FileKind_FILE_KIND_CONFIG},
		{Name: plant.RootFile, Path: filepath.Join(work, plant.RootFile), Kind: imagev1.FileKind_FILE_KIND_DISK},
	}}
	var resp *imagev1.PublishResponse
	took, err := transfer(cmd, in.quiet, "publishing "+name, func(update func(done, total uint64)) (err error) {
		resp, err = cl.Publish(ctx, spec, update)
		return err
	})
	if err != nil {
		return err
	}
	disk := resp.Manifest.Files[1]
	for _, fm := range resp.Manifest.Files {
		if fm.Name == plant.RootFile {
			disk = fm
		}
	}
	fmt.Fprintf(cmd.OutOrStdout(), "imported %s from %s (%s): disk %s, %s not zero; converted in %s, %s sent in %s\n",
		name, in.disk, format, humanBytes(disk.Size), humanBytes(disk.NonzeroBytes), converted.Round(time.Millisecond), humanBytes(resp.BytesReceived), took)
	return nil
}

// qemuImgInfo is what import reads of qemu-img info --output=json.
type qemuImgInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	BackingFile string `json:"backing-filename"`
}

// qemuImgCheck is qemu-img check --output=json.
type qemuImgCheck struct {
	Corruptions int `json:"corruptions"`
	Leaks       int `json:"leaks"`
	CheckErrors int `json:"check-errors"`
}

// ImportDisk checks a raw or qcow2 disk and converts it to a sparse raw
// disk at out (zero clusters and zero runs become holes). What is wrong
// with the input is an InvalidArgument error naming the file and the
// problem, and out is not left behind.
func ImportDisk(ctx context.Context, disk, out string) (format string, err error) {
	bad := func(what string, detail []byte) error {
		return fmt.Errorf("--disk %s: %s: %s: %w", disk, what, strings.TrimSpace(string(detail)), errdefs.ErrInvalidArgument)
	}
	if _, err := os.Stat(disk); err != nil {
		return "", fmt.Errorf("--disk: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	raw, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", disk).CombinedOutput()
	var info qemuImgInfo
	if err != nil || json.Unmarshal(raw, &info) != nil {
		return "", bad("not a disk image qemu-img can read", raw)
	}
	switch {
	case info.Format != "raw" && info.Format != "qcow2":
		return "", bad("format "+info.Format+" (want raw or qcow2)", nil)
	case info.BackingFile != "":
		return "", bad("a qcow2 with a backing file ("+info.BackingFile+"); convert it to a standalone image first", nil)
	}
	if info.Format == "qcow2" {
		if err := checkQcow2(ctx, disk); err != nil {
			return "", err
		}
	}
	if b, err := exec.CommandContext(ctx, "qemu-img", "convert", "-q", "-f", info.Format, "-O", "raw", "-S", "4k", disk, out).CombinedOutput(); err != nil {
		os.Remove(out)
		return "", bad("unreadable "+info.Format+" (qemu-img convert)", b)
	}
	return info.Format, nil
}

// checkQcow2 runs qemu-img check: a truncated qcow2 (its tables point past
// the end of the file) or one with corrupt tables is refused with the
// first problem qemu-img names. (qemu-img convert alone reads a truncated
// qcow2 "successfully", as zeros.) Leaked clusters are harmless.
func checkQcow2(ctx context.Context, disk string) error {
	cmd := exec.CommandContext(ctx, "qemu-img", "check", "-f", "qcow2", "--output=json", disk)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var chk qemuImgCheck
	if jerr := json.Unmarshal(out, &chk); jerr == nil && chk.Corruptions == 0 && chk.CheckErrors == 0 {
		return nil
	}
	first := strings.TrimSpace(stderr.String())
	if i := strings.IndexByte(first, '\n'); i > 0 {
		first = first[:i]
	}
	what := "corrupt qcow2"
	if strings.Contains(stderr.String(), "end of the file") {
		what = "truncated qcow2 (its tables point past the end of the file)"
	}
	return fmt.Errorf("--disk %s: %s: qemu-img check found %d corruptions and %d check errors (%v), first: %s: %w",
		disk, what, chk.Corruptions, chk.CheckErrors, err, first, errdefs.ErrInvalidArgument)
}
