package plant

import (
	"sync"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

// --memory-restore auto. What decides between lazy and eager is whether
// the guest's first seconds fault pages through a long link one round trip
// at a time. Measured on the tiny guest across 40 ms / 100 Mbit
// (`vmgrid bench clone`): eager 3.7 s, lazy with a working-set profile
// 2.1 s, lazy without one 10.2 s. So auto is lazy when the faults cost no
// round trips (the RAM file is in the block cache: a warm plant, or a
// hydrated one) or the profile brings the pages ahead of them, and eager
// otherwise — except that profiles have to be made by someone: while an
// image has none, one clone of it at a time on a plant restores lazily and
// records it (the plant's recorder of the image), and the others restore
// eagerly. Once stored, every later clone on every plant finds it.

// memoryMode resolves the plant's --memory-restore for one clone of image
// (pr: its profile recording and prefetch, nil when none runs). A clone
// that takes the image's recorder holds it until pr is finished or
// abandoned.
func (p *Plant) memoryMode(image string, ram gvfs.File, pr *profile) (MemoryRestore, string) {
	if p.cfg.MemoryRestore == RestoreLazy || p.cfg.MemoryRestore == RestoreEager {
		return p.cfg.MemoryRestore, "--memory-restore " + string(p.cfg.MemoryRestore)
	}
	mode, why, records := chooseRestore(ram.LocalBytes() == ram.Size(), pr != nil && pr.run != nil,
		func() bool { return pr != nil && p.takeRecorder(image) })
	if records {
		pr.release = sync.OnceFunc(func() { p.releaseRecorder(image) })
	}
	return mode, why
}

// chooseRestore is auto's rule (the file's comment): lazy when the RAM
// file is local or the image's profile is being prefetched; without a
// profile lazy for the clone that takes the image's recorder on the plant
// (takeRecorder, asked only then; records: it took it), eager for the
// others.
func chooseRestore(local, profiled bool, takeRecorder func() bool) (mode MemoryRestore, why string, records bool) {
	switch {
	case local:
		return RestoreLazy, "the RAM file is in the block cache", false
	case profiled:
		return RestoreLazy, "the image has a working-set profile", false
	case takeRecorder():
		return RestoreLazy, "the image has no working-set profile yet: this clone records it", true
	}
	return RestoreEager, "the image has no working-set profile yet, and another clone on this plant records it", false
}

// takeRecorder makes the caller the one clone of image on the plant that
// records its profile for auto, unless another clone is.
func (p *Plant) takeRecorder(image string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.recorders[image] {
		return false
	}
	if p.recorders == nil {
		p.recorders = map[string]bool{}
	}
	p.recorders[image] = true
	return true
}

func (p *Plant) releaseRecorder(image string) {
	p.mu.Lock()
	delete(p.recorders, image)
	p.mu.Unlock()
}
