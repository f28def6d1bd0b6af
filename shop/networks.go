package shop

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	computev1 "github.com/vmgrid/vmgrid/proto/vmgrid/compute/v1"
	"github.com/vmgrid/vmgrid/services/errdefs"
	"github.com/vmgrid/vmgrid/shop/market"
)

// Networks: domains, VNIs, subnets and leases, all in etcd and allocated
// by transaction, so concurrent creates through any number of shops never
// collide.
//
//	/vmgrid/net/domains/D        {owner, index}: the domain and its owner
//	/vmgrid/net/index/N          D: index N (VNI N, subnet N) is taken
//	/vmgrid/net/leases/D/IP      the holder of an address: vm/ID or plant/NAME
//	/vmgrid/net/macs/MAC         the VM holding a MAC
//	/vmgrid/net/vms/ID           the VM's lease {domain, ip, mac}
//	/vmgrid/net/plants/D/NAME    a plant's own address on D's segment
//
// A domain belongs to the owner who named it first. Its index N gives its
// VNI (N) and its subnet, the N-th /24 of netPool. Segments have no way
// out (no egress), so the pool never meets a network of the hosts.
const (
	netPrefix       = "/vmgrid/net/"
	domainsPrefix   = netPrefix + "domains/"
	indexPrefix     = netPrefix + "index/"
	leasesPrefix    = netPrefix + "leases/"
	macsPrefix      = netPrefix + "macs/"
	netVMsPrefix    = netPrefix + "vms/"
	netPlantsPrefix = netPrefix + "plants/"
)

// netPool is where domains' subnets come from: 32767 domains of 253 hosts.
var netPool = netip.MustParsePrefix("10.128.0.0/9")

// maxDomains is how many /24 subnets netPool holds (index 0 unused).
const maxDomains = 1<<15 - 1

// firstHost is the first address leased in a subnet (.1 is kept for a
// gateway when domains get egress).
const firstHost = 2

// txnRetries bounds the retries of an allocation that lost a race.
const txnRetries = 64

// domainRecord is a domain in etcd.
type domainRecord struct {
	Owner string `json:"owner"`
	Index uint32 `json:"index"`
}

// vmLease is a VM's lease in etcd.
type vmLease struct {
	Domain string `json:"domain"`
	IP     string `json:"ip"`
	MAC    string `json:"mac"`
}

// networks allocates and releases domains and leases.
type networks struct {
	s   *etcdStore
	log *zap.Logger
}

func (d domainRecord) vni() uint32 { return d.Index }

// subnet is the domain's /24.
func (d domainRecord) subnet() netip.Prefix {
	b := netPool.Addr().As4()
	n := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	n += d.Index << 8
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), 0}), 24)
}

// claimDomain returns owner's domain, claiming it when nobody has it yet;
// another owner's domain is refused.
func (n *networks) claimDomain(ctx context.Context, owner, domain string) (domainRecord, error) {
	for range txnRetries {
		d, found, err := n.domain(ctx, domain)
		if err != nil {
			return d, err
		}
		if found {
			if d.Owner != owner {
				return d, fmt.Errorf("network domain %q belongs to another owner; choose another name: %w", domain, errdefs.ErrPermissionDenied)
			}
			return d, nil
		}
		idx, err := n.freeIndex(ctx)
		if err != nil {
			return d, err
		}
		d = domainRecord{Owner: owner, Index: idx}
		b, _ := json.Marshal(d)
		ik := indexPrefix + strconv.FormatUint(uint64(idx), 10)
		resp, err := n.s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(domainsPrefix+domain), "=", 0), clientv3.Compare(clientv3.CreateRevision(ik), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(domainsPrefix+domain, string(b)), clientv3.OpPut(ik, domain)}, nil)
		if err != nil {
			return d, err
		}
		if resp.Succeeded {
			n.log.Info("network domain claimed", zap.String("domain", domain), zap.String("owner", owner), zap.Uint32("vni", idx))
			return d, nil
		}
	}
	return domainRecord{}, fmt.Errorf("network domain %q: too many concurrent claims, retry: %w", domain, errdefs.ErrUnavailable)
}

func (n *networks) domain(ctx context.Context, domain string) (domainRecord, bool, error) {
	var d domainRecord
	resp, err := n.s.get(ctx, domainsPrefix+domain)
	if err != nil || len(resp.Kvs) == 0 {
		return d, false, err
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &d); err != nil {
		return d, false, fmt.Errorf("network domain %q: bad record: %w", domain, errdefs.ErrInternal)
	}
	return d, true, nil
}

// freeIndex is the lowest domain index nobody holds.
func (n *networks) freeIndex(ctx context.Context) (uint32, error) {
	resp, err := n.s.get(ctx, indexPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, err
	}
	used := map[uint32]bool{}
	for _, kv := range resp.Kvs {
		i, _ := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), indexPrefix), 10, 32)
		used[uint32(i)] = true
	}
	for i := uint32(1); i <= maxDomains; i++ {
		if !used[i] {
			return i, nil
		}
	}
	return 0, fmt.Errorf("every one of the %d network domains is taken: %w", maxDomains, errdefs.ErrResourceExhausted)
}

// freeAddress is the lowest address of d's subnet nobody holds.
func (n *networks) freeAddress(ctx context.Context, domain string, d domainRecord) (netip.Addr, error) {
	resp, err := n.s.get(ctx, leasesPrefix+domain+"/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return netip.Addr{}, err
	}
	used := map[string]bool{}
	for _, kv := range resp.Kvs {
		used[strings.TrimPrefix(string(kv.Key), leasesPrefix+domain+"/")] = true
	}
	a := d.subnet().Addr()
	for i := 0; i < 255; i++ {
		a = a.Next()
		if i+1 >= firstHost && i+1 < 255 && !used[a.String()] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("network domain %q has no address left (%d leased): %w", domain, len(used), errdefs.ErrResourceExhausted)
}

// macFor is the MAC of an address of domain index idx: locally
// administered, unique since (VNI, host) is.
func macFor(idx uint32, a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("02:%02x:%02x:%02x:00:%02x", byte(idx>>16), byte(idx>>8), byte(idx), b[3])
}

// leaseVM returns the VM's lease in its domain, making one if it has none
// (a retried create keeps its lease).
func (n *networks) leaseVM(ctx context.Context, domain string, d domainRecord, vmID string) (vmLease, error) {
	for range txnRetries {
		if l, ok, err := n.vmLease(ctx, vmID); err != nil || ok {
			return l, err
		}
		a, err := n.freeAddress(ctx, domain, d)
		if err != nil {
			return vmLease{}, err
		}
		l := vmLease{Domain: domain, IP: a.String(), MAC: macFor(d.Index, a)}
		b, _ := json.Marshal(l)
		ipKey, macKey, vmKey := leasesPrefix+domain+"/"+l.IP, macsPrefix+l.MAC, netVMsPrefix+vmID
		resp, err := n.s.txn(ctx,
			[]clientv3.Cmp{
				clientv3.Compare(clientv3.CreateRevision(ipKey), "=", 0),
				clientv3.Compare(clientv3.CreateRevision(macKey), "=", 0),
				clientv3.Compare(clientv3.CreateRevision(vmKey), "=", 0),
			},
			[]clientv3.Op{clientv3.OpPut(ipKey, "vm/"+vmID), clientv3.OpPut(macKey, vmID), clientv3.OpPut(vmKey, string(b))}, nil)
		if err != nil {
			return vmLease{}, err
		}
		if resp.Succeeded {
			return l, nil
		}
	}
	return vmLease{}, fmt.Errorf("network domain %q: too many concurrent leases, retry: %w", domain, errdefs.ErrUnavailable)
}

func (n *networks) vmLease(ctx context.Context, vmID string) (vmLease, bool, error) {
	var l vmLease
	resp, err := n.s.get(ctx, netVMsPrefix+vmID)
	if err != nil || len(resp.Kvs) == 0 {
		return l, false, err
	}
	return l, json.Unmarshal(resp.Kvs[0].Value, &l) == nil, nil
}

// leasePlant returns the plant's own address on the domain's segment (its
// dialer), making one if it has none.
func (n *networks) leasePlant(ctx context.Context, domain string, d domainRecord, plant string) (netip.Addr, error) {
	key := netPlantsPrefix + domain + "/" + plant
	for range txnRetries {
		resp, err := n.s.get(ctx, key)
		if err != nil {
			return netip.Addr{}, err
		}
		if len(resp.Kvs) > 0 {
			return netip.ParseAddr(string(resp.Kvs[0].Value))
		}
		a, err := n.freeAddress(ctx, domain, d)
		if err != nil {
			return netip.Addr{}, err
		}
		ipKey := leasesPrefix + domain + "/" + a.String()
		tr, err := n.s.txn(ctx,
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(ipKey), "=", 0), clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(ipKey, "plant/"+plant), clientv3.OpPut(key, a.String())}, nil)
		if err != nil {
			return netip.Addr{}, err
		}
		if tr.Succeeded {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("network domain %q: too many concurrent leases, retry: %w", domain, errdefs.ErrUnavailable)
}

// attachment is the NetworkAttachment of a VM of domain placed on plant:
// its lease and the plant's.
func (n *networks) attachment(ctx context.Context, owner, domain, vmID, plant string) (*computev1.NetworkAttachment, error) {
	d, err := n.claimDomain(ctx, owner, domain)
	if err != nil {
		return nil, err
	}
	l, err := n.leaseVM(ctx, domain, d, vmID)
	if err != nil {
		return nil, err
	}
	host, err := n.leasePlant(ctx, domain, d, plant)
	if err != nil {
		return nil, err
	}
	return &computev1.NetworkAttachment{
		Domain: domain, Vni: d.vni(), Mac: l.MAC, Address: l.IP + "/24", HostAddress: host.String() + "/24",
		Hostname: vmID,
	}, nil
}

// releaseVM gives a VM's address and MAC back.
func (n *networks) releaseVM(ctx context.Context, vmID string) error {
	l, ok, err := n.vmLease(ctx, vmID)
	if err != nil || !ok {
		return err
	}
	_, err = n.s.txn(ctx, nil, []clientv3.Op{
		clientv3.OpDelete(leasesPrefix + l.Domain + "/" + l.IP), clientv3.OpDelete(macsPrefix + l.MAC), clientv3.OpDelete(netVMsPrefix + vmID),
	}, nil)
	if err == nil {
		n.log.Debug("lease released", zap.String("vm", vmID), zap.String("ip", l.IP))
	}
	return err
}

// reclaim releases the leases whose VM has no record any more (a shop
// died between lease and record removal) and the plants' addresses of
// plants gone from the registry (a plant that is back gets a new one).
func (n *networks) reclaim(ctx context.Context, reg *market.Registry) {
	resp, err := n.s.get(ctx, netVMsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return
	}
	for _, kv := range resp.Kvs {
		id := strings.TrimPrefix(string(kv.Key), netVMsPrefix)
		if _, _, err := n.s.vm(ctx, id); errdefs.IsNotFound(err) {
			if n.releaseVM(ctx, id) == nil {
				n.log.Info("reclaimed the lease of a VM that is gone", zap.String("vm", id))
			}
		}
	}
	n.reclaimPlants(ctx, reg)
}

func (n *networks) reclaimPlants(ctx context.Context, reg *market.Registry) {
	resp, err := n.s.get(ctx, netPlantsPrefix, clientv3.WithPrefix())
	if err != nil {
		return
	}
	for _, kv := range resp.Kvs {
		domain, plant, _ := strings.Cut(strings.TrimPrefix(string(kv.Key), netPlantsPrefix), "/")
		if _, ok := reg.Plant(plant); ok {
			continue
		}
		_, err := n.s.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(string(kv.Key)), "=", kv.ModRevision)},
			[]clientv3.Op{clientv3.OpDelete(string(kv.Key)), clientv3.OpDelete(leasesPrefix + domain + "/" + string(kv.Value))}, nil)
		if err == nil {
			n.log.Info("reclaimed the segment address of a plant that is gone", zap.String("plant", plant), zap.String("domain", domain))
		}
	}
}

// leased lists a domain's leased addresses (for tests and operators).
func (n *networks) leased(ctx context.Context, domain string) ([]string, error) {
	resp, err := n.s.get(ctx, leasesPrefix+domain+"/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, kv := range resp.Kvs {
		out = append(out, strings.TrimPrefix(string(kv.Key), leasesPrefix+domain+"/"))
	}
	sort.Strings(out)
	return out, nil
}

// claimDomain claims (or checks the owner of) a request's domain before
// any work is done for it; no domain: nothing to do.
func (v *vms) claimDomain(ctx context.Context, owner, domain string) error {
	if domain == "" {
		return nil
	}
	_, err := v.net.claimDomain(ctx, owner, domain)
	return err
}

// attachment is the network of a VM placed on plant (nil without a
// domain).
func (v *vms) attachment(ctx context.Context, rec *record, domain, plant string) (*computev1.NetworkAttachment, error) {
	if domain == "" {
		return nil, nil
	}
	return v.net.attachment(ctx, rec.Owner, domain, rec.VMID, plant)
}

// releaseLease gives a destroyed VM's address back.
func (v *vms) releaseLease(ctx context.Context, vmID string) error {
	return v.net.releaseVM(ctx, vmID)
}
