package vnet

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNS runs f on a thread inside ns (an invalid handle: the process's own
// namespace). Netlink sockets, taps and TCP sockets made in f belong to
// ns. The thread returns to its namespace afterwards; if it cannot, it is
// left locked, so Go retires it instead of reusing it elsewhere.
func inNS(ns netns.NsHandle, f func() error) error {
	if !ns.IsOpen() {
		return f()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("vnet: current network namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("vnet: enter network namespace: %w", err)
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		return fmt.Errorf("vnet: back to the plant's network namespace: %w", err) // thread stays locked: Go retires it
	}
	runtime.UnlockOSThread()
	return ferr
}

// newNS makes a new, unnamed network namespace, from ns, and returns its
// handle; the calling thread ends where it began. The namespace lives as
// long as a handle or a process in it does.
func newNS(ns netns.NsHandle) (netns.NsHandle, error) {
	var out netns.NsHandle
	err := inNS(ns, func() error {
		runtime.LockOSThread()
		here, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			return err
		}
		defer here.Close()
		if out, err = netns.New(); err != nil {
			runtime.UnlockOSThread()
			return err
		}
		if err := netns.Set(here); err != nil {
			return err // thread stays locked: Go retires it
		}
		runtime.UnlockOSThread()
		return nil
	})
	return out, err
}
