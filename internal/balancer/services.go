package balancer

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/xlb-project/xlb/internal/host"
	"github.com/xlb-project/xlb/plugins"
)

// ErrChangedMeanwhile is returned by ServicesPlan.Commit when another
// change of the services was committed after the plan was prepared.
var ErrChangedMeanwhile = errors.New("services changed meanwhile")

// ServicesPlan is a prepared change of the services: backend ids reserved,
// every selection table computed (the policy plugins asked), the VIP
// addresses that new services need added to the interface. Nothing the
// data path reads has changed until Commit; Abort undoes the
// preparation.
type ServicesPlan struct {
	b        *Balancer
	gen      uint64
	services []*plannedService // as wanted, in order
	remove   []ServiceKey      // running services that go
	svcIDs   []uint32          // reserved for new services
	bkIDs    []uint32          // reserved for new backends
	vips     []netip.Addr      // addresses added to the interface for new services
	finished bool
}

type plannedService struct {
	spec     Service
	svc      *service // the running service; nil for a new one
	id       uint32
	backends []plannedBackend // in spec order
	retire   []*backend       // running backends the service drops
	state    ServiceState     // what the Selector is asked
	choice   choice
}

type plannedBackend struct {
	bk    *backend // running backend, or a new one with a reserved id
	spec  Backend
	state plugins.BackendState // as the table was computed with
	fresh bool
}

// PrepareServices prepares making the data path serve exactly specs.
// Services and backends that disappear will stop taking new connections;
// their established connections keep flowing until they end. It asks the
// Selector for every table without holding the Balancer's lock. The
// neighbour keeper starts on the new backends' next hops at once.
func (b *Balancer) PrepareServices(ctx context.Context, specs []Service) (_ *ServicesPlan, err error) {
	p := &ServicesPlan{b: b}
	defer func() {
		if err != nil {
			p.Abort()
		}
	}()
	b.setTargets(specs)
	b.waitChecked(ctx, specs)
	if err := b.plan(p, specs); err != nil {
		return nil, err
	}
	for _, ps := range p.services {
		if ps.choice, err = b.choose(ctx, ps.state); err != nil {
			return nil, fmt.Errorf("service %s: %w", ps.spec.VIP, err)
		}
	}
	// Host changes come last: a new service's VIP must be an address of
	// the host before the service is published.
	if err := b.addVIPs(ctx, p); err != nil {
		return nil, err
	}
	if err := b.syncFilter(ctx, p.vips); err != nil {
		return nil, err
	}
	return p, nil
}

// addVIPs adds the VIP addresses of the planned services that xlbd manages
// and that are not addresses of the host yet, after checking with an ARP
// probe that no other host holds them.
func (b *Balancer) addVIPs(ctx context.Context, p *ServicesPlan) error {
	for _, ps := range p.services {
		a := ps.spec.VIP.Addr()
		if ps.spec.ExternalVIP || slices.Contains(p.vips, a) || (ps.svc != nil && !ps.svc.spec.ExternalVIP && !ps.svc.adopted) {
			continue
		}
		local, err := host.IsLocal(a)
		if err != nil {
			return err
		}
		if local {
			continue
		}
		if b.opts.ProbeVIP != nil {
			if err := b.opts.ProbeVIP(ctx, b.host.Index(), a); err != nil {
				return fmt.Errorf("service %s: vip %s not added: %w (when keepalived or a routing daemon owns the address, set manage-vip: false)", ps.spec.VIP, a, err)
			}
		}
		added, err := b.host.AddAddress(a)
		if err != nil {
			return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
		}
		if added {
			p.vips = append(p.vips, a)
		}
	}
	return nil
}

// syncFilter makes the VIP filter hold the VIP addresses xlbd added, those
// of services whose VIP another owner manages, and extra.
func (b *Balancer) syncFilter(ctx context.Context, extra []netip.Addr) error {
	f := b.opts.VIPFilter
	if f == nil {
		return nil
	}
	b.filterMu.Lock()
	defer b.filterMu.Unlock()
	b.mu.Lock()
	addrs := slices.Concat(b.addedVIPs, extra)
	for _, svc := range b.services {
		if svc.spec.ExternalVIP {
			addrs = append(addrs, svc.spec.VIP.Addr())
		}
	}
	b.mu.Unlock()
	if st := b.opts.State; st != nil && len(addrs) > 0 {
		if err := st.FilterInstalled(true); err != nil {
			return err
		}
	}
	if err := f.Set(ctx, addrs); err != nil {
		return err
	}
	return nil
}

// syncFilterLogged is syncFilter after a change was committed or aborted,
// when there is nobody to return an error to.
func (b *Balancer) syncFilterLogged() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.syncFilter(ctx, nil); err != nil {
		b.log.Error("update the vip filter", "err", err)
	}
}

// plan checks specs against the running services and reserves ids,
// under the lock.
func (b *Balancer) plan(p *ServicesPlan, specs []Service) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	p.gen = b.svcGen
	want := make(map[ServiceKey]bool, len(specs))
	for _, s := range specs {
		switch {
		case want[s.Key()]:
			return fmt.Errorf("service %s: listed twice", s.Key())
		case len(s.Backends) == 0:
			return fmt.Errorf("service %s: no backends", s.VIP)
		case b.onSource(s.VIP):
			return fmt.Errorf("service %s: %w: vip %s is on a source address, source-ports %d-%d", s.VIP, ErrVIPInPorts, s.VIP, b.opts.PortLo, b.opts.PortHi)
		}
		if _, err := b.sourceIndexes(s); err != nil {
			return err
		}
		want[s.Key()] = true
		ps := &plannedService{spec: s, svc: b.services[s.Key()]}
		if ps.svc != nil {
			ps.id = ps.svc.id
		} else {
			id, ok := b.svcIDs.alloc()
			if !ok {
				return fmt.Errorf("service %s: %w", s.VIP, ErrTooMany)
			}
			p.svcIDs = append(p.svcIDs, id)
			ps.id = id
		}
		running := map[netip.AddrPort]*backend{}
		if ps.svc != nil {
			for _, bk := range ps.svc.backends {
				running[bk.spec.Address] = bk
			}
		}
		vs, usingAll := b.judge(s)
		ps.state = ServiceState{VIP: s.VIP, Protocol: s.Protocol, Policy: s.Policy, PortPool: b.portPool(s), UsingAll: usingAll}
		for i, spec := range s.Backends {
			pb := plannedBackend{bk: running[spec.Address], spec: spec}
			delete(running, spec.Address)
			st := BackendState{Backend: spec, State: vs[i].state, Reason: vs[i].reason, Health: vs[i].check, Checked: vs[i].checked,
				NextHop: vs[i].hop}
			pb.state = st.State
			if pb.bk == nil {
				id, ok := b.bkIDs.alloc()
				if !ok {
					return fmt.Errorf("service %s: %w", s.VIP, ErrTooMany)
				}
				p.bkIDs = append(p.bkIDs, id)
				pb.bk, pb.fresh = &backend{id: id, lastAt: time.Now()}, true
			} else {
				stats, _ := b.pipe.BackendStats(pb.bk.id)
				st.Active, st.NewPerSec = stats.Active, pb.bk.rate
			}
			st.ID = pb.bk.id
			ps.backends = append(ps.backends, pb)
			ps.state.Backends = append(ps.state.Backends, st)
		}
		if ps.svc != nil {
			for _, bk := range ps.svc.backends {
				if running[bk.spec.Address] == bk {
					ps.retire = append(ps.retire, bk)
				}
			}
		}
		p.services = append(p.services, ps)
	}
	for key := range b.services {
		if !want[key] {
			p.remove = append(p.remove, key)
		}
	}
	return nil
}

// Commit puts the prepared services in force: backends first, then each
// service's table, then new services are published; services that go
// are withdrawn and their backends retired last, once no table names
// them. Only a kernel map update can fail here; Commit then stops and
// says the change is partly applied.
func (p *ServicesPlan) Commit() error {
	if p.finished {
		return errors.New("commit services: already finished")
	}
	b := p.b
	// The keeper's targets are the services' backends again afterwards,
	// and the VIP filter holds the VIPs in force, once the lock is
	// released.
	defer b.setTargets(nil)
	defer b.syncFilterLogged()
	// Connections of backends that went down, after the unlock.
	defer b.endConns()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.svcGen != p.gen {
		p.abortLocked()
		return fmt.Errorf("commit services: %w; try again", ErrChangedMeanwhile)
	}
	p.finished = true
	b.svcGen++
	b.addedVIPs = append(b.addedVIPs, p.vips...)
	for _, a := range p.vips {
		b.log.Info("vip address added", "vip", a.String(), "iface", b.opts.Iface)
	}
	err := p.apply()
	// States that changed since the plan: computed again by the refresher.
	b.syncStatesLocked()
	if err != nil {
		return fmt.Errorf("apply services (partly applied): %w", err)
	}
	return nil
}

func (p *ServicesPlan) apply() error {
	b := p.b
	now := time.Now()
	for _, ps := range p.services {
		svc := ps.svc
		if svc == nil {
			svc = &service{id: ps.id}
		}
		next := make([]*backend, 0, len(ps.backends))
		for _, pb := range ps.backends {
			if pb.fresh {
				if err := b.pipe.ResetBackendStats(pb.bk.id); err != nil {
					return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
				}
			}
			if err := b.pipe.SetBackend(pb.bk.id, pb.spec.Address, uint16(min(pb.spec.Weight, 0xffff))); err != nil {
				return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
			}
			if err := b.pipe.SetBackendOwner(pb.bk.id, svc.id); err != nil {
				return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
			}
			if pb.fresh || pb.bk.state != pb.state {
				pb.bk.since = now
			}
			pb.bk.spec, pb.bk.state = pb.spec, pb.state
			next = append(next, pb.bk)
		}
		svc.spec, svc.backends, svc.usingAll = ps.spec, next, ps.state.UsingAll
		svc.gen++
		svc.adopted = false
		if err := b.install(svc, ps.choice, now); err != nil {
			return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
		}
		for _, bk := range ps.retire {
			b.retire(ps.spec.Key(), bk)
			b.log.Info("backend removed: no new connections, established ones keep flowing", "vip", ps.spec.VIP.String(),
				"protocol", ps.spec.Protocol.String(), "backend", bk.spec.Address.String())
		}
		// Published last for a new service; its source addresses may
		// change for a running one.
		srcs, err := b.sourceIndexes(ps.spec)
		if err != nil {
			return err
		}
		if err := b.pipe.SetService(svc.id, ps.spec.VIP, ps.spec.Protocol.number(), srcs); err != nil {
			return fmt.Errorf("service %s: %w", ps.spec.VIP, err)
		}
		if ps.svc == nil {
			b.services[ps.spec.Key()] = svc
			b.log.Info("service added", "vip", ps.spec.VIP.String(), "protocol", ps.spec.Protocol.String(), "policy", ps.spec.Policy,
				"backends", len(ps.spec.Backends))
		}
	}
	for _, key := range p.remove {
		if err := b.removeService(key, b.services[key]); err != nil {
			return fmt.Errorf("service %s: %w", key, err)
		}
	}
	b.publishVIPs()
	return nil
}

// Abort releases what PrepareServices reserved and removes the addresses
// it added; the running services are untouched.
func (p *ServicesPlan) Abort() {
	if p.finished {
		return
	}
	defer p.b.setTargets(nil)
	defer p.b.syncFilterLogged()
	p.b.mu.Lock()
	defer p.b.mu.Unlock()
	p.abortLocked()
}

func (p *ServicesPlan) abortLocked() {
	p.finished = true
	b := p.b
	for _, id := range p.svcIDs {
		b.svcIDs.free(id)
	}
	for _, id := range p.bkIDs {
		b.bkIDs.free(id)
	}
	for _, a := range p.vips {
		if _, err := b.host.RemoveAddress(a); err != nil {
			b.log.Warn("remove vip address of an aborted change", "vip", a.String(), "err", err)
		}
	}
	p.svcIDs, p.bkIDs, p.vips = nil, nil, nil
}
