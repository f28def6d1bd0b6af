package plant

import (
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"

	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vmgrid/vmgrid/computeserver/vmm"
	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// machineFile records, in a VM's directory, which process its machine is:
// after a restart the pid alone may name another process by then.
const machineFile = "machine.json"

type machineRecord struct {
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"` // vmm.ProcessStart
}

func writeMachineFile(dir string, pid int, log *zap.Logger) {
	start, err := vmm.ProcessStart(pid)
	if err == nil {
		err = writeJSON(filepath.Join(dir, machineFile), machineRecord{Pid: pid, Start: start})
	}
	if err != nil {
		log.Warn("could not record the machine's process", zap.Int("pid", pid), zap.Error(err))
	}
}

// leftMachine is the machine process a previous run left in dir, as
// recorded by machine.json or, from older plants, the classad.
func leftMachine(dir string) (vmID string, rec machineRecord) {
	if b, err := os.ReadFile(filepath.Join(dir, machineFile)); err == nil {
		_ = json.Unmarshal(b, &rec)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "classad.json")); err == nil {
		ad := &computev1.ClassAd{}
		if protojson.Unmarshal(b, ad) == nil {
			vmID = ad.VmId
			if rec.Pid == 0 {
				rec.Pid = int(ad.Pid)
			}
		}
	}
	return vmID, rec
}

// reap stops VMs left running by a previous process and removes their
// directories. It kills a process group only when its leader is still the
// machine that run started (vmm.IsMachineOf): a pid read from disk may
// belong to someone else by now.
func (p *Plant) reap() {
	ents, _ := os.ReadDir(p.cfg.Dir)
	for _, e := range ents {
		dir := filepath.Join(p.cfg.Dir, e.Name())
		vmID, rec := leftMachine(dir)
		if rec.Pid > 0 {
			log := p.log.With(zap.String("vm", vmID), zap.Int("pid", rec.Pid))
			switch {
			case !vmm.IsMachineOf(rec.Pid, rec.Start, dir):
				log.Info("the process of a VM left by a previous run is gone; not killing its pid")
			case syscall.Kill(-rec.Pid, syscall.SIGKILL) == nil:
				log.Warn("stopped a VM left by a previous run")
			}
		}
		os.RemoveAll(dir)
	}
}
