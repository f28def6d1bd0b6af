package market

import (
	"testing"
)

// TestPaperExample reproduces VMPlants §3.4: two empty plants bid 50 each
// (the network cost); the client's VMs then go to the plant that already
// has its host-only network while 4 × running stays below 50, so the first
// 13 land on one plant and the 14th on the other. The extras (cache
// affinity, memory headroom) are on with their default weights and do not
// change the outcome.
func TestPaperExample(t *testing.T) {
	w := DefaultWeights()
	plants := []*PlantInfo{
		{Name: "A", MemoryMiB: 32 * 256, MemoryFreeMiB: 32 * 256, Images: map[string]uint64{}},
		{Name: "B", MemoryMiB: 32 * 256, MemoryFreeMiB: 32 * 256, Images: map[string]uint64{}},
	}
	a := Auction{Image: "tiny", ImageSize: 110 << 20, MemoryMiB: 256, Domain: "client1"}
	var placed []string
	for n := 1; n <= 14; n++ {
		var bids []Bid
		for _, p := range plants {
			c, refusal := Cost(w, *p, a)
			bids = append(bids, Bid{Plant: p.Name, Cost: c, Refusal: refusal})
		}
		if n == 1 && (bids[0].Cost < 50 || bids[0].Cost > 51 || bids[0].Cost != bids[1].Cost) {
			t.Fatalf("empty plants should both bid about 50: %+v", bids)
		}
		Rank(bids)
		win := bids[0].Plant
		placed = append(placed, win)
		for _, p := range plants {
			if p.Name == win {
				p.Running++
				p.MemoryFreeMiB -= a.MemoryMiB
				if !contains(p.Domains, a.Domain) {
					p.Domains = append(p.Domains, a.Domain)
				}
				p.Images["tiny"] = 110 << 20 // it holds the image now
			}
		}
	}
	first := placed[0]
	for n := 0; n < 13; n++ {
		if placed[n] != first {
			t.Fatalf("VM %d went to %s, want %s: %v", n+1, placed[n], first, placed)
		}
	}
	if placed[13] == first {
		t.Fatalf("the 14th VM should go to the other plant: %v", placed)
	}
}

func TestRefusals(t *testing.T) {
	p := PlantInfo{Name: "A", Arch: "x86_64", MemoryMiB: 1024, MemoryFreeMiB: 128}
	if _, r := Cost(DefaultWeights(), p, Auction{MemoryMiB: 256}); r == "" {
		t.Fatal("not enough memory must be refused")
	}
	if _, r := Cost(DefaultWeights(), p, Auction{Arch: "aarch64"}); r == "" {
		t.Fatal("another arch must be refused")
	}
	bids := []Bid{{Plant: "x", Refusal: "no"}, {Plant: "y", Cost: 9}, {Plant: "z", Cost: 3}}
	Rank(bids)
	if bids[0].Plant != "z" || bids[2].Plant != "x" {
		t.Fatalf("rank %v", bids)
	}
}

// TestQuoteUsesTheShopsWeights: a plant prices with the weights the auction
// carries (the shop's --cost-* flags), its own only when there are none.
func TestQuoteUsesTheShopsWeights(t *testing.T) {
	p := PlantInfo{Name: "A", Addr: "a:1", Running: 2, MemoryMiB: 1024, MemoryFreeMiB: 1024}
	own := Weights{Compute: 4, Network: 50}
	a := Auction{MemoryMiB: 256, Domain: "d"}
	if b := Quote(own, p, a); b.Cost != 58 || b.Plant != "A" || b.Addr != "a:1" {
		t.Fatalf("own weights: %+v, want cost 4×2+50", b)
	}
	a.Weights = &Weights{Compute: 10, Network: 1}
	if b := Quote(own, p, a); b.Cost != 21 {
		t.Fatalf("the shop's weights: %+v, want cost 10×2+1", b)
	}
}
