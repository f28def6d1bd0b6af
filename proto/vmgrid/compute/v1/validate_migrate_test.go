package computev1

import (
	"strings"
	"testing"
)

func TestMigrateRequestsAreValidated(t *testing.T) {
	dest := &MigrationPeer{Plant: "pb", Addr: "127.0.0.1:7061"}
	ad := &ClassAd{VmId: "vm-1", Image: "tiny", Owner: "alice"}
	for name, c := range map[string]struct {
		req  interface{ Validate() error }
		want string // "" valid
	}{
		"migrate":              {&MigrateVMRequest{VmId: "vm-1", Destination: dest}, ""},
		"migrate no vm":        {&MigrateVMRequest{Destination: dest}, "vm_id"},
		"migrate no dest":      {&MigrateVMRequest{VmId: "vm-1"}, "destination"},
		"migrate bad addr":     {&MigrateVMRequest{VmId: "vm-1", Destination: &MigrationPeer{Plant: "pb", Addr: "nowhere"}}, "destination.addr"},
		"migrate bad plant":    {&MigrateVMRequest{VmId: "vm-1", Destination: &MigrationPeer{Plant: "../x", Addr: "h:1"}}, "destination.plant"},
		"prepare":              {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_PREPARE, Classad: ad, Machine: []byte("{}"), Source: "pa"}, ""},
		"prepare no machine":   {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_PREPARE, Classad: ad, Source: "pa"}, "machine"},
		"prepare huge machine": {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_PREPARE, Classad: ad, Machine: make([]byte, MaxMachineSpec+1), Source: "pa"}, "machine"},
		"prepare no source":    {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_PREPARE, Classad: ad, Machine: []byte("{}")}, "source"},
		"run":                  {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_RUN}, ""},
		"run with a machine":   {&MigrateInRequest{Step: MigrateStep_MIGRATE_STEP_RUN, Machine: []byte("{}")}, "carries"},
		"no step":              {&MigrateInRequest{}, "step"},
		"unknown step":         {&MigrateInRequest{Step: 99}, "step"},
		"tunnel header":        {&TunnelData{VmId: "vm-1", Ticket: "t", Channel: TunnelNBD}, ""},
		"tunnel data":          {&TunnelData{Data: []byte("x")}, ""},
		"tunnel bad channel":   {&TunnelData{VmId: "vm-1", Ticket: "t", Channel: "shell"}, "channel"},
		"tunnel no ticket":     {&TunnelData{VmId: "vm-1", Channel: TunnelMigration}, "ticket"},
		"tunnel chunk too big": {&TunnelData{Data: make([]byte, MaxStreamChunk+1)}, "data"},
		"tunnel bad vm":        {&TunnelData{VmId: "a/b", Ticket: "t", Channel: TunnelMigration}, "vm_id"},
	} {
		err := c.req.Validate()
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: %v", name, err)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: %v, want an error naming %q", name, err, c.want)
		}
	}
}
