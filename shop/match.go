package shop

import (
	"context"
	"fmt"
	"sort"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/dag"
)

// match finds the golden image for a request: right hardware, performed
// actions passing the subset, prefix and partial-order tests, the most
// actions already done.
func (v *vms) match(ctx context.Context, owner string, req *shopv1.CreateVMRequest, plan *dag.Plan) (string, uint64, *computev1.Hardware, error) {
	hw := req.Hardware
	if hw == nil {
		hw = &computev1.Hardware{}
	}
	list, err := v.cfg.Images.API.ListImages(ctx, &imagev1.ListImagesRequest{Kind: imagev1.ListImagesRequest_KIND_GOLDEN, Arch: hw.Arch})
	if err != nil {
		return "", 0, nil, err
	}
	type cand struct {
		m    *imagev1.Manifest
		done int
	}
	var cands []cand
	var why []string
	for _, m := range list.Images {
		if req.Image != "" && m.Name != req.Image {
			continue
		}
		if !cloneable(m, owner) {
			if req.Image != "" {
				return "", 0, nil, fmt.Errorf("image %q is not a golden image of yours (another owner's, or a suspended VM's state): %w", req.Image, errdefs.ErrPermissionDenied)
			}
			continue
		}
		done, reason := fits(m, hw, plan, req.Image != "")
		if reason != "" {
			why = append(why, reason)
			continue
		}
		if done >= 0 {
			cands = append(cands, cand{m, done})
		}
	}
	if len(cands) == 0 {
		if req.Image != "" && len(why) == 0 {
			return "", 0, nil, fmt.Errorf("image %q is not a golden image of the warehouse: %w", req.Image, errdefs.ErrNotFound)
		}
		return "", 0, nil, fmt.Errorf("no golden image matches the request (%v): %w", why, errdefs.ErrFailedPrecondition)
	}
	// Most actions done first; on a tie, an image with a memory state (a
	// restore) before one that boots cold (an imported stock image).
	sort.SliceStable(cands, func(i, j int) bool {
		if cands[i].done != cands[j].done {
			return cands[i].done > cands[j].done
		}
		return hasMemoryState(cands[i].m) && !hasMemoryState(cands[j].m)
	})
	m := cands[0].m
	var size uint64
	for _, f := range m.Files {
		size += f.NonzeroBytes
	}
	out := &computev1.Hardware{Arch: m.GetAttributes().GetArch(), Vcpus: m.GetAttributes().GetVcpus(), MemoryMib: m.GetAttributes().GetMemoryMib()}
	return m.Name, size, out, nil
}

// fits tests one golden image: it returns how many of its actions are
// done, or why it does not fit, or -1 for an image no plant can run. An
// image the request names (named) accepts its performed actions: no subset
// test (dag.Plan.Accept).
func fits(m *imagev1.Manifest, hw *computev1.Hardware, plan *dag.Plan, named bool) (int, string) {
	a := m.GetAttributes()
	if hw.Vcpus != 0 && hw.Vcpus != a.GetVcpus() || hw.MemoryMib != 0 && hw.MemoryMib != a.GetMemoryMib() {
		return 0, fmt.Sprintf("%s has %d vCPUs and %d MiB", m.Name, a.GetVcpus(), a.GetMemoryMib())
	}
	if !hasFile(m, "vm.json") {
		return -1, ""
	}
	var performed []string
	for _, act := range a.GetActions() {
		performed = append(performed, act.Digest)
	}
	if named {
		accepted := plan.Accept(performed)
		return len(accepted.Steps) - len(accepted.Todo()), ""
	}
	if _, err := plan.Match(performed); err != nil {
		return 0, fmt.Sprintf("%s: %v", m.Name, err)
	}
	return len(performed), ""
}

// cloneable says whether owner's VMs may be cloned from m: the grid's
// golden images and owner's own (published VMs), never another owner's
// nor a suspended VM's state (which only its VM resumes from).
func cloneable(m *imagev1.Manifest, owner string) bool {
	a := m.GetAttributes()
	return a.OwnedBy(owner) && a.GetLabels()[imagev1.SuspendedLabel] == ""
}

func hasFile(m *imagev1.Manifest, name string) bool {
	for _, f := range m.Files {
		if f.Name == name {
			return true
		}
	}
	return false
}

// hasMemoryState says whether clones of m restore rather than boot.
func hasMemoryState(m *imagev1.Manifest) bool {
	for _, f := range m.Files {
		if f.Kind == imagev1.FileKind_FILE_KIND_MEMORY_STATE {
			return true
		}
	}
	return false
}
