package balancer

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/tick"
	"github.com/xlb-project/xlb/plugins"
)

// Selection tables: how they are computed and installed, the refresher,
// and the backends' states.
//
// Locking: b.mu guards the services and is held only for reading and
// writing them and the data path's maps, never across a Selector call. A
// change is therefore computed in three steps: a snapshot under the lock,
// the Selector calls without it, then the install under the lock, which
// installs nothing computed from a snapshot that another change has made
// old (service.gen for tables, Balancer.svcGen for the set of services).
// The sweeper never takes the lock.

const (
	// retryInterval is how long a service whose table could not be
	// computed keeps its table before it is tried again.
	retryInterval = time.Second
	// refreshTick is how often the refresher looks for services due.
	refreshTick = 100 * time.Millisecond
	// maxAttempts bounds how often a change is computed again when
	// another change overtook it.
	maxAttempts = 3
	// refreshWorkers bounds the tables the refresher computes at once.
	refreshWorkers = 8
)

// choice is a computed selection: a mode and the backend ids of its
// table; no ids means no backend may take new connections.
type choice struct {
	mode    dispatcher.Mode
	ids     []uint32
	refresh time.Duration
}

// choose asks the Selector for a table for st and checks it. It takes no
// lock. When no backend may take new connections it asks nothing and
// returns the empty choice.
func (b *Balancer) choose(ctx context.Context, st ServiceState) (choice, error) {
	if !slices.ContainsFunc(st.Backends, eligible) {
		return choice{}, nil
	}
	sel, err := b.opts.Selector.Select(ctx, st)
	if err != nil {
		return choice{}, fmt.Errorf("select with policy %s: %w", st.Policy, err)
	}
	c := choice{mode: sel.Mode, ids: make([]uint32, len(sel.Table)), refresh: sel.Refresh}
	for i, idx := range sel.Table {
		if idx < 0 || idx >= len(st.Backends) {
			return choice{}, fmt.Errorf("policy %s: table entry %d names backend %d of %d", st.Policy, i, idx, len(st.Backends))
		}
		bk := st.Backends[idx]
		if !eligible(bk) {
			return choice{}, fmt.Errorf("policy %s: table entry %d names backend %s, %s with weight %d", st.Policy, i, bk.Address, bk.State, bk.Weight)
		}
		c.ids[i] = bk.ID
	}
	return c, nil
}

func eligible(b BackendState) bool { return b.State == plugins.StateUp && b.Weight > 0 }

// install puts a computed choice in force for svc. Caller holds b.mu.
func (b *Balancer) install(svc *service, c choice, now time.Time) error {
	svc.stale, svc.retryAt, svc.refreshAt = false, time.Time{}, time.Time{}
	if c.refresh > 0 {
		svc.refreshAt = now.Add(c.refresh)
	}
	if len(c.ids) == 0 {
		if svc.none {
			return nil
		}
		if err := b.pipe.ClearSelection(svc.id); err != nil {
			return err
		}
		svc.mode, svc.table, svc.none = 0, nil, true
		b.log.Warn("no backend may take new connections: service has no selection table, new connections are dropped",
			"vip", svc.spec.VIP.String(), "backends", len(svc.backends))
		return nil
	}
	if c.mode == svc.mode && slices.Equal(c.ids, svc.table) {
		return nil
	}
	if err := b.pipe.SetSelection(svc.id, c.mode, c.ids); err != nil {
		return err
	}
	if svc.none {
		b.log.Info("service has a selection table again", "vip", svc.spec.VIP.String())
	}
	svc.mode, svc.table, svc.none = c.mode, c.ids, false
	return nil
}

// state is the snapshot of svc a Selector sees and status shows. Caller
// holds b.mu.
func (b *Balancer) state(svc *service) ServiceState {
	st := ServiceState{VIP: svc.spec.VIP, Protocol: svc.spec.Protocol, Policy: svc.spec.Policy, PortPool: b.portPool(svc.spec),
		ExternalVIP: svc.spec.ExternalVIP, UsingAll: svc.usingAll}
	vs, _ := b.judge(svc.spec)
	for i, bk := range svc.backends {
		stats, _ := b.pipe.BackendStats(bk.id)
		v := vs[i]
		reason := v.reason
		if bk.state == plugins.StateUp {
			reason = ""
		}
		st.Backends = append(st.Backends, BackendState{
			Backend: bk.spec, ID: bk.id, State: bk.state, Reason: reason, Since: bk.since, Health: v.check, Checked: v.checked,
			NextHop: v.hop, Active: stats.Active, HalfOpen: stats.HalfOpen, NoPort: stats.NoPort, NewPerSec: bk.rate,
		})
	}
	return st
}

// setTargets gives the neighbour keeper and the health checker the
// backends of the services in force and of extra. It takes b.mu.
func (b *Balancer) setTargets(extra []Service) {
	var addrs []netip.Addr
	add := func(a netip.Addr) {
		if !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	all := slices.Clone(extra)
	b.mu.Lock()
	for _, svc := range b.services {
		all = append(all, svc.spec)
	}
	b.mu.Unlock()
	for _, s := range all {
		for _, bk := range s.Backends {
			add(bk.Address.Addr())
		}
	}
	b.neigh.SetTargets(addrs)
	b.checker.SetTargets(healthTargets(all))
}

// SetPolicy switches the policy of one service (vip valid) or of all. The
// new tables are all computed before any is installed; if one fails,
// nothing changes. Established connections keep their backends.
func (b *Balancer) SetPolicy(ctx context.Context, vip netip.AddrPort, policy string) ([]netip.AddrPort, error) {
	type job struct {
		svc *service
		gen uint64
		st  ServiceState
		c   choice
	}
	for attempt := 1; ; attempt++ {
		var jobs []job
		b.mu.Lock()
		for _, svc := range b.services {
			if vip.IsValid() && svc.spec.VIP != vip {
				continue
			}
			st := b.state(svc)
			st.Policy = policy
			jobs = append(jobs, job{svc: svc, gen: svc.gen, st: st})
		}
		b.mu.Unlock()
		if len(jobs) == 0 {
			return nil, fmt.Errorf("%w: %s", ErrNoService, vip)
		}
		for i := range jobs {
			c, err := b.choose(ctx, jobs[i].st)
			if err != nil {
				return nil, fmt.Errorf("service %s: %w", jobs[i].st.VIP, err)
			}
			jobs[i].c = c
		}
		b.mu.Lock()
		overtaken := slices.ContainsFunc(jobs, func(j job) bool {
			return b.services[j.st.Key()] != j.svc || j.svc.gen != j.gen
		})
		if overtaken {
			b.mu.Unlock()
			if attempt == maxAttempts {
				return nil, fmt.Errorf("set policy: %w", ErrBusy)
			}
			continue
		}
		var done []netip.AddrPort
		var err error
		now := time.Now()
		for _, j := range jobs {
			if err = b.install(j.svc, j.c, now); err != nil {
				err = fmt.Errorf("service %s: %w", j.st.VIP, err)
				break
			}
			j.svc.spec.Policy = policy
			j.svc.gen++
			done = append(done, j.st.VIP)
		}
		b.mu.Unlock()
		slices.SortFunc(done, func(x, y netip.AddrPort) int { return x.Compare(y) })
		return done, err
	}
}

// Invalidate makes the services of a policy compute their tables again at
// once (for example after its plugin restarted).
func (b *Balancer) Invalidate(policy string) {
	b.mu.Lock()
	for _, svc := range b.services {
		if svc.spec.Policy == policy {
			svc.stale, svc.retryAt = true, time.Time{}
		}
	}
	b.mu.Unlock()
	b.kickRefresh()
}

func (b *Balancer) kickRefresh() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// Refresh computes the tables of the services that are due: those that
// changed (a backend's state) or failed before (after retryInterval), and
// those whose Selection asked for a Refresh that has passed. A service
// that fails keeps the table in force.
func (b *Balancer) Refresh(ctx context.Context) error {
	type job struct {
		svc *service
		gen uint64
		st  ServiceState
		c   choice
		err error
	}
	now := time.Now()
	var jobs []job
	b.mu.Lock()
	for _, svc := range b.services {
		due := (svc.stale && !now.Before(svc.retryAt)) || (!svc.refreshAt.IsZero() && !now.Before(svc.refreshAt))
		if due {
			jobs = append(jobs, job{svc: svc, gen: svc.gen, st: b.state(svc)})
		}
	}
	b.mu.Unlock()
	if len(jobs) == 0 {
		return nil
	}
	// Concurrently: a plugin that hangs until its deadline delays only
	// its own services.
	var g errgroup.Group
	g.SetLimit(refreshWorkers)
	for i := range jobs {
		g.Go(func() error {
			jobs[i].c, jobs[i].err = b.choose(ctx, jobs[i].st)
			return nil
		})
	}
	_ = g.Wait()
	var errs []error
	now = time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, j := range jobs {
		if b.services[j.st.Key()] != j.svc || j.svc.gen != j.gen {
			continue // changed meanwhile: that change recomputed it or marked it stale
		}
		err := j.err
		if err == nil {
			err = b.install(j.svc, j.c, now)
		} else {
			b.withoutIneligible(j.svc)
		}
		if err != nil {
			j.svc.stale, j.svc.retryAt, j.svc.refreshAt = true, now.Add(retryInterval), time.Time{}
			errs = append(errs, fmt.Errorf("service %s: %w", j.st.VIP, err))
		}
	}
	return errors.Join(errs...)
}

// withoutIneligible takes the backends that may not take new connections
// out of a service's table in force, for when its policy cannot compute a
// new one (its plugin restarting): the rest of the table keeps its order
// and proportions, and no table is left when none remains. Caller holds
// b.mu.
func (b *Balancer) withoutIneligible(svc *service) {
	if svc.none || len(svc.table) == 0 {
		return
	}
	ok := make(map[uint32]bool, len(svc.backends))
	for _, bk := range svc.backends {
		ok[bk.id] = bk.state == plugins.StateUp && bk.spec.Weight > 0
	}
	kept := slices.DeleteFunc(slices.Clone(svc.table), func(id uint32) bool { return !ok[id] })
	if len(kept) == len(svc.table) {
		return
	}
	b.log.Warn("policy unavailable: backends that may not take new connections taken out of the table in force",
		"vip", svc.spec.VIP.String(), "policy", svc.spec.Policy, "entries", len(svc.table), "kept", len(kept))
	retry, refresh := svc.retryAt, svc.refreshAt
	if err := b.install(svc, choice{mode: svc.mode, ids: kept}, time.Now()); err != nil {
		b.log.Error("take backends out of the table in force", "vip", svc.spec.VIP.String(), "err", err)
	}
	// The table is still the policy's to compute.
	svc.stale, svc.retryAt, svc.refreshAt = true, retry, refresh
}

// syncStates takes the neighbour keeper's and the health checker's view
// of every backend (their OnChange); a service whose backends changed
// state computes its table again.
func (b *Balancer) syncStates() {
	b.mu.Lock()
	b.syncStatesLocked()
	b.mu.Unlock()
	b.endConns()
}

// syncStatesLocked updates the backends' states. The connections of
// backends to reset are left in b.resets for endConns. Caller holds b.mu.
func (b *Balancer) syncStatesLocked() {
	changed := false
	now := time.Now()
	for _, svc := range b.services {
		vs, usingAll := b.judge(svc.spec)
		if usingAll != svc.usingAll {
			if usingAll {
				b.log.Warn("every backend down: the backends whose health check fails take new connections (all-down: use-all)",
					"vip", svc.spec.VIP.String(), "protocol", svc.spec.Protocol.String())
			} else {
				b.log.Info("a backend is up again: backends whose health check fails no longer used", "vip", svc.spec.VIP.String(),
					"protocol", svc.spec.Protocol.String())
			}
			svc.usingAll = usingAll
		}
		for i, bk := range svc.backends {
			v := vs[i]
			if v.state == bk.state {
				continue
			}
			attrs := []any{"vip", svc.spec.VIP.String(), "protocol", svc.spec.Protocol.String(), "backend", bk.spec.Address.String(),
				"was", bk.state.String()}
			switch v.state {
			case plugins.StateUp:
				b.log.Info("backend up: takes new connections again", attrs...)
			case plugins.StateDraining:
				b.log.Info("backend draining: no new connections, established ones keep flowing", attrs...)
			default:
				b.log.Warn("backend "+v.state.String()+": no new connections", append(attrs, "reason", v.reason)...)
			}
			if v.state == plugins.StateDown && v.failing && !v.noHop && bk.spec.ResetOnDown {
				b.resets = append(b.resets, reset{id: bk.id, vip: svc.spec.VIP, addr: bk.spec.Address})
			}
			bk.state, bk.since = v.state, now
			svc.gen++
			svc.stale, svc.retryAt = true, time.Time{}
			changed = true
		}
	}
	if changed {
		b.kickRefresh()
	}
}

// Run sweeps conntrack, keeps the backends' next hops resolved, computes
// the tables that are due, samples load and frees retired backend ids,
// until ctx ends. Each runs on its own goroutine: the sweeper never waits
// for the rest (it takes no lock).
func (b *Balancer) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return tick.Every(ctx, b.opts.GCInterval, nil, b.sweep) })
	g.Go(func() error { return b.neigh.Run(ctx) })
	g.Go(func() error { return tick.Every(ctx, b.opts.GCInterval, nil, b.sample) })
	g.Go(func() error {
		return tick.Every(ctx, refreshTick, b.kick, func() {
			if err := b.Refresh(ctx); err != nil {
				level := b.log.Warn
				if errors.Is(err, ErrUnavailable) {
					level = b.log.Debug
				}
				level("compute selection tables, tables in force kept", "err", err)
			}
		})
	})
	return g.Wait()
}

// sweep runs the conntrack sweeper once. It reads only the data path's
// maps and the (immutable) options.
func (b *Balancer) sweep() {
	res, err := b.pipe.GC(b.opts.Timeouts)
	if err != nil {
		b.log.Warn("conntrack sweep", "err", err)
	} else if res.Expired+res.Orphans > 0 {
		b.log.Debug("conntrack sweep", "scanned", res.Scanned, "expired", res.Expired, "orphans", res.Orphans)
	}
}
