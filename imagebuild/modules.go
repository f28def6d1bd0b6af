package imagebuild

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Module is one loadable kernel module of a Kernel.
type Module struct {
	// Name is the module's name as the kernel knows it (underscores).
	Name string `json:"name"`
	// RelPath is the file relative to the modules directory
	// (kernel/drivers/virtio/virtio.ko); the same path is used in the guest
	// under /lib/modules/<release>/.
	RelPath string `json:"rel_path"`
	// Depends are the modules that must be loaded first (from .modinfo).
	Depends []string `json:"depends,omitempty"`
}

// modName normalises a module name: the kernel treats '-' and '_' alike
// (virtio-rng.ko is the module virtio_rng).
func modName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// Modules returns the named modules and everything they depend on, in an
// order that insmod can load them (dependencies first). Modules built into
// the kernel (modules.builtin) are left out: they need no loading. The
// extracted package has no modules.dep, so dependencies are read from each
// module's .modinfo section.
func (k *Kernel) Modules(names ...string) ([]Module, error) {
	index := map[string]string{} // name → rel path
	root := filepath.Join(k.ModulesDir, "kernel")
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(path, ".ko") {
			rel, _ := filepath.Rel(k.ModulesDir, path)
			index[modName(path)] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules of %s: %w", k.Release, err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(k.ModulesDir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			builtin[modName(sc.Text())] = true
		}
	}

	var order []Module
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		name = modName(name)
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, name), " → "))
		}
		rel, ok := index[name]
		if !ok {
			if builtin[name] {
				state[name] = done
				return nil
			}
			if len(chain) > 0 {
				return fmt.Errorf("module %s (needed by %s) is not in kernel %s", name, chain[len(chain)-1], k.Release)
			}
			return fmt.Errorf("module %s is not in kernel %s", name, k.Release)
		}
		state[name] = visiting
		deps, err := moduleDepends(filepath.Join(k.ModulesDir, rel))
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, Module{Name: name, RelPath: rel, Depends: deps})
		return nil
	}
	for _, n := range names {
		if err := visit(n, nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleDepends reads the depends= entry of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w (compressed modules are not supported)", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, modName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// InstallModules copies the named modules and their dependencies into
// rootDir/lib/modules/<release>/ and returns them in load order; the guest
// paths are "/lib/modules/<release>/" + RelPath.
func (k *Kernel) InstallModules(rootDir string, names ...string) ([]Module, error) {
	mods, err := k.Modules(names...)
	if err != nil {
		return nil, err
	}
	for _, m := range mods {
		dst := filepath.Join(rootDir, "lib", "modules", k.Release, m.RelPath)
		if err := copyFile(filepath.Join(k.ModulesDir, m.RelPath), dst, 0o644); err != nil {
			return nil, err
		}
	}
	return mods, nil
}

// GuestPath is where InstallModules puts m in the guest of kernel release.
func (m Module) GuestPath(release string) string {
	return "/lib/modules/" + release + "/" + filepath.ToSlash(m.RelPath)
}
