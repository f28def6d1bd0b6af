package market

import "testing"

// TestNetworkCost: the network charge is for making a domain's segment on
// a plant that has no VM of it; a VM without a domain needs none.
func TestNetworkCost(t *testing.T) {
	w := Weights{Compute: 4, Network: 50}
	p := PlantInfo{Name: "A", Running: 1, Domains: []string{"lab"}}
	for _, c := range []struct {
		domain string
		want   float64
	}{{"", 4}, {"lab", 4}, {"other", 54}} {
		if got, _ := Cost(w, p, Auction{Domain: c.domain}); got != c.want {
			t.Errorf("domain %q: cost %v, want %v", c.domain, got, c.want)
		}
	}
}
