package computev1

import (
	"errors"
	"fmt"
	"net"

	imagev1 "github.com/vmgrid/vmgrid/proto/vmgrid/image/v1"
)

// Limits of live migration's messages.
const (
	MaxMachineSpec = 64 << 10 // MigrateInRequest.machine: a vmm.Spec as JSON
	MaxTicketLen   = 128
)

// Tunnel channels (TunnelData.channel).
const (
	TunnelMigration = "migration"
	TunnelNBD       = "nbd"
)

// Validate checks a MigrateVM request.
func (r *MigrateVMRequest) Validate() error {
	if err := validateVMID(r.VmId, true); err != nil {
		return err
	}
	d := r.Destination
	if d == nil {
		return errors.New("destination is required")
	}
	if err := imagev1.ValidateName("destination.plant", d.Plant); err != nil {
		return err
	}
	if _, _, err := net.SplitHostPort(d.Addr); err != nil || len(d.Addr) > 256 {
		return fmt.Errorf("destination.addr %q: want HOST:PORT", d.Addr)
	}
	return validateNetwork(r.Network)
}

// Validate checks one message of a MigrateIn stream.
func (r *MigrateInRequest) Validate() error {
	if err := validateEnum("step", r.Step, MigrateStep_name); err != nil {
		return err
	}
	if r.Step == MigrateStep_MIGRATE_STEP_UNSPECIFIED {
		return errors.New("step is required")
	}
	if r.Step != MigrateStep_MIGRATE_STEP_PREPARE {
		if r.Classad != nil || len(r.Machine) > 0 {
			return fmt.Errorf("step %s carries no classad or machine", r.Step)
		}
		return nil
	}
	ad := r.Classad
	if ad == nil || len(r.Machine) == 0 {
		return errors.New("prepare: classad and machine are required")
	}
	if len(r.Machine) > MaxMachineSpec {
		return fmt.Errorf("machine: %d bytes; at most %d", len(r.Machine), MaxMachineSpec)
	}
	if err := validateVMID(ad.VmId, true); err != nil {
		return err
	}
	for what, name := range map[string]string{"classad.image": ad.Image, "classad.owner": ad.Owner, "source": r.Source} {
		if err := imagev1.ValidateName(what, name); err != nil {
			return err
		}
	}
	if err := validateHardware(ad.Hardware); err != nil {
		return err
	}
	if err := validateNetwork(ad.Network); err != nil {
		return err
	}
	return ValidateSize("classad", ad, MaxRequestBytes)
}

// Validate checks one message of a MigrationTunnel stream: the first names
// its VM, ticket and channel, the others carry data only.
func (r *TunnelData) Validate() error {
	if err := validateChunk("data", r.Data); err != nil {
		return err
	}
	if r.VmId == "" && r.Ticket == "" && r.Channel == "" {
		return nil
	}
	if err := validateVMID(r.VmId, true); err != nil {
		return err
	}
	if r.Ticket == "" || len(r.Ticket) > MaxTicketLen {
		return fmt.Errorf("ticket: 1 to %d characters", MaxTicketLen)
	}
	if r.Channel != TunnelMigration && r.Channel != TunnelNBD {
		return fmt.Errorf("channel %q: want %s or %s", r.Channel, TunnelMigration, TunnelNBD)
	}
	return nil
}

// Validate checks a DrainPlant request: it has nothing to check.
func (r *DrainPlantRequest) Validate() error { return nil }
