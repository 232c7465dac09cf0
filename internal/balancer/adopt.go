package balancer

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/state"
	"github.com/xlb-project/xlb/plugins"
)

// Adopting an earlier run's pinned state: New checks that the pinned
// tables fit this configuration before it touches anything, loads the
// pipeline against the pinned maps, and re-derives the services, their
// ids, the backend ids (retired ones included) and the addresses the
// earlier run added from the maps and the host record. SetServices then
// reconciles them with the configuration as a reload does.

// checkPinned refuses pinned state whose link this configuration cannot
// take over: another interface, another XDP mode.
func (b *Balancer) checkPinned(p *dispatcher.Pinned) error {
	if i := b.opts.State.Found().Ifindex; i != 0 && i != b.host.Index() {
		return fmt.Errorf("iface: %s is ifindex %d, the pinned state is for ifindex %d; give each interface its own pin-path, or %s", b.opts.Iface, b.host.Index(), i, state.FreshHint)
	}
	if p.Link && p.LinkIfindex != b.host.Index() {
		return fmt.Errorf("iface: %s is ifindex %d, the pinned link is attached to ifindex %d; %s", b.opts.Iface, b.host.Index(), p.LinkIfindex, state.FreshHint)
	}
	want := string(b.opts.XDPMode)
	if want == "" {
		want = string(dispatcher.Native)
	}
	if got := b.host.XDPMode(); p.Link && got != want {
		return fmt.Errorf("xdp-mode: %s, but the pinned link runs xlb in %s mode (a link keeps its mode); keep xdp-mode %s, or %s", want, got, got, state.FreshHint)
	}
	return nil
}

// samePinnedSizes refuses a configuration whose tables would be sized
// otherwise than the pinned ones, and puts the source addresses of each
// family in the pinned order (connections and ports name them by index).
func (b *Balancer) samePinnedSizes(p *dispatcher.Pinned) error {
	if slots := dispatcher.ConntrackSlots(b.opts.ConntrackSize); slots != p.Slots {
		return fmt.Errorf("conntrack.max-entries: %d makes a connection table of %d slots, the pinned one has %d; keep the value it was started with, or %s",
			b.opts.ConntrackSize, slots, p.Slots, state.FreshHint)
	}
	if b.opts.PortLo != p.PortLo || b.opts.PortHi != p.PortHi {
		return fmt.Errorf("source-ports: %d-%d, the pinned tables are for %d-%d; keep that range, or %s", b.opts.PortLo, b.opts.PortHi, p.PortLo, p.PortHi, state.FreshHint)
	}
	for fam, pinned := range [2][]netip.Addr{p.Sources, p.Sources6} {
		f := &b.fam[fam]
		same := len(pinned) == len(f.sources)
		for _, a := range f.sources {
			same = same && slices.Contains(pinned, a)
		}
		switch {
		case !same && fam == 1 && len(pinned) == 0:
			return fmt.Errorf("source-addresses: IPv6 %v (with the services', or the interface's for IPv6 services), but the pinned state was started without IPv6 and its IPv6 tables are not sized; remove the IPv6 services, or %s", f.sources, state.FreshHint)
		case !same:
			return fmt.Errorf("source-addresses: %s %v (with the services'), the pinned tables are for %v; keep those, or %s", familyName(fam), f.sources, pinned, state.FreshHint)
		case fam == 1 && len(pinned) > 0 && p.Slots6 != p.Slots:
			return fmt.Errorf("adopt: the pinned IPv6 connection table has %d slots, the IPv4 one %d: not a table this build makes; %s", p.Slots6, p.Slots, state.FreshHint)
		}
		defaults := make([]netip.Addr, len(f.defaults))
		for i, d := range f.defaults {
			defaults[i] = f.sources[d]
		}
		f.sources = slices.Clone(pinned)
		f.defaults = f.defaults[:0]
		for _, a := range defaults {
			f.defaults = append(f.defaults, slices.Index(f.sources, a))
		}
	}
	return nil
}

// adopt re-derives the services, backend ids and added VIPs from the
// pinned maps and the host record.
func (b *Balancer) adopt() error {
	svcs, err := b.pipe.ServiceEntries()
	if err != nil {
		return fmt.Errorf("adopt services: %w", err)
	}
	bks, err := b.pipe.BackendEntries()
	if err != nil {
		return fmt.Errorf("adopt backends: %w", err)
	}
	now := time.Now()
	a := &Adoption{Services: len(svcs), Backends: len(bks)}
	b.mu.Lock()
	defer b.mu.Unlock()
	byID := map[uint32]*service{}
	for _, e := range svcs {
		proto := TCP
		if e.Proto == dispatcher.UDP {
			proto = UDP
		}
		svc := &service{id: e.ID, spec: Service{VIP: e.VIP, Protocol: proto}, mode: e.Mode, table: e.Table, none: e.Table == nil, adopted: true}
		b.services[svc.spec.Key()] = svc
		byID[e.ID] = svc
		b.svcIDs.reserve(e.ID)
	}
	for _, e := range bks {
		b.bkIDs.reserve(e.ID)
		svc := byID[e.Service]
		if e.Weight == 0 || svc == nil {
			r := retiredBackend{id: e.ID, spec: Backend{Address: e.Address}, since: now}
			if svc != nil {
				r.svc = svc.spec.Key()
			}
			b.retired = append(b.retired, r)
			a.Retired++
			continue
		}
		st, _ := b.pipe.BackendStats(e.ID)
		svc.backends = append(svc.backends, &backend{
			id: e.ID, spec: Backend{Address: e.Address, Weight: uint32(e.Weight)}, state: plugins.StateUp,
			lastNew: st.NewConns, lastAt: now, noPort: st.NoPort,
		})
		svc.spec.Backends = append(svc.spec.Backends, Backend{Address: e.Address, Weight: uint32(e.Weight)})
	}
	for _, addr := range b.host.Added() {
		if !slices.Contains(b.SourceAddresses(), addr) {
			b.addedVIPs = append(b.addedVIPs, addr)
		}
	}
	a.Addresses = len(b.host.Added())
	for _, e := range bks {
		if st, err := b.pipe.BackendStats(e.ID); err == nil {
			a.Connections += int(st.Active)
		}
	}
	b.adopted = a
	b.log.Info("adopted the pinned state", "pin_path", b.opts.State.Path(), "services", a.Services, "backend_ids", a.Backends,
		"retired", a.Retired, "connections", a.Connections, "addresses", a.Addresses)
	return nil
}
