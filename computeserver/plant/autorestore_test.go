package plant

import (
	"testing"

	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

// ramFile is a RAM file of which local bytes are here.
type ramFile struct {
	gvfs.File
	size, local uint64
}

func (f ramFile) Size() uint64       { return f.size }
func (f ramFile) LocalBytes() uint64 { return f.local }

// TestMemoryMode: auto restores lazily, streaming the RAM file when the
// image has no profile and the file is not local; lazy and eager are
// what they say, and lazy never streams.
func TestMemoryMode(t *testing.T) {
	cold := ramFile{size: 256 << 20, local: 160 << 20}
	local := ramFile{size: 256 << 20, local: 256 << 20}
	profiled := &profile{run: &gvfs.ProfileRun{}}
	recording := &profile{} // no profile to prefetch: only the recording
	for _, tc := range []struct {
		name       string
		configured MemoryRestore
		ram        ramFile
		pr         *profile
		want       MemoryRestore
		stream     bool
	}{
		{"auto, no profile, RAM file not local", RestoreAuto, cold, recording, RestoreLazy, true},
		{"auto, a profile", RestoreAuto, cold, profiled, RestoreLazy, false},
		{"auto, RAM file local", RestoreAuto, local, recording, RestoreLazy, false},
		{"auto, RAM file local and a profile", RestoreAuto, local, profiled, RestoreLazy, false},
		{"lazy, no profile", RestoreLazy, cold, recording, RestoreLazy, false},
		{"lazy, a profile", RestoreLazy, cold, profiled, RestoreLazy, false},
		{"eager, no profile", RestoreEager, cold, nil, RestoreEager, false},
		{"eager, RAM file local", RestoreEager, local, nil, RestoreEager, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Plant{cfg: Config{MemoryRestore: tc.configured}}
			mode, why, stream := p.memoryMode(tc.ram, tc.pr)
			if mode != tc.want || stream != tc.stream {
				t.Fatalf("got %s, stream %v (%q); want %s, stream %v", mode, stream, why, tc.want, tc.stream)
			}
			if why == "" {
				t.Fatal("no reason given")
			}
		})
	}
}
