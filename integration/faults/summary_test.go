//go:build faults

package faults

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// What the suite did, for the summary lines TestFaults logs at its end.
var (
	faultsInjected, faultsSurvived atomic.Int64
	badInputs, badInputsAnswered   atomic.Int64
	badInputsOpen                  atomic.Int64
	writesAcked, writesLost        atomic.Int64
	exfilTried, exfilRefused       atomic.Int64
	exfilLeaked                    atomic.Int64 // probes whose address got a connection

	probesMu sync.Mutex
	probes   = map[string]*[2]int{} // service/mode → refused, total
)

// survived counts a fault whose assertions all held.
func survived(t *testing.T) {
	if !t.Failed() {
		faultsSurvived.Add(1)
	}
}

func countProbe(key string, refused, total int) {
	probesMu.Lock()
	defer probesMu.Unlock()
	c := probes[key]
	if c == nil {
		c = &[2]int{}
		probes[key] = c
	}
	c[0] += refused
	c[1] += total
}

// summary is one line per category.
func summary() []string {
	probesMu.Lock()
	defer probesMu.Unlock()
	var keys []string
	var refused, total int
	for k, c := range probes {
		keys = append(keys, fmt.Sprintf("%s %d/%d", k, c[0], c[1]))
		refused += c[0]
		total += c[1]
	}
	sort.Strings(keys)
	return []string{
		fmt.Sprintf("faults: %d injected, %d survived", faultsInjected.Load(), faultsSurvived.Load()),
		fmt.Sprintf("bad inputs: %d tried, %d answered with the expected code and the process healthy, %d known open", badInputs.Load(), badInputsAnswered.Load(), badInputsOpen.Load()),
		fmt.Sprintf("unauthenticated RPCs: %d refused of %d (%s)", refused, total, strings.Join(keys, ", ")),
		fmt.Sprintf("credential-exfiltration probes: %d tried, %d refused, %d reached the address", exfilTried.Load(), exfilRefused.Load(), exfilLeaked.Load()),
		fmt.Sprintf("acknowledged writes: %d, lost %d", writesAcked.Load(), writesLost.Load()),
	}
}
