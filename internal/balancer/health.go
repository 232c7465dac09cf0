package balancer

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/xlb-project/xlb/internal/health"
	"github.com/xlb-project/xlb/plugins"
)

// A backend's state combines its next hop (the neighbour keeper), its
// health check (internal/health) and its weight: it takes new connections
// only when its next hop answers, its check passes (or is still to
// finish its first run) and its weight is above 0.

// verdict is a backend's state for new connections, and why.
type verdict struct {
	state   plugins.BackendState
	reason  string // why it is not up
	hop     string // the next hop, or why it is unreachable
	check   health.Status
	checked bool // it has a health check
	failing bool // its check fails (it may still be used: UsingAll)
	noHop   bool // its next hop does not answer
}

// judge returns the verdict of each of s's backends, and whether the
// service uses the backends whose check fails because no backend is up
// (Service.UseAllWhenDown).
func (b *Balancer) judge(s Service) (_ []verdict, usingAll bool) {
	vs := make([]verdict, len(s.Backends))
	anyUp := false
	for i, bk := range s.Backends {
		v := &vs[i]
		v.state = plugins.StateUp
		if st, ok := b.neigh.Status(bk.Address.Addr()); ok {
			v.hop = st.String()
			if !st.Reachable {
				v.state, v.reason, v.noHop = plugins.StateDown, st.Reason, true
			}
		}
		if bk.Health.Check != "" {
			v.checked = true
			v.check, _ = b.checker.Status(health.Target{Addr: bk.Address, Spec: bk.Health})
			if v.check.Result == health.Failing {
				v.failing = true
				if v.state == plugins.StateUp {
					v.state, v.reason = plugins.StateDown, "health check failing: "+v.check.Last
				}
			}
		}
		if bk.Weight == 0 {
			v.state, v.reason = plugins.StateDraining, "weight 0"
		}
		anyUp = anyUp || v.state == plugins.StateUp
	}
	if anyUp || !s.UseAllWhenDown {
		return vs, false
	}
	for i := range vs {
		if v := &vs[i]; v.state == plugins.StateDown && v.failing && !v.noHop {
			v.state, v.reason, usingAll = plugins.StateUp, "", true
		}
	}
	return vs, usingAll
}

// PluginHealth is the backend's health as the policy plugin protocol says
// it (version 3).
func (s BackendState) PluginHealth() plugins.Health {
	switch {
	case !s.Checked:
		return plugins.HealthNone
	case s.Health.Result == health.Passing:
		return plugins.HealthPassing
	case s.Health.Result == health.Failing:
		return plugins.HealthFailing
	}
	return plugins.HealthUnchecked
}

// healthTargets are the health checks of services' backends.
func healthTargets(svcs []Service) []health.Target {
	var out []health.Target
	for _, s := range svcs {
		for _, bk := range s.Backends {
			t := health.Target{Addr: bk.Address, Spec: bk.Health}
			if bk.Health.Check != "" && !slices.Contains(out, t) {
				out = append(out, t)
			}
		}
	}
	return out
}

// waitChecked waits until the health checks of svcs' backends have run
// once, for at most their longest timeout: a new backend's first check
// decides whether it takes connections at all.
func (b *Balancer) waitChecked(ctx context.Context, svcs []Service) {
	ts := healthTargets(svcs)
	var longest time.Duration
	for _, t := range ts {
		longest = max(longest, t.Spec.Timeout)
	}
	if len(ts) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, longest+100*time.Millisecond)
	defer cancel()
	b.checker.WaitChecked(ctx, ts)
}

// reserved reports whether the data path takes packets to local for its
// own: a source address's source-port range, or a VIP. Health checks never
// use such a local port.
func (b *Balancer) reserved(local netip.AddrPort) bool {
	if slices.Contains(b.fam[family(local.Addr())].sources, local.Addr()) && local.Port() >= b.opts.PortLo && local.Port() <= b.opts.PortHi {
		return true
	}
	if m := b.vips.Load(); m != nil {
		return slices.Contains((*m)[local.Addr()], local.Port())
	}
	return false
}

// publishVIPs tells reserved the VIPs in force. Caller holds b.mu.
func (b *Balancer) publishVIPs() {
	m := make(map[netip.Addr][]uint16, len(b.services))
	for k := range b.services {
		m[k.VIP.Addr()] = append(m[k.VIP.Addr()], k.VIP.Port())
	}
	b.vips.Store(&m)
}

// retiredBackend is a backend removed from its service (or with it) whose
// connections have not all ended: its id is not reused until they have.
type retiredBackend struct {
	id    uint32
	svc   ServiceKey
	spec  Backend
	since time.Time
}

// reset asks endConns to end a backend's connections.
type reset struct {
	id   uint32
	vip  netip.AddrPort
	addr netip.AddrPort
}

// RetiredBackend is a removed backend that still carries connections.
type RetiredBackend struct {
	Service  ServiceKey
	Address  netip.AddrPort
	ID       uint32
	Active   int64
	HalfOpen int64
	NoPort   uint64
	Since    time.Time // when it was removed
}

// Retired lists the backends removed while they still carry connections,
// oldest first. One whose last connection has ended is left out (its id
// is freed at the next sample).
func (b *Balancer) Retired() []RetiredBackend {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]RetiredBackend, 0, len(b.retired))
	for _, r := range b.retired {
		st, _ := b.pipe.BackendStats(r.id)
		if st.Active <= 0 {
			continue
		}
		out = append(out, RetiredBackend{Service: r.svc, Address: r.spec.Address, ID: r.id, Active: st.Active, HalfOpen: st.HalfOpen,
			NoPort: st.NoPort, Since: r.since})
	}
	return out
}

// endConns ends the connections of the backends whose check took them
// down with ResetOnDown set. It takes b.mu only to collect them: ending
// connections walks the connection table.
func (b *Balancer) endConns() {
	b.mu.Lock()
	resets := b.resets
	b.resets = nil
	b.mu.Unlock()
	for _, r := range resets {
		n, err := b.pipe.EndBackendConns(r.id)
		if err != nil {
			b.log.Error("reset the connections of a backend that went down", "vip", r.vip.String(), "backend", r.addr.String(), "err", err)
			continue
		}
		b.log.Warn("backend down: its established connections reset (reset-established)", "vip", r.vip.String(), "backend", r.addr.String(),
			"connections", n)
	}
}
