package computev1

import (
	"fmt"

	"google.golang.org/protobuf/proto"
)

// Limits of what a VM carries into its records. A VM's record (its classad
// with the request's labels and results) goes into one etcd write at the
// shop, and etcd refuses writes over 1.5 MiB by default, so a request is
// held well under that: the plant refuses what the shop could not record
// (it would run a VM nobody can find), and the shop, which adds a VM id, an
// owner and a data credential to what it is asked, takes a little less
// (package shopv1 defines its limits from these).
const (
	MaxRequestBytes = 264 << 10 // a whole CreateVM request to a plant
	MaxLabels       = 64
	MaxLabelKey     = 128
	MaxLabelValue   = 1024
	MaxLabelBytes   = 16 << 10 // all labels together
)

// ValidateLabels checks a VM's labels against the limits.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("%d labels; the limit is %d", len(labels), MaxLabels)
	}
	total := 0
	for k, v := range labels {
		if k == "" || len(k) > MaxLabelKey || hasControl(k) {
			return fmt.Errorf("label key %.40q: 1 to %d printable bytes", k, MaxLabelKey)
		}
		if len(v) > MaxLabelValue {
			return fmt.Errorf("label %q: value is %d bytes; the limit is %d", k, len(v), MaxLabelValue)
		}
		total += len(k) + len(v)
	}
	if total > MaxLabelBytes {
		return fmt.Errorf("labels are %d bytes; the limit is %d", total, MaxLabelBytes)
	}
	return nil
}

// ValidateSize refuses a message over limit bytes: what must fit in a
// VM's record.
func ValidateSize(what string, m proto.Message, limit int) error {
	if n := proto.Size(m); n > limit {
		return fmt.Errorf("%s is %d bytes; the limit is %d (it must fit in the VM's record)", what, n, limit)
	}
	return nil
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}
