package clonebench

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Results of one run: what `vmgrid bench clone` writes as results.json.
type Results struct {
	Command     string    `json:"command"`
	Started     time.Time `json:"started"`
	TookSeconds float64   `json:"took_seconds"`
	Machine     Machine   `json:"machine"`
	Settings    Settings  `json:"settings"`
	Golden      Golden    `json:"golden"`
	Rows        []*Row    `json:"rows"`
	Targets     []Target  `json:"targets"`
}

// Machine is what the numbers were measured on.
type Machine struct {
	Cores     int     `json:"cores"`
	CPU       string  `json:"cpu"`
	MemoryGiB float64 `json:"memory_gib"`
	Kernel    string  `json:"kernel"`
	QEMU      string  `json:"qemu"`
	Accel     string  `json:"accel"`
	GoVersion string  `json:"go"`
	// Load is /proc/loadavg's 1-minute load at the start and the end of
	// the run: other work on the machine shows here.
	Load [2]float64 `json:"load"`
}

// Settings of the run.
type Settings struct {
	// RTTSeconds is the round trip the WAN adds (whole milliseconds each
	// way, as toxiproxy's latency toxic takes them).
	RTTSeconds    float64 `json:"rtt_seconds"`
	BandwidthMbit float64 `json:"bandwidth_mbit"`
	Repeats       int     `json:"repeats"`
	Plants        int     `json:"plants"`
	Compress      bool    `json:"compress"`
	WAN           string  `json:"wan"`
	PageCache     string  `json:"page_cache"`
}

// Golden describes the golden image cloned.
type Golden struct {
	Files        []GoldenFile `json:"files"`
	Size         uint64       `json:"size"`
	BuildSeconds float64      `json:"build_seconds"`
	// Recipe built it, or Image was fetched (--image).
	Recipe string `json:"recipe"`
	Image  string `json:"image,omitempty"`
	// MemoryZstd is the memory state compressed with zstd (default level).
	MemoryZstd uint64 `json:"memory_zstd"`
}

// GoldenFile is one file of the golden image.
type GoldenFile struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"`
	Size    uint64 `json:"size"`
	NonZero uint64 `json:"non_zero"` // bytes in non-zero 4 KiB pages
}

// Row is one line of the table.
type Row struct {
	Key  string `json:"key"`
	Name string `json:"name"`
	How  string `json:"how"`
	// Reference rows explain others; they are not among the compared
	// systems.
	Reference bool     `json:"reference,omitempty"`
	Runs      []Sample `json:"runs"`
	// Seconds over the runs.
	Median float64 `json:"median_seconds"`
	Min    float64 `json:"min_seconds"`
	Max    float64 `json:"max_seconds"`
	// WANBytes is the median of the bytes that crossed the WAN, both
	// directions (for the limit row: the compressed bytes the cold clone
	// needed).
	WANBytes uint64 `json:"wan_bytes"`
	// VsFullCopy is how many times faster than a full copy (full copy
	// median ÷ this median); VsLocal how many times slower than local.
	VsFullCopy float64 `json:"vs_full_copy"`
	VsLocal    float64 `json:"vs_local"`
	// Phases are the medians of the runs' phases.
	Phases map[string]float64 `json:"phases,omitempty"`
}

// Sample is one measurement of a row.
type Sample struct {
	Seconds float64 `json:"seconds"`
	WANUp   uint64  `json:"wan_bytes_up"`
	WANDown uint64  `json:"wan_bytes_down"`
	Phases  Phases  `json:"phases,omitempty"`
	// Plane is what the plants' data planes did (vmgrid rows): ReadBlocks
	// requests sent upstream (round trips, pipelined), block bytes
	// fetched, blocks prefetched, whole-file bytes received.
	Plane *Plane `json:"plane,omitempty"`
	// Link is how the cold clone used the WAN (cold row).
	Link *LinkUse `json:"link,omitempty"`
	// Needed is what the cold clone needed (cold row).
	Needed *Needed `json:"needed,omitempty"`
	// PerPlant is each plant's time to ready in a parallel run.
	PerPlant []float64 `json:"per_plant_seconds,omitempty"`
}

// Target is one of the goals of the issue, reported, not asserted.
type Target struct {
	Name string  `json:"name"`
	Got  float64 `json:"got"`
	Want string  `json:"want"`
	Met  bool    `json:"met"`
}

// Row returns the row of a key, or nil.
func (r *Results) Row(key string) *Row {
	for _, row := range r.Rows {
		if row.Key == key {
			return row
		}
	}
	return nil
}

type rowDesc struct {
	key, name, how string
	ref, perPlant  bool
}

var rowInfo = []rowDesc{
	{RowLocal, "local", "golden files on the compute side's disk (page cache dropped): qcow2 redo log, vmm.Restore, agent, set_hostname", false, false},
	{RowFullCopy, "full copy", "every file over one plain TCP stream across the WAN (like scp), then the local clone", false, false},
	{RowNBD, "qemu-nbd", "root disk from qemu-nbd across the WAN (redo log backed by nbd://); memory state, kernel, initrd copied whole first", false, false},
	{RowCold, "vmgrid cold (eager)", "fresh plant (empty block, file, manifest and page caches) reading from the image server across the WAN", false, false},
	{RowWarm, "vmgrid warm", "second clone on the same plant", false, false},
	{RowAuto, "vmgrid cold, auto", "fresh plant, --memory-restore auto, the image without a profile: lazy, the RAM file streaming in the prefetch class from the restore on (this clone records the profile)", false, false},
	{RowLazy, "vmgrid cold, lazy", "fresh plant, --memory-restore lazy, the image without a profile: RAM pages on first touch (this clone records the profile)", false, false},
	{RowLazyProfile, "vmgrid cold, lazy + profile", "fresh plant, lazy, prefetching the profile the lazy clone recorded", false, false},
	{RowWarmLazy, "vmgrid warm, lazy", "second clone on the lazy + profile row's plant (the blocks the first read are cached)", false, false},
	{RowLazy4x, "vmgrid cold, lazy, 4x RAM", "as vmgrid cold, lazy, for the same recipe built with 4x the guest's RAM", false, false},
	{RowLazyProfile4x, "vmgrid cold, lazy + profile, 4x RAM", "as vmgrid cold, lazy + profile, for the image with 4x the RAM; goal ≤ 1.2x the 1x row", false, false},
	{RowWorkEager, "workload after eager", "a workload touching most of the guest's memory (running binaries; 70% of available memory written and read in a tmpfs), run right after a cold eager clone is ready; the workload's time", false, false},
	{RowWorkLazy, "workload after lazy", "the same right after a cold lazy clone (with the profile) is ready, hydrating after 1 s as by default; goal ≤ 1.1x after eager", false, false},
	{RowDemandIdle, "demand block read, idle link", "one uncached 64 KiB block of the root disk read through a plant's data plane (its FUSE view's read path), nothing else on the link", false, false},
	{RowDemandBulk, "demand block read, bulk streaming", "the same while the plant copies an image's whole RAM (another clone's eager restore) over the same link; goal ≤ 2 RTT + the block's transfer time", false, false},
	{RowL2, "vmgrid L2", "fresh plant reading from a warm cache proxy on the compute side (its upstream: the WAN)", false, false},
	{RowParallel, "vmgrid parallel", "N fresh plants (--memory-restore auto: lazy + profile once the lazy rows made one) clone at once across the shared WAN; makespan", false, true},
	{RowLimit, "limit", "local + compressed bytes the cold clone needed (the lazy clone's: what its guest touched, when measured) ÷ bandwidth + 1 RTT", false, false},
	{RowParallelL2, "ref: parallel via L2", "N fresh plants behind one cold cache proxy (the WAN carries the image once); makespan", true, true},
	{RowParallelLocal, "ref: parallel local", "N local clones at once (what the cores allow); makespan", true, true},
}

// finish orders the rows, adds the limit row, and computes medians, ratios
// and targets.
func (b *bench) finish(res *Results) {
	rtt := time.Duration(b.opts.RTT.Milliseconds()/2*2) * time.Millisecond
	res.Settings = Settings{
		RTTSeconds: rtt.Seconds(), BandwidthMbit: b.opts.BandwidthMbit, Repeats: b.opts.Repeats, Plants: b.opts.Plants, Compress: b.opts.Compress,
		WAN:       "toxiproxy (in-process): latency toxic RTT/2 each way + bandwidth shared by every connection, per direction",
		PageCache: "local files: fsync + posix_fadvise(DONTNEED) before each local run; vmgrid: fresh data dir and FUSE mount per cold plant",
	}
	b.limitRow(rtt)
	for _, info := range rowInfo {
		if row := b.rows[info.key]; row != nil && len(row.Runs) > 0 {
			b.summarize(row, info)
			res.Rows = append(res.Rows, row)
		}
	}
	full, local := res.Row(RowFullCopy), res.Row(RowLocal)
	for _, row := range res.Rows {
		if full != nil && row.Median > 0 {
			row.VsFullCopy = full.Median / row.Median
		}
		if local != nil && local.Median > 0 {
			row.VsLocal = row.Median / local.Median
		}
	}
	res.checkTargets()
}

// limitRow is the floor: local plus the compressed bytes a cold clone
// needed over the bandwidth plus one round trip.
func (b *bench) limitRow(rtt time.Duration) {
	bps := b.opts.BandwidthMbit * 1e6
	local, cold := b.rows[RowLocal], b.rows[RowCold]
	if lazy := b.rows[RowLazy]; lazy != nil {
		cold = lazy // what the guest touched, not the whole memory state
	}
	if local == nil || cold == nil {
		return
	}
	lim := &Row{Key: RowLimit}
	for i := range min(len(local.Runs), len(cold.Runs)) {
		nd := cold.Runs[i].Needed
		s := local.Runs[i].Seconds + rtt.Seconds()
		if bps > 0 && nd != nil {
			s += float64(nd.Compressed) * 8 / bps
		}
		r := Sample{Seconds: s}
		if nd != nil {
			r.WANDown = nd.Compressed
		}
		lim.Runs = append(lim.Runs, r)
	}
	b.rows[RowLimit] = lim
}

// summarize names a row and computes its median, range, WAN bytes and
// phase medians from its runs.
func (b *bench) summarize(row *Row, info rowDesc) {
	row.Name, row.How, row.Reference = info.name, info.how, info.ref
	if info.perPlant {
		row.Name += fmt.Sprintf(" ×%d", b.opts.Plants)
	}
	secs := make([]float64, len(row.Runs))
	bytes := make([]float64, len(row.Runs))
	phaseRuns := map[string][]float64{}
	for i, r := range row.Runs {
		secs[i] = r.Seconds
		bytes[i] = float64(r.WANUp + r.WANDown)
		for k, v := range r.Phases {
			phaseRuns[k] = append(phaseRuns[k], v)
		}
	}
	row.Median, row.Min, row.Max = stats(secs)
	mb, _, _ := stats(bytes)
	row.WANBytes = uint64(mb)
	if len(phaseRuns) > 0 {
		row.Phases = map[string]float64{}
		for k, v := range phaseRuns {
			row.Phases[k], _, _ = stats(v)
		}
	}
}

// checkTargets compares the rows with the paper's claims.
func (res *Results) checkTargets() {
	ratio := func(a, b string) float64 {
		ra, rb := res.Row(a), res.Row(b)
		if ra == nil || rb == nil || rb.Median == 0 {
			return 0
		}
		return ra.Median / rb.Median
	}
	for _, t := range []struct {
		name, want string
		a, b       string
		limit      float64
		atLeast    bool
	}{
		{"cold ≥ 25x faster than full copy", "≥ 25", RowFullCopy, RowCold, 25, true},
		{"cold ≤ 0.5x qemu-nbd", "≤ 0.5", RowCold, RowNBD, 0.5, false},
		{"warm ≤ 1.1x local", "≤ 1.1", RowWarm, RowLocal, 1.1, false},
		{"cold ≤ 1.5x limit", "≤ 1.5", RowCold, RowLimit, 1.5, false},
		{"parallel makespan ≤ 1.5x one cold clone", "≤ 1.5", RowParallel, RowCold, 1.5, false},
		{"lazy + profile ≥ 25x faster than full copy", "≥ 25", RowFullCopy, RowLazyProfile, 25, true},
		{"lazy + profile ≤ 1.3x limit", "≤ 1.3", RowLazyProfile, RowLimit, 1.3, false},
		{"lazy + profile faster than eager", "≤ 1", RowLazyProfile, RowCold, 1, false},
		{"auto without a profile ≤ eager", "≤ 1", RowAuto, RowCold, 1, false},
		{"lazy + profile, 4x RAM ≤ 1.2x 1x RAM", "≤ 1.2", RowLazyProfile4x, RowLazyProfile, 1.2, false},
		{"parallel makespan ≤ 2x one lazy + profile clone", "≤ 2", RowParallel, RowLazyProfile, 2, false},
		{"parallel via a cache proxy ≤ 2x one lazy + profile clone", "≤ 2", RowParallelL2, RowLazyProfile, 2, false},
		{"workload after lazy ≤ 1.1x after eager", "≤ 1.1", RowWorkLazy, RowWorkEager, 1.1, false},
		{"warm lazy ≤ 1.1x local", "≤ 1.1", RowWarmLazy, RowLocal, 1.1, false},
	} {
		got := ratio(t.a, t.b)
		if got == 0 {
			continue // a row was not measured
		}
		met := got <= t.limit
		if t.atLeast {
			met = got >= t.limit
		}
		res.Targets = append(res.Targets, Target{Name: t.name, Want: t.want, Got: got, Met: met})
	}
	// A demand read while bulk streams: ≤ 2 RTT + its block's transfer time.
	if d := res.Row(RowDemandBulk); d != nil && res.Settings.BandwidthMbit > 0 {
		limit := 2*res.Settings.RTTSeconds + float64(benchCache.BlockSize)*8/(res.Settings.BandwidthMbit*1e6)
		got := d.Median / limit
		res.Targets = append(res.Targets, Target{Name: "demand read while bulk streams ≤ 2 RTT + its bytes", Want: "≤ 1", Got: got, Met: got <= 1})
	}
}

// times formats a ratio ("–" when a row it needs was not measured).
func times(x float64, prec int) string {
	if x == 0 {
		return "–"
	}
	return fmt.Sprintf("%.*fx", prec, x)
}

func mb(b uint64) string { return fmt.Sprintf("%.1f", float64(b)/1e6) }

// WriteTable prints the table and the targets.
func (r *Results) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "row\tmedian s\tmin s\tmax s\tWAN MB\tfull copy ÷ row\trow ÷ local\t\n")
	for _, row := range r.Rows {
		fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t\n", row.Name, row.Median, row.Min, row.Max, mb(row.WANBytes), times(row.VsFullCopy, 1), times(row.VsLocal, 2))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nWAN: RTT %v, %g Mbit/s; %d repeat(s), %d plants; %d cores, %s, %s; load %.1f → %.1f\n",
		time.Duration(r.Settings.RTTSeconds*float64(time.Second)), r.Settings.BandwidthMbit, r.Settings.Repeats, r.Settings.Plants,
		r.Machine.Cores, r.Machine.Accel, r.Machine.QEMU, r.Machine.Load[0], r.Machine.Load[1])
	for _, t := range r.Targets {
		fmt.Fprintf(w, "target %-42s got %6.2f  want %s  %s\n", t.Name, t.Got, t.Want, metWord(t.Met))
	}
	return nil
}

func metWord(met bool) string {
	if met {
		return "met"
	}
	return "MISSED"
}

// WriteMarkdown writes the report as Markdown.
func (r *Results) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# vmgrid bench clone\n\n")
	fmt.Fprintf(&b, "Cloning the %s golden image (GVFS §4.3, Figure 6 / Table 1) through an emulated WAN: RTT %v, %g Mbit/s.\n\n",
		r.Golden.name(), time.Duration(r.Settings.RTTSeconds*float64(time.Second)), r.Settings.BandwidthMbit)
	fmt.Fprintf(&b, "- command: `%s`\n- started: %s, took %.0f s\n", r.Command, r.Started.Format(time.RFC3339), r.TookSeconds)
	fmt.Fprintf(&b, "- machine: %d cores (%s), %.0f GiB, Linux %s, %s, accel %s, %s; load average %.1f at the start, %.1f at the end\n",
		r.Machine.Cores, r.Machine.CPU, r.Machine.MemoryGiB, r.Machine.Kernel, r.Machine.QEMU, r.Machine.Accel, r.Machine.GoVersion, r.Machine.Load[0], r.Machine.Load[1])
	fmt.Fprintf(&b, "- repeats: %d (median, min, max); parallel rows: %d plants; WAN rows ask for zstd blocks: %v\n",
		r.Settings.Repeats, r.Settings.Plants, r.Settings.Compress)
	fmt.Fprintf(&b, "- WAN: %s\n- caches: %s\n", r.Settings.WAN, r.Settings.PageCache)
	fmt.Fprintf(&b, "- golden image (%.1f MB):", float64(r.Golden.Size)/1e6)
	for _, f := range r.Golden.Files {
		fmt.Fprintf(&b, " %s %s MB (%s MB non-zero);", f.Name, mb(f.Size), mb(f.NonZero))
	}
	fmt.Fprintf(&b, " memory state zstd-compressed %s MB; built in %.0f s", mb(r.Golden.MemoryZstd), r.Golden.BuildSeconds)
	b.WriteString("\n\nEach row is timed from the clone request to the clone's guest agent answering after set_hostname.\n\n")
	b.WriteString("| row | median s | min s | max s | WAN MB | full copy ÷ row | row ÷ local | how |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %.2f | %s | %s | %s | %s |\n", row.Name, row.Median, row.Min, row.Max, mb(row.WANBytes), times(row.VsFullCopy, 1), times(row.VsLocal, 2), row.How)
	}
	b.WriteString("\n## Targets (reported, not asserted)\n\n| target | got | want | |\n|---|---:|---|---|\n")
	for _, t := range r.Targets {
		fmt.Fprintf(&b, "| %s | %.2f | %s | %s |\n", t.Name, t.Got, t.Want, metWord(t.Met))
	}
	b.WriteString("\n## Phases (median seconds)\n\n| row | phases |\n|---|---|\n")
	for _, row := range r.Rows {
		if len(row.Phases) == 0 {
			continue
		}
		keys := make([]string, 0, len(row.Phases))
		for k := range row.Phases {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var ps []string
		for _, k := range keys {
			ps = append(ps, fmt.Sprintf("%s %.2f", k, row.Phases[k]))
		}
		fmt.Fprintf(&b, "| %s | %s |\n", row.Name, strings.Join(ps, ", "))
	}
	if cold := r.Row(RowCold); cold != nil && len(cold.Runs) > 0 {
		b.WriteString("\n## What the cold clone fetched (first repeat)\n\n")
		run := cold.Runs[0]
		if p := run.Plane; p != nil {
			fmt.Fprintf(&b, "- block bytes %s MB in %d ReadBlocks requests (%d blocks prefetched); whole-file bytes %s MB\n",
				mb(p.BlockBytes), p.Requests, p.Prefetched, mb(p.FileBytes))
		}
		if nd := run.Needed; nd != nil {
			fmt.Fprintf(&b, "- needed (non-zero) %s MB, zstd fastest %s MB; per file:", mb(nd.Bytes), mb(nd.Compressed))
			names := make([]string, 0, len(nd.Files))
			for k := range nd.Files {
				names = append(names, k)
			}
			sort.Strings(names)
			for _, k := range names {
				fmt.Fprintf(&b, " %s %s MB;", k, mb(nd.Files[k]))
			}
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "- WAN bytes: %s MB down, %s MB up\n", mb(run.WANDown), mb(run.WANUp))
		if l := run.Link; l != nil {
			fmt.Fprintf(&b, "- the link: first byte at %.2f s, last at %.2f s of %.2f s; busy %.2f s at full bandwidth (%.0f%%)",
				l.FirstByte, l.LastByte, run.Seconds, l.Busy, 100*l.Utilization)
			if len(l.Gaps) > 0 {
				b.WriteString("; idle between:")
				for _, g := range l.Gaps {
					fmt.Fprintf(&b, " %.0f ms at %.2f s;", 1000*g[1], g[0])
				}
			}
			b.WriteString("\n")
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteFiles writes results.json and results.md into dir.
func (r *Results) WriteFiles(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	var md strings.Builder
	if err := r.WriteMarkdown(&md); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "results.md"), []byte(md.String()), 0o644)
}

// name is how the report names the golden image.
func (g Golden) name() string {
	if g.Image != "" {
		return fmt.Sprintf("%q", g.Image)
	}
	if g.Recipe == "" {
		return "tiny"
	}
	return g.Recipe
}
