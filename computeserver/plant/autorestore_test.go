package plant

import (
	"testing"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

func TestChooseRestore(t *testing.T) {
	for _, tc := range []struct {
		name            string
		local, profiled bool
		free            bool // the image's recorder on the plant is free
		want            MemoryRestore
		asked, records  bool
	}{
		{name: "RAM file in the block cache", local: true, want: RestoreLazy},
		{name: "RAM file local and a profile", local: true, profiled: true, want: RestoreLazy},
		{name: "a profile", profiled: true, free: true, want: RestoreLazy},
		{name: "no profile, recorder free", free: true, want: RestoreLazy, asked: true, records: true},
		{name: "no profile, another clone records", want: RestoreEager, asked: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			asked := false
			mode, why, records := chooseRestore(tc.local, tc.profiled, func() bool { asked = true; return tc.free })
			if mode != tc.want || records != tc.records || asked != tc.asked {
				t.Fatalf("got %s (%q), records %v, recorder asked %v; want %s, records %v, asked %v",
					mode, why, records, asked, tc.want, tc.records, tc.asked)
			}
			if why == "" {
				t.Fatal("no reason given")
			}
		})
	}
}

// ramFile is a RAM file of which local bytes are here.
type ramFile struct {
	gvfs.File
	size, local uint64
}

func (f ramFile) Size() uint64       { return f.size }
func (f ramFile) LocalBytes() uint64 { return f.local }

// TestMemoryModeRecorder: auto lets one clone of an image at a time on a
// plant restore lazily without a profile (it records one); the next
// restores eagerly until the recorder is released, other images and
// clones with a profile or a local RAM file are not held up.
func TestMemoryModeRecorder(t *testing.T) {
	p := &Plant{cfg: Config{MemoryRestore: RestoreAuto}}
	cold := ramFile{size: 256 << 20, local: 160 << 20}
	newProfile := func() *profile { return &profile{release: func() {}} }

	first := newProfile()
	if mode, why := p.memoryMode("a", cold, first); mode != RestoreLazy {
		t.Fatalf("first clone without a profile: %s (%s), want lazy (it records)", mode, why)
	}
	if mode, why := p.memoryMode("a", cold, newProfile()); mode != RestoreEager {
		t.Fatalf("second clone while the first records: %s (%s), want eager", mode, why)
	}
	if mode, _ := p.memoryMode("b", cold, newProfile()); mode != RestoreLazy {
		t.Fatalf("another image's first clone: %s, want lazy", mode)
	}
	if mode, _ := p.memoryMode("a", ramFile{size: 256 << 20, local: 256 << 20}, newProfile()); mode != RestoreLazy {
		t.Fatalf("a clone whose RAM file is local: %s, want lazy", mode)
	}
	if mode, _ := p.memoryMode("a", cold, &profile{run: &gvfs.ProfileRun{}, release: func() {}}); mode != RestoreLazy {
		t.Fatalf("a clone with a profile: %s, want lazy", mode)
	}
	first.release()
	first.release() // once
	third := newProfile()
	if mode, _ := p.memoryMode("a", cold, third); mode != RestoreLazy {
		t.Fatalf("after the recorder is done: %s, want lazy", mode)
	}
	if mode, _ := p.memoryMode("a", cold, newProfile()); mode != RestoreEager {
		t.Fatalf("released twice let two clones record: %s", mode)
	}

	for _, m := range []MemoryRestore{RestoreLazy, RestoreEager} {
		p := &Plant{cfg: Config{MemoryRestore: m}}
		for _, f := range []ramFile{cold, {size: 1, local: 1}} {
			if got, _ := p.memoryMode("a", f, newProfile()); got != m {
				t.Fatalf("--memory-restore %s chose %s", m, got)
			}
		}
	}
}
