package imagebuild

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ReadyMarker is the line every recipe's init prints on the serial console
// once the guest's userland is up (file systems mounted, modules loaded),
// just before it runs the image's hook. Drivers wait for it.
const ReadyMarker = "vmgrid-guest: ready"

// Recipe builds the files of one golden image.
type Recipe interface {
	// Name identifies the recipe ("tiny").
	Name() string
	// Build writes the image's files into outDir (created if missing) and
	// describes them. Inputs that are expensive to obtain (the kernel
	// package) come from a cache, so a second build is cheap.
	Build(ctx context.Context, outDir string) (*Image, error)
}

// Image is what a Recipe built: the files a VMM needs to boot the golden
// image and the attributes an image server catalogues it under.
type Image struct {
	Recipe string `json:"recipe"`
	// Kernel is the kernel for direct boot (QEMU -kernel), inside outDir.
	Kernel string `json:"kernel"`
	// Initrd is the initramfs (QEMU -initrd), inside outDir; empty if the
	// image needs none.
	Initrd string `json:"initrd,omitempty"`
	// KernelRelease is its uname -r; KernelPackage and KernelVersion name
	// the Debian package it came from.
	KernelRelease string `json:"kernel_release"`
	KernelPackage string `json:"kernel_package"`
	KernelVersion string `json:"kernel_version"`
	// RootDisk is a raw ext4 image, inside outDir.
	RootDisk string `json:"root_disk"`
	// RootInterface is how a machine must attach RootDisk (as its first
	// disk): RootVirtio or RootNVMe. Cmdline names the matching device.
	RootInterface string `json:"root_interface"`
	// Cmdline is the kernel command line (QEMU -append).
	Cmdline string `json:"cmdline"`
	// Modules are the kernel modules the guest's init loads, in that order.
	Modules []Module `json:"modules"`
	// Attributes are the defaults a machine of this image runs with.
	Attributes Attributes `json:"attributes"`
	// Ready, when set, is a command a golden builder runs in the guest
	// through the agent once it answers, before anything else: it returns
	// when the guest's boot is complete and exits 0 if it went well (the
	// debian image waits for systemd's multi-user.target). The agent of a
	// tiny image answers only when its boot is done: it needs none.
	Ready []string `json:"ready,omitempty"`
}

// Attributes describe the machine an image is meant for.
type Attributes struct {
	Arch      string `json:"arch"` // x86_64
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memory_mib"`
	OS        string `json:"os"`
}

// ManifestName is the file Build writes next to the image files: the Image
// as JSON, with paths relative to the directory.
const ManifestName = "image.json"

// writeManifest stores img in outDir/ManifestName with paths relative to
// outDir, so the directory can be moved or published as a unit.
func writeManifest(outDir string, img *Image) error {
	rel := *img
	for _, p := range []*string{&rel.Kernel, &rel.Initrd, &rel.RootDisk} {
		if *p == "" {
			continue
		}
		if r, err := filepath.Rel(outDir, *p); err == nil {
			*p = r
		}
	}
	b, err := json.MarshalIndent(rel, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(outDir, ManifestName), append(b, '\n'), 0o644)
}

// ReadManifest loads the Image that Build wrote into dir, with absolute paths.
func ReadManifest(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, err
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestName), err)
	}
	for _, p := range []*string{&img.Kernel, &img.Initrd, &img.RootDisk} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	return &img, nil
}

// guestJoin maps an absolute guest path into rootDir; ".." cannot escape it.
func guestJoin(rootDir, guestPath string) string {
	return filepath.Join(rootDir, filepath.Clean("/"+strings.TrimPrefix(guestPath, "/")))
}
