package plant

import (
	"github.com/vmgrid/vmgrid/computeserver/gvfs"
)

// --memory-restore auto. What makes a restore slow is a guest whose first
// seconds fault pages through a long link one round trip at a time.
// Measured on the tiny guest across 40 ms / 100 Mbit (`vmgrid bench
// clone`, one run each, load 6): eager 3.4 s, lazy with a working-set
// profile 1.7 s, lazy without one 10.5 s, and lazy without one but with
// the RAM file streaming in file order from the restore on 3.1 s. So auto
// restores lazily always (the clones share the golden's pages, and every
// lazy clone records a profile for the next ones), and streams the RAM
// file in the prefetch class when the image has no profile to say which
// pages come first and the RAM file is not local already: the guest's
// faults go ahead of the stream on the demand connection, the stream
// fills the link the way an eager copy would, but the guest runs
// meanwhile. Eager was not the faster on the tiny guest (on Debian the two
// were even in one run, 4.0 s, and apart in another under load), so auto
// does not pick it; --memory-restore eager remains for plants whose VMs
// must not depend on the image server once they are ready.

// memoryMode resolves the plant's --memory-restore for one clone (pr: its
// profile recording and prefetch, nil when none runs). stream: fetch the
// whole RAM file from the restore on.
func (p *Plant) memoryMode(ram gvfs.File, pr *profile) (mode MemoryRestore, why string, stream bool) {
	if p.cfg.MemoryRestore == RestoreLazy || p.cfg.MemoryRestore == RestoreEager {
		return p.cfg.MemoryRestore, "--memory-restore " + string(p.cfg.MemoryRestore), false
	}
	return chooseRestore(ram.LocalBytes() == ram.Size(), pr != nil && pr.run != nil)
}

// chooseRestore is auto's rule (the file's comment): lazy, streaming the
// RAM file unless it is local already or the image's profile is being
// prefetched.
func chooseRestore(local, profiled bool) (mode MemoryRestore, why string, stream bool) {
	switch {
	case local:
		return RestoreLazy, "the RAM file is in the block cache", false
	case profiled:
		return RestoreLazy, "the image has a working-set profile: prefetching it", false
	}
	return RestoreLazy, "the image has no working-set profile yet: streaming the RAM file while this clone records one", true
}
