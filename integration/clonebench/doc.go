// Package clonebench reproduces the VM cloning experiment of GVFS (Zhao,
// Zhang, Figueiredo, HPDC 2004, §4.3: Figure 6 and Table 1) with vmgrid's
// real pieces: the tiny golden image built and published for real, QEMU
// guests under TCG, compute servers with their FUSE view, and an emulated
// wide-area link between the image side and the compute side. It is the
// engine of `vmgrid bench clone`.
//
// # The WAN
//
// Every byte that crosses from the image side to the compute side goes
// through a toxiproxy proxy (github.com/Shopify/toxiproxy/v2, in-process)
// whose toxics are toxiproxy's own "latency" toxic (RTT/2 each way) and a
// "shared_bandwidth" toxic registered here. toxiproxy's "bandwidth" toxic
// keeps its rate debt per connection, so N plants would each get the whole
// rate; a WAN link is one pipe, so the toxic here puts every connection of
// every proxy of one WAN, per direction, on one serialisation clock (same
// unit as toxiproxy's: KB/s). The clock may lag real time by 2 ms, so a
// sender woken late by its timer loses nothing: the link carries its rate
// (123 MB/s of 125 at 1 Gbit/s, see BenchmarkWANThroughput). It counts the
// payload bytes that cross, which is what the table reports as WAN bytes,
// and for the cold row it samples them every 5 ms to show when the link
// idled. The emulation has no TCP dynamics of its own (no slow start over
// the long RTT): every system compared gets the same ideal pipe.
//
// # Rows
//
// Each row is timed from the clone request to the guest agent of the clone
// answering after a configuration action (set_hostname) ran: the clone is
// usable. The rows, all on this machine in one run, interleaved per repeat:
//
//   - local: the golden files are on the compute side's own disk. A qcow2
//     redo log over the local root disk, vmm.Restore from the local memory
//     state, the agent, set_time and set_hostname: the production line done
//     directly with computeserver/vmm and computeserver/agent (the floor).
//     The kernel page cache of the local files is dropped before every run
//     with posix_fadvise(POSIX_FADV_DONTNEED) (after an fsync), not with
//     /proc/sys/vm/drop_caches, which would also empty the image side's
//     caches and every other process's.
//   - full copy: every file of the image streamed across the WAN over one
//     plain TCP connection (like scp: no compression, zero blocks sent),
//     then the local clone from the copy (its pages are in the page cache,
//     as after a real copy).
//   - qemu-nbd: `qemu-nbd -r -t -x golden` serves the golden root disk on
//     the image side; the redo log is backed by nbd://WAN/golden; memory
//     state, kernel, initrd and vm.json are copied whole first, as above.
//   - vmgrid cold: a compute server (computeserver.Start) whose upstream is
//     the image server across the WAN, Compress on (zstd blocks; the
//     whole-file channel is always zstd), with a fresh data directory: empty
//     block cache, file cache, manifest cache and a fresh FUSE mount (so the
//     view's page cache is empty). Its gRPC connection is opened before the
//     clock starts, as a running plant's would be.
//   - vmgrid warm: a second clone on the same plant, after the first was
//     destroyed.
//   - vmgrid L2: a fresh plant whose upstream is a cache proxy
//     (computeserver.StartCacheProxy) on the compute side, on loopback; the
//     proxy's upstream is the WAN and it was warmed once by a clone through
//     it before the first repeat.
//   - vmgrid parallel: N fresh plants, each with its own connection across
//     the same WAN, clone at once; the makespan is reported.
//   - limit: the local clone plus the bytes the cold clone needed,
//     compressed as the image server sends them (zstd fastest ≈ level 1;
//     zero blocks left out), divided by the bandwidth, plus one RTT. "Needed"
//     is what the cold run fetched: the blocks in its block cache and the
//     whole files in its file cache.
//
// The lazy memory rows (lazy.go): fresh plants with --memory-restore auto
// and lazy clone the image without a working-set profile (each clone
// records it), then lazy with it, then warm on the same plant; the same two cold rows for
// the run's recipe built again with 4x the guest RAM (goal: within 1.2x);
// a workload touching most of the guest's memory run right after an eager
// and a lazy cold clone (goal: within 10%); and one demand block read with
// the link idle and while the plant copies a RAM file in bulk (goal: ≤ 2
// RTT + the block's transfer time). Their hydration waits past the
// measurement, except in the workload rows (default --hydrate-after).
//
// Two reference rows explain the parallel row: "parallel, local" (N local
// clones at once: what this machine's cores allow) and "parallel via L2"
// (N plants behind one cold cache proxy on the compute side, so the WAN
// carries the image once).
//
// Options.Rows measures a subset; `--smoke` measures the compared rows once
// over a short, fast link, for CI.
//
// Everything the run starts (QEMU, qemu-nbd, compute servers and their
// mounts, the image server, temporary directories) is undone when Run
// returns, also on error or when its context is cancelled.
package clonebench
