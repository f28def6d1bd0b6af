// Package market is the bidding protocol between the shop and the plants
// (VMPlants §3.4), carried by etcd:
//
//	/vmgrid/plants/PLANT          PlantInfo, under the plant's session lease:
//	                              a plant that dies disappears with its lease
//	/vmgrid/auctions/ID           Auction open to every plant, under the
//	                              auction's lease
//	/vmgrid/invites/PLANT/ID      Auction for invited plants: one key per
//	                              plant, written in one transaction
//	/vmgrid/bids/ID/PLANT         Bid, under the same lease: an auction and its
//	                              bids vanish together when the shop is done
//
// The shop publishes an auction; every plant watching the auctions prefix
// that is invited answers with a bid (a cost, or a refusal with the reason);
// the shop takes the lowest cost within a deadline, ties broken at random.
//
// An auction open to every plant costs one etcd write per plant, which is
// what bounds placement latency with many plants. The shop therefore keeps a
// watched copy of the registry (Registry), prices every plant's posted offer
// with the auction's weights, and invites only the few best (Shortlist); the
// invited plants bid with their live state. If none of them can host the VM
// (their posted offers were stale) the shop holds an open auction.
//
// # Trust
//
// Anyone who can write to etcd can write a bid. A bid counts only if it is
// a registered plant's own quote (Valid): under its own name, from the
// address it registered, at a cost a quote can have.
//
// # Outages
//
// Every etcd call has a deadline (OpTimeout). A plant's registration and a
// shop's claims hang off sessions (Session) that are granted anew when an
// outage outlasted their TTL, and the bidder watches again when its watches
// end, so plants bid again once etcd is back without a restart.
package market
