package shop

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	shopv1 "github.com/vmgrid/vmgrid/proto/vmgrid/shop/v1"
)

// A VM record's state is the proto's VMState, as the shop sees the
// creation: placing (and, once PlantAddr is set, creating), ready, failed.
const (
	statePlacing = computev1.VMState_VM_STATE_FETCHING
	stateReady   = computev1.VMState_VM_STATE_RUNNING
	stateFailed  = computev1.VMState_VM_STATE_FAILED
)

// record is a VM in etcd.
type record struct {
	VMID      string            `json:"vm_id"`
	Owner     string            `json:"owner"`
	RequestID string            `json:"request_id"`
	State     computev1.VMState `json:"state"`
	Plant     string            `json:"plant,omitempty"`
	PlantAddr string            `json:"plant_addr,omitempty"`
	Image     string            `json:"image,omitempty"`
	ClassAd   json.RawMessage   `json:"classad,omitempty"`
	Error     string            `json:"error,omitempty"`
	// Retry says a failure was passing: a retry of the request drives it
	// again.
	Retry bool `json:"retry,omitempty"`
	// RequestHash identifies the request (see requestHash).
	RequestHash string `json:"request_hash,omitempty"`
	// Stage is the state of records written before states were VMState.
	Stage string `json:"stage,omitempty"`
	// Verb is the last state-moving verb done (verbs.go).
	Verb *verbRecord `json:"verb,omitempty"`
	// RootDisk is the persistent root disk the shop made for the VM.
	RootDisk string `json:"root_disk,omitempty"`
	// SpentState is the state image a running VM was resumed from: its
	// machine still reads files of it (the kernel), so it goes once the
	// next suspend has published a state of its own, or with the VM.
	SpentState string `json:"spent_state,omitempty"`
}

// decodeRecord reads a record, also one written with stages.
func decodeRecord(b []byte) (*record, error) {
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, err
	}
	if r.State == computev1.VMState_VM_STATE_UNSPECIFIED {
		switch r.Stage {
		case "ready":
			r.State = stateReady
		case "failed":
			r.State = stateFailed
		default:
			r.State = statePlacing
		}
	}
	r.Stage = ""
	return &r, nil
}

func (r *record) encode() []byte {
	b, _ := json.Marshal(r)
	return b
}

// classad is the VM's classad as recorded (the plant's, once it is ready).
func (r *record) classad() *computev1.ClassAd {
	ad := &computev1.ClassAd{}
	if len(r.ClassAd) > 0 {
		_ = protojson.Unmarshal(r.ClassAd, ad)
	}
	if ad.VmId == "" {
		ad.VmId, ad.Owner, ad.Image, ad.Plant, ad.Error = r.VMID, r.Owner, r.Image, r.Plant, r.Error
		ad.State = r.State
	}
	return ad
}

// requestRecord is what /vmgrid/requests/OWNER/ID holds.
type requestRecord struct {
	VMID string `json:"vm_id"`
	Hash string `json:"hash,omitempty"`
}

// decodeRequest reads a request record; older ones hold the bare VM id.
func decodeRequest(b []byte) requestRecord {
	var rr requestRecord
	if json.Unmarshal(b, &rr) != nil {
		rr = requestRecord{VMID: string(b)}
	}
	return rr
}

// requestHash identifies a request, so that a request id reused for another
// request is told from a retry.
func requestHash(req *shopv1.CreateVMRequest) string {
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:16])
}

// VMID is the VM id of an owner's request.
func VMID(owner, requestID string) string {
	h := sha256.Sum256([]byte(owner + "\x00" + requestID))
	return "vm-" + hex.EncodeToString(h[:5])
}

// maxRecord bounds a VM record, well under etcd's 1.5 MiB request limit.
const maxRecord = 512 << 10

// fit trims what a plant reports at length (the actions' outputs) to their
// tails until the classad can be recorded.
func fit(ad *computev1.ClassAd) []byte {
	b, _ := protojson.Marshal(ad)
	for tail := 4096; len(b) > maxRecord/2 && tail >= 64; tail /= 4 {
		for _, a := range ad.Actions {
			a.Stdout, a.Stderr = tailBytes(a.Stdout, tail), tailBytes(a.Stderr, tail)
		}
		ad.ConsoleLog = string(tailBytes([]byte(ad.ConsoleLog), tail))
		b, _ = protojson.Marshal(ad)
	}
	return b
}

func tailBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
