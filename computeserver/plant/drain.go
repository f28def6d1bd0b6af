package plant

import (
	"context"
	"time"

	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
)

// Draining (issue 16, "a plant that leaves drains"): a plant asked to stop
// first stops taking VMs — it refuses every new one (creation, resume, an
// incoming migration) and posts that it is draining, so it refuses the
// auctions too — and waits while the shops move its running VMs to other
// plants by live migration (shop/drain.go). What cannot move, or does not
// move in time, is stopped when the plant closes, as before: its VMs are
// then listed lost.

// drainPoll is how often Drain looks at what is left.
const drainPoll = 200 * time.Millisecond

// Drain marks the plant draining and waits until no VM is left on it or
// ctx ends; it returns the ids of the VMs still here.
func (p *Plant) Drain(ctx context.Context) []string {
	p.StartDraining()
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for {
		left, movable := p.left()
		if len(left) == 0 {
			p.log.Info("drained: no VM is left on the plant")
			return nil
		}
		if movable == 0 {
			p.log.Warn("drain over: the VMs left cannot move live (persistent, hot-plugged devices, a local seed, not running); they are stopped and listed lost",
				zap.Strings("vms", left))
			return left
		}
		select {
		case <-ctx.Done():
			p.log.Warn("drain over (timed out, or no plant to go to) with VMs left: they are stopped and listed lost", zap.Strings("vms", left))
			return left
		case <-t.C:
		}
	}
}

// StartDraining marks the plant draining (an operator's DrainPlant, or
// Drain) and returns how many VMs are on it. It is for good: a plant
// stops draining only by restarting.
func (p *Plant) StartDraining() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.draining {
		p.draining = true
		p.log.Info("draining: the plant takes no new VMs; the shops move its VMs to other plants", zap.Int("vms", len(p.vms)))
	}
	return len(p.vms)
}

// Draining reports whether the plant is leaving.
func (p *Plant) Draining() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.draining
}

// left lists the VMs on the plant and counts those that may still leave.
func (p *Plant) left() (ids []string, movable int) {
	p.mu.Lock()
	vms := make([]*vm, 0, len(p.vms))
	for id, v := range p.vms {
		ids = append(ids, id)
		vms = append(vms, v)
	}
	p.mu.Unlock()
	for _, v := range vms {
		if !p.stuck(v) {
			movable++
		}
	}
	return ids, movable
}

// stuck reports whether v cannot leave live — what MigrateVM refuses — so
// a drain need not wait for it. A VM still being made may leave once it
// runs.
func (p *Plant) stuck(v *vm) bool {
	select {
	case <-v.ready:
	default:
		return false
	}
	v.mu.Lock()
	running := v.m != nil && v.ad.State == computev1.VMState_VM_STATE_RUNNING
	fixed := v.ad.PersistentDisk != "" || v.hotplugged > 0
	v.mu.Unlock()
	if p.cfg.DialPlant == nil || !running || fixed {
		return true
	}
	_, err := p.outgoing(v, &computev1.MigrateVMRequest{})
	return err != nil
}
