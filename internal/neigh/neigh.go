// Package neigh keeps the next hops of xlb's backends resolved in the
// kernel's neighbour table, and tells which backends have none.
//
// xlb's data path takes a backend's next-hop MAC from the kernel
// (bpf_fib_lookup, which answers for any valid entry, STALE included) but
// sends its packets itself, from XDP: they never pass through the kernel's
// neighbour code, so the kernel never re-checks an entry. A STALE entry
// keeps its MAC when the backend is re-created with a new one, and a backend
// that is gone keeps its entry. The kernel's own re-check is slow: asked
// with NTF_USE, a STALE entry goes DELAY (5 s), then PROBE (3 unicast
// probes 1 s apart), then FAILED, and only a broadcast after that finds the
// new MAC: 8.3 s on kernel 6.18, measured.
//
// So a Keeper probes every next hop itself, every Interval, with ARP
// requests from the interface (neighbour solicitations for an IPv6 next
// hop, RFC 4861): unicast to the MAC it knows, broadcast (to the
// solicited-node multicast address) when that went unanswered or when it
// knows none. Any ARP packet the next hop sends (an answer, or a request
// of its own; for IPv6 an advertisement or a solicitation) confirms it. When the MAC it
// answers from differs from the kernel's entry, the Keeper writes it there
// (NUD_REACHABLE), so the data path's next lookup finds it. A next hop that
// answered none of the last Misses probes is unreachable, and so is every
// target behind it. Static entries (PERMANENT, NOARP) are never rewritten.
package neigh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"

	"github.com/xlb-project/xlb/internal/tick"
)

// Defaults of Options.
const (
	DefaultInterval = 500 * time.Millisecond
	DefaultMisses   = 3
)

// Options configure a Keeper.
type Options struct {
	// Interval is the time between two probes of a next hop;
	// DefaultInterval when 0.
	Interval time.Duration
	// Misses is how many probes in a row a next hop must leave unanswered
	// to be unreachable; DefaultMisses when 0.
	Misses int
	// Logger receives reachability and MAC changes. Nil discards them.
	Logger *slog.Logger
	// OnChange is called after a target became reachable or unreachable,
	// from Run's goroutine and with no lock of the Keeper held.
	OnChange func()
	// NetNS is the network namespace the Keeper works in (routes, the
	// neighbour table, its packet sockets). The zero value (and
	// netns.None()) means the namespace of the thread that calls New.
	NetNS netns.NsHandle
}

// Status is what the Keeper knows of a target's next hop.
type Status struct {
	// NextHop is the target itself, or the gateway its route goes through.
	NextHop netip.Addr
	// Iface is the interface towards the next hop.
	Iface string
	// MAC is the address the next hop last answered from; nil before it
	// answered.
	MAC net.HardwareAddr
	// Reachable: the target has a route and its next hop answered at least
	// one of the last Misses probes. A new target is reachable until
	// proven otherwise.
	Reachable bool
	// Reason says why the target is not reachable.
	Reason string
	// Since is when Reachable last changed, or when the target was added.
	Since time.Time
}

// String is a one-line description for logs and status: "10.0.0.2 on
// eth0 at 02:00:00:00:00:01", or the reason it is unreachable.
func (s Status) String() string {
	if !s.Reachable {
		return s.Reason
	}
	if !s.NextHop.IsValid() {
		return "not probed yet"
	}
	out := fmt.Sprintf("%s on %s", s.NextHop, s.Iface)
	if s.MAC != nil {
		out += " at " + s.MAC.String()
	} else {
		out += ", no answer yet"
	}
	return out
}

type hopKey struct {
	ifindex int
	ip      netip.Addr
}

// hop is a next hop being probed.
type hop struct {
	key      hopKey
	iface    string
	src      netip.Addr // sender address of the probes
	mac      net.HardwareAddr
	static   bool // the kernel's entry is PERMANENT or NOARP: never rewritten
	probed   bool // a probe went out since the last round
	answered bool // an ARP or NDP packet came from it since the last probe
	misses   int  // probes in a row left unanswered
}

// target is an address whose next hop is kept.
type target struct {
	key       hopKey // zero while it has no route
	noRoute   string // why it has no route
	reachable bool
	since     time.Time
}

// Keeper probes the next hops of a set of targets. Its methods are safe for
// concurrent use; Run does the work.
type Keeper struct {
	opts Options
	log  *slog.Logger
	ns   netns.NsHandle // where it works; owned when Options.NetNS was unset
	nl   *netlink.Handle
	wake chan struct{}

	mu      sync.Mutex
	targets map[netip.Addr]*target
	hops    map[hopKey]*hop
	socks   map[sockKey]*linkSocket // opened by Run
}

// New returns a Keeper with no targets. Close releases it.
func New(opts Options) (*Keeper, error) {
	if opts.Interval <= 0 {
		opts.Interval = DefaultInterval
	}
	if opts.Misses <= 0 {
		opts.Misses = DefaultMisses
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	// Every socket the Keeper opens, whichever thread opens it, is in this
	// namespace: the caller's unless told otherwise.
	ns := opts.NetNS
	if ns <= 0 {
		var err error
		if ns, err = netns.Get(); err != nil {
			return nil, fmt.Errorf("open current netns: %w", err)
		}
	}
	// NewHandleAt enters ns with setns(2), which needs CAP_SYS_ADMIN even
	// for the namespace the thread is in; xlbd runs without it.
	var nl *netlink.Handle
	var err error
	if opts.NetNS <= 0 {
		nl, err = netlink.NewHandle()
	} else {
		nl, err = netlink.NewHandleAt(ns)
	}
	if err != nil {
		if opts.NetNS <= 0 {
			ns.Close()
		}
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return &Keeper{
		opts:    opts,
		log:     opts.Logger,
		ns:      ns,
		nl:      nl,
		wake:    make(chan struct{}, 1),
		targets: make(map[netip.Addr]*target),
		hops:    make(map[hopKey]*hop),
		socks:   make(map[sockKey]*linkSocket),
	}, nil
}

// Close releases the Keeper's netlink handle (and namespace handle). Run
// must have returned.
func (k *Keeper) Close() error {
	k.nl.Close()
	if k.opts.NetNS <= 0 {
		return k.ns.Close()
	}
	return nil
}

// SetTargets makes the Keeper keep exactly these addresses' next hops. A
// new target is reachable until proven otherwise; its next hop is asked
// for at once (NTF_USE: the kernel resolves it) and probed by Run's next
// round, which SetTargets starts.
func (k *Keeper) SetTargets(addrs []netip.Addr) {
	var added []netip.Addr
	k.mu.Lock()
	want := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		want[a] = true
		if k.targets[a] == nil {
			k.targets[a] = &target{reachable: true, since: time.Now()}
			added = append(added, a)
		}
	}
	for a := range k.targets {
		if !want[a] {
			delete(k.targets, a)
		}
	}
	k.mu.Unlock()
	routes := k.routes(added)
	entries := k.kernelEntries(routes)
	for _, r := range routes {
		if _, has := entries[r.key]; r.err == nil && !has {
			k.resolve(r.key)
		}
	}
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// Status returns what the Keeper knows of target a.
func (k *Keeper) Status(a netip.Addr) (Status, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	t := k.targets[a]
	if t == nil {
		return Status{}, false
	}
	st := Status{Reachable: t.reachable, Since: t.since}
	h := k.hops[t.key]
	switch {
	case t.noRoute != "":
		st.Reason = t.noRoute
	case h != nil:
		st.NextHop, st.Iface, st.MAC = h.key.ip, h.iface, slices.Clone(h.mac)
		if !t.reachable {
			what := "ARP probes"
			if h.key.ip.Is6() {
				what = "neighbour solicitations"
			}
			st.Reason = fmt.Sprintf("next hop %s on %s answered none of the last %d %s (%s)",
				h.key.ip, h.iface, h.misses, what, time.Duration(h.misses)*k.opts.Interval)
		}
	}
	return st, true
}

// Run probes every Interval until ctx ends.
func (k *Keeper) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer k.closeSockets()
		k.round(ctx, g)
		return tick.Every(ctx, k.opts.Interval, k.wake, func() { k.round(ctx, g) })
	})
	return g.Wait()
}

// route returns the next hop towards a, and the address probes are sent
// from.
func (k *Keeper) route(a netip.Addr) (hopKey, netip.Addr, error) {
	routes, err := k.nl.RouteGet(a.AsSlice())
	if err != nil {
		return hopKey{}, netip.Addr{}, err
	}
	if len(routes) == 0 {
		return hopKey{}, netip.Addr{}, errors.New("no route")
	}
	r := routes[0]
	if r.Type != 0 && r.Type != 1 { // RTN_UNSPEC, RTN_UNICAST
		return hopKey{}, netip.Addr{}, fmt.Errorf("route of type %d", r.Type)
	}
	next := a
	if gw, ok := netip.AddrFromSlice(r.Gw); ok && gw.Unmap().IsValid() && !gw.IsUnspecified() {
		next = gw.Unmap()
	}
	src, _ := netip.AddrFromSlice(r.Src)
	return hopKey{ifindex: r.LinkIndex, ip: next}, src.Unmap(), nil
}

// routes looks up the routes of addrs.
func (k *Keeper) routes(addrs []netip.Addr) map[netip.Addr]routed {
	out := make(map[netip.Addr]routed, len(addrs))
	for _, a := range addrs {
		key, src, err := k.route(a)
		out[a] = routed{key, src, err}
	}
	return out
}

// resolve asks the kernel to resolve a next hop it has no entry for
// (NTF_USE), as a connection through the kernel's own stack would. Never
// for a next hop with an entry: NTF_USE turns a PERMANENT entry into a
// dynamic one.
func (k *Keeper) resolve(key hopKey) {
	err := k.nl.NeighSet(&netlink.Neigh{
		LinkIndex: key.ifindex,
		Family:    family(key.ip),
		IP:        key.ip.AsSlice(),
		State:     netlink.NUD_NONE,
		Flags:     netlink.NTF_USE,
	})
	if err != nil {
		k.log.Debug("ask the kernel to resolve a next hop", "next_hop", key.ip.String(), "err", err)
	}
}

// routed is a target's route: its next hop and the probes' sender address.
type routed struct {
	key hopKey
	src netip.Addr
	err error
}

type probe struct {
	key   hopKey
	src   netip.Addr
	dst   net.HardwareAddr // nil: broadcast
	fixed net.HardwareAddr // the MAC to write into the kernel's entry
}

// round is one probe round: routes, the kernel's entries, the probes, and
// the targets' reachability.
func (k *Keeper) round(ctx context.Context, g *errgroup.Group) {
	k.mu.Lock()
	addrs := make([]netip.Addr, 0, len(k.targets))
	for a := range k.targets {
		addrs = append(addrs, a)
	}
	k.mu.Unlock()

	routes := k.routes(addrs)
	entries := k.kernelEntries(routes)
	names := make(map[int]string)
	for _, r := range routes {
		if _, ok := names[r.key.ifindex]; r.err == nil && !ok {
			names[r.key.ifindex] = fmt.Sprintf("if%d", r.key.ifindex)
			if l, err := k.nl.LinkByIndex(r.key.ifindex); err == nil {
				names[r.key.ifindex] = l.Attrs().Name
			}
		}
	}

	var probes []probe
	var changed []string
	now := time.Now()
	k.mu.Lock()
	used := make(map[hopKey]bool)
	for a, t := range k.targets {
		r, ok := routes[a]
		if !ok {
			continue // added during the round: next round
		}
		if r.err != nil {
			t.key, t.noRoute = hopKey{}, fmt.Sprintf("no route to %s: %v", a, r.err)
			continue
		}
		t.key, t.noRoute = r.key, ""
		used[r.key] = true
		if k.hops[r.key] == nil {
			k.hops[r.key] = &hop{key: r.key, iface: names[r.key.ifindex]}
		}
		if r.src.IsValid() {
			k.hops[r.key].src = r.src
		}
	}
	for key, h := range k.hops {
		if !used[key] {
			delete(k.hops, key)
			continue
		}
		if h.probed {
			if h.answered {
				h.misses = 0
			} else {
				h.misses++
			}
		}
		p := probe{key: key, src: h.src}
		if h.misses == 0 && h.mac != nil {
			p.dst = h.mac
		}
		e, has := entries[key]
		h.static = has && e.State&(netlink.NUD_PERMANENT|netlink.NUD_NOARP) != 0
		if h.mac != nil && !h.static && h.misses < k.opts.Misses &&
			(!has || e.State&nudValid == 0 || !slices.Equal(e.HardwareAddr, h.mac)) {
			// The kernel lost or changed the entry of a next hop that
			// answers: put its MAC back.
			p.fixed = h.mac
		}
		h.probed, h.answered = true, false
		probes = append(probes, p)
	}
	for a, t := range k.targets {
		h := k.hops[t.key]
		reachable := t.noRoute == "" && h != nil && h.misses < k.opts.Misses
		if _, ok := routes[a]; !ok || reachable == t.reachable {
			continue
		}
		t.reachable, t.since = reachable, now
		changed = append(changed, a.String())
		if reachable {
			k.log.Info("backend next hop reachable", "backend", a.String(), "next_hop", h.key.ip.String(), "iface", h.iface)
		} else if t.noRoute != "" {
			k.log.Warn("backend next hop unreachable", "backend", a.String(), "reason", t.noRoute)
		} else {
			k.log.Warn("backend next hop unreachable", "backend", a.String(), "next_hop", h.key.ip.String(), "iface", h.iface,
				"unanswered_probes", h.misses)
		}
	}
	k.mu.Unlock()

	for _, p := range probes {
		if p.fixed != nil {
			k.writeEntry(p.key, p.fixed)
		} else if _, has := entries[p.key]; !has {
			k.resolve(p.key)
		}
		if err := k.send(ctx, g, p); err != nil {
			k.log.Warn("send neighbour probe", "next_hop", p.key.ip.String(), "err", err)
		}
	}
	if len(changed) > 0 && k.opts.OnChange != nil {
		k.opts.OnChange()
	}
}

// nudValid are the states in which bpf_fib_lookup returns an entry's MAC.
const nudValid = netlink.NUD_PERMANENT | netlink.NUD_NOARP | netlink.NUD_REACHABLE |
	netlink.NUD_PROBE | netlink.NUD_STALE | netlink.NUD_DELAY

// kernelEntries reads the kernel's neighbour entries of the next hops the
// routes name, one dump per interface.
func (k *Keeper) kernelEntries(routes map[netip.Addr]routed) map[hopKey]netlink.Neigh {
	out := make(map[hopKey]netlink.Neigh)
	done := make(map[int]bool)
	for _, r := range routes {
		if r.err != nil || done[r.key.ifindex] {
			continue
		}
		done[r.key.ifindex] = true
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			neighs, err := k.nl.NeighList(r.key.ifindex, fam)
			if err != nil {
				k.log.Warn("list neighbours", "ifindex", r.key.ifindex, "err", err)
				continue
			}
			for _, n := range neighs {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					out[hopKey{ifindex: n.LinkIndex, ip: ip.Unmap()}] = n
				}
			}
		}
	}
	return out
}

// writeEntry writes a next hop's MAC into the kernel's neighbour table.
func (k *Keeper) writeEntry(key hopKey, mac net.HardwareAddr) {
	err := k.nl.NeighSet(&netlink.Neigh{
		LinkIndex:    key.ifindex,
		Family:       family(key.ip),
		IP:           key.ip.AsSlice(),
		HardwareAddr: mac,
		State:        netlink.NUD_REACHABLE,
	})
	if err != nil {
		k.log.Warn("write neighbour entry", "next_hop", key.ip.String(), "mac", mac.String(), "err", err)
		return
	}
	k.log.Debug("neighbour entry written", "next_hop", key.ip.String(), "mac", mac.String())
}

// family is a's netlink address family.
func family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// answered records an ARP or NDP packet from ip on ifindex, sent from mac.
func (k *Keeper) answered(ifindex int, ip netip.Addr, mac net.HardwareAddr) {
	k.mu.Lock()
	h := k.hops[hopKey{ifindex: ifindex, ip: ip}]
	if h == nil {
		k.mu.Unlock()
		return
	}
	h.answered = true
	var old net.HardwareAddr
	changed := !slices.Equal(h.mac, mac)
	if changed {
		old, h.mac = h.mac, slices.Clone(mac)
	}
	static := h.static
	k.mu.Unlock()
	if !changed {
		return
	}
	if old != nil {
		k.log.Info("backend next hop moved to a new MAC", "next_hop", ip.String(), "old_mac", old.String(), "mac", mac.String())
	}
	if !static {
		k.writeEntry(hopKey{ifindex: ifindex, ip: ip}, mac)
	}
}
