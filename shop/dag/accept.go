package dag

// Accept is Match for a request that named its golden image: whoever names
// an image has accepted what it did, so the image's performed actions need
// not be a subset of the request's (VMPlants' subset test is for choosing
// an image, not for refusing the one asked for). The request's actions the
// image performed (same digest: same definition and predecessors) are Done;
// everything else runs.
func (p *Plan) Accept(performed []string) *Plan {
	did := make(map[string]bool, len(performed))
	for _, d := range performed {
		did[d] = true
	}
	out := &Plan{Steps: append([]Step(nil), p.Steps...)}
	for i := range out.Steps {
		out.Steps[i].Done = did[out.Steps[i].Digest]
	}
	return out
}
