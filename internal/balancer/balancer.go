// Package balancer is xlb's control plane as a library: it turns a set of
// services into the data path's map state, attaches the pipeline to an
// interface, has the host prepared for it (VIP and source addresses and
// forwarding through internal/host; neighbour entries) and runs the
// conntrack sweeper. xlbd is a thin layer over it.
package balancer

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

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/host"
)

// Errors returned by the Balancer.
var (
	ErrVIPInPorts = errors.New("vip port inside the source-port range")
	ErrTooMany    = errors.New("too many services or backends")
	ErrNoService  = errors.New("no such service")
)

// Options configure a Balancer.
type Options struct {
	Iface         string
	XDPMode       dispatcher.XDPMode
	SourceAddress netip.Addr // zero: the interface's primary IPv4 address
	PortLo        uint16
	PortHi        uint16
	ConntrackSize uint32
	Timeouts      dispatcher.Timeouts
	GCInterval    time.Duration
	Logger        *slog.Logger
	// Selector computes selection tables (xlbd: the policy plugins).
	// Required.
	Selector Selector
}

// Backend is a configured backend of a service.
type Backend struct {
	Address netip.AddrPort
	Weight  uint32
}

// Service is a configured service.
type Service struct {
	VIP      netip.AddrPort
	Policy   string
	Backends []Backend
}

// BackendState is a backend as a Selector sees it, with live load.
type BackendState struct {
	Backend
	ID        uint32 // data-path backend id
	Active    int64  // open connections
	NewPerSec float64
}

// ServiceState is a service as a Selector sees it.
type ServiceState struct {
	VIP      netip.AddrPort
	Policy   string
	Backends []BackendState
}

// Selection is a selection table: a mode and indexes into
// ServiceState.Backends.
type Selection struct {
	Mode  dispatcher.Mode
	Table []int
}

// Selector turns a service's backends and load into a selection table.
// It is called when a service changes and on every Refresh.
type Selector interface {
	Select(ctx context.Context, svc ServiceState) (Selection, error)
}

type service struct {
	id       uint32
	spec     Service
	backends []*backend // in spec order
	mode     dispatcher.Mode
	table    []uint32 // backend ids in force
}

type backend struct {
	id      uint32
	spec    Backend
	lastNew uint64
	lastAt  time.Time
	rate    float64
}

// Balancer owns the pipeline, its attachment and the host changes made
// for it.
type Balancer struct {
	opts   Options
	log    *slog.Logger
	pipe   *dispatcher.Pipeline
	att    *dispatcher.Attachment
	host   *host.Iface
	source netip.Addr

	mu        sync.Mutex
	services  map[netip.AddrPort]*service
	svcIDs    idAllocator
	bkIDs     idAllocator
	retired   []uint32     // backend ids waiting for their connections to end
	addedVIPs []netip.Addr // VIPs the host did not have, added for their services
	svcGen    uint64       // counts committed service changes
}

// New loads the pipeline and prepares the interface; Attach attaches.
// Nothing is left behind if it fails.
func New(opts Options) (_ *Balancer, err error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Selector == nil {
		return nil, errors.New("new balancer: no selector")
	}
	if opts.GCInterval <= 0 {
		opts.GCInterval = time.Second
	}
	b := &Balancer{
		opts:     opts,
		log:      opts.Logger,
		services: make(map[netip.AddrPort]*service),
		svcIDs:   newIDAllocator(dispatcher.MaxServices),
		bkIDs:    newIDAllocator(dispatcher.MaxBackends),
	}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	if b.host, err = host.Open(opts.Iface); err != nil {
		return nil, err
	}
	b.source = opts.SourceAddress
	if !b.source.IsValid() {
		if b.source, err = b.host.PrimaryIPv4(); err != nil {
			return nil, err
		}
	}
	if err := host.CheckPortRange(b.source, opts.PortLo, opts.PortHi); err != nil {
		return nil, err
	}
	// Backends answer the source address: the host must answer ARP for
	// it too when it is not one of its addresses.
	added, err := b.host.AddAddress(b.source)
	if err != nil {
		return nil, err
	}
	if added {
		b.log.Info("source address added", "address", b.source.String(), "iface", opts.Iface)
	}
	b.pipe, err = dispatcher.Load(dispatcher.Options{ConntrackSize: opts.ConntrackSize, PortLo: opts.PortLo, PortHi: opts.PortHi})
	if err != nil {
		return nil, err
	}
	err = b.pipe.SetSettings(dispatcher.Settings{
		SourceAddress:    b.source,
		PortLo:           opts.PortLo,
		PortHi:           opts.PortHi,
		ConntrackTimeout: opts.Timeouts,
	})
	if err != nil {
		return nil, err
	}
	if err := b.host.EnableForwarding(); err != nil {
		return nil, err
	}
	return b, nil
}

// Attach attaches prog (nil: the pipeline's own entry, xlb_dispatch) to
// the interface. Calling it after SetServices (and after building an XDP
// chain around the pipeline) puts the whole configuration in place at
// once: no packet meets a half-configured interface.
func (b *Balancer) Attach(prog *ebpf.Program) error {
	if prog == nil {
		prog = b.pipe.Entry()
	}
	att, err := dispatcher.Attach(prog, b.host.Index(), b.opts.XDPMode)
	if err != nil {
		if other := b.host.AttachedXDP(); other != "" && (errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST)) {
			return fmt.Errorf("%w: %s already runs an XDP program that xlbd did not attach (%s); remove it first, for example with `xdp-loader unload %s --all` or `ip link set dev %s xdp off`",
				err, b.opts.Iface, other, b.opts.Iface, b.opts.Iface)
		}
		return err
	}
	b.att = att
	b.log.Info("attached", "iface", b.opts.Iface, "xdp_mode", string(b.opts.XDPMode), "source_address", b.source.String(),
		"source_ports", fmt.Sprintf("%d-%d", b.opts.PortLo, b.opts.PortHi))
	return nil
}

// Pipeline gives access to the loaded pipeline (counters, conntrack).
func (b *Balancer) Pipeline() *dispatcher.Pipeline { return b.pipe }

// Attachment is the interface attachment, for chaining.
func (b *Balancer) Attachment() *dispatcher.Attachment { return b.att }

// SourceAddress is the address used towards backends.
func (b *Balancer) SourceAddress() netip.Addr { return b.source }

// Close detaches, releases the pipeline and undoes the host changes.
func (b *Balancer) Close() error {
	var errs []error
	if b.att != nil {
		errs = append(errs, b.att.Close())
		b.att = nil
	}
	if b.pipe != nil {
		errs = append(errs, b.pipe.Close())
		b.pipe = nil
	}
	if b.host != nil {
		errs = append(errs, b.host.Close())
	}
	b.addedVIPs = nil
	return errors.Join(errs...)
}

// SetServices makes the data path serve exactly these services: it
// prepares the change (PrepareServices) and commits it. If preparing
// fails, nothing changed.
func (b *Balancer) SetServices(ctx context.Context, specs []Service) error {
	p, err := b.PrepareServices(ctx, specs)
	if err != nil {
		return err
	}
	return p.Commit()
}

func (b *Balancer) removeService(vip netip.AddrPort, svc *service) error {
	if err := b.pipe.DeleteService(vip); err != nil {
		return err
	}
	if err := b.pipe.ClearSelection(svc.id); err != nil {
		return err
	}
	for _, bk := range svc.backends {
		b.retire(bk)
	}
	b.svcIDs.free(svc.id)
	delete(b.services, vip)
	b.log.Info("service removed", "vip", vip.String())
	return b.dropVIP(vip.Addr())
}

// dropVIP removes a VIP address xlbd added to the interface once no
// service uses it any more.
func (b *Balancer) dropVIP(a netip.Addr) error {
	i := slices.Index(b.addedVIPs, a)
	if i < 0 {
		return nil
	}
	for other := range b.services {
		if other.Addr() == a {
			return nil
		}
	}
	if _, err := b.host.RemoveAddress(a); err != nil {
		return err
	}
	b.addedVIPs = slices.Delete(b.addedVIPs, i, i+1)
	b.log.Info("vip address removed", "vip", a.String(), "iface", b.opts.Iface)
	return nil
}

func (b *Balancer) retire(bk *backend) {
	_ = b.pipe.SetBackend(bk.id, bk.spec.Address, 0)
	b.retired = append(b.retired, bk.id)
}

func (b *Balancer) state(svc *service) ServiceState {
	st := ServiceState{VIP: svc.spec.VIP, Policy: svc.spec.Policy}
	for _, bk := range svc.backends {
		stats, _ := b.pipe.BackendStats(bk.id)
		st.Backends = append(st.Backends, BackendState{
			Backend: bk.spec, ID: bk.id, Active: stats.Active, NewPerSec: bk.rate,
		})
	}
	return st
}

// selection asks the Selector for a service's table and checks it; it
// changes nothing.
func (b *Balancer) selection(ctx context.Context, svc *service, policy string) (dispatcher.Mode, []uint32, error) {
	st := b.state(svc)
	st.Policy = policy
	return b.selectTable(ctx, st)
}

// selectTable asks the Selector for the table of st and checks it
// against st's backends; it reads no Balancer state.
func (b *Balancer) selectTable(ctx context.Context, st ServiceState) (dispatcher.Mode, []uint32, error) {
	policy := st.Policy
	sel, err := b.opts.Selector.Select(ctx, st)
	if err != nil {
		return 0, nil, fmt.Errorf("select with policy %s: %w", policy, err)
	}
	if len(sel.Table) == 0 {
		return 0, nil, fmt.Errorf("policy %s: empty table", policy)
	}
	ids := make([]uint32, len(sel.Table))
	for i, idx := range sel.Table {
		if idx < 0 || idx >= len(st.Backends) {
			return 0, nil, fmt.Errorf("policy %s: table entry %d names backend %d of %d", policy, i, idx, len(st.Backends))
		}
		if st.Backends[idx].Weight == 0 {
			return 0, nil, fmt.Errorf("policy %s: table entry %d names backend %s of weight 0", policy, i, st.Backends[idx].Address)
		}
		ids[i] = st.Backends[idx].ID
	}
	return sel.Mode, ids, nil
}

// install puts a table in force, unless it is the one already in force.
func (b *Balancer) install(svc *service, mode dispatcher.Mode, ids []uint32) error {
	if mode == svc.mode && slices.Equal(ids, svc.table) {
		return nil
	}
	if err := b.pipe.SetSelection(svc.id, mode, ids); err != nil {
		return err
	}
	svc.mode, svc.table = mode, ids
	return nil
}

func (b *Balancer) installSelection(ctx context.Context, svc *service) error {
	mode, ids, err := b.selection(ctx, svc, svc.spec.Policy)
	if err != nil {
		return err
	}
	return b.install(svc, mode, ids)
}

// SetPolicy switches the policy of one service (vip valid) or of all. The
// new tables are all computed before any is installed; if one fails,
// nothing changes. Established connections keep their backends.
func (b *Balancer) SetPolicy(ctx context.Context, vip netip.AddrPort, policy string) ([]netip.AddrPort, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	type pending struct {
		svc  *service
		mode dispatcher.Mode
		ids  []uint32
	}
	var todo []pending
	for _, svc := range b.services {
		if vip.IsValid() && svc.spec.VIP != vip {
			continue
		}
		mode, ids, err := b.selection(ctx, svc, policy)
		if err != nil {
			return nil, fmt.Errorf("service %s: %w", svc.spec.VIP, err)
		}
		todo = append(todo, pending{svc, mode, ids})
	}
	if len(todo) == 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoService, vip)
	}
	var done []netip.AddrPort
	for _, p := range todo {
		if err := b.install(p.svc, p.mode, p.ids); err != nil {
			return done, fmt.Errorf("service %s: %w", p.svc.spec.VIP, err)
		}
		p.svc.spec.Policy = policy
		done = append(done, p.svc.spec.VIP)
	}
	slices.SortFunc(done, func(x, y netip.AddrPort) int { return x.Compare(y) })
	return done, nil
}

// Policies lists the policies in use.
func (b *Balancer) Policies() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, svc := range b.services {
		if !slices.Contains(out, svc.spec.Policy) {
			out = append(out, svc.spec.Policy)
		}
	}
	slices.Sort(out)
	return out
}

// Refresh recomputes every service's selection from current load, for
// policies that use it.
func (b *Balancer) Refresh(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	for _, svc := range b.services {
		if err := b.installSelection(ctx, svc); err != nil {
			errs = append(errs, fmt.Errorf("service %s: %w", svc.spec.VIP, err))
		}
	}
	return errors.Join(errs...)
}

// Services returns the services with their live backend state.
func (b *Balancer) Services() []ServiceState {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]ServiceState, 0, len(b.services))
	for _, svc := range b.services {
		out = append(out, b.state(svc))
	}
	slices.SortFunc(out, func(x, y ServiceState) int { return x.VIP.Compare(y.VIP) })
	return out
}

// Run sweeps conntrack, keeps backend neighbour entries resolved, samples
// load and frees retired backend ids, until ctx ends.
func (b *Balancer) Run(ctx context.Context) error {
	gc := time.NewTicker(b.opts.GCInterval)
	defer gc.Stop()
	neigh := time.NewTicker(5 * time.Second)
	defer neigh.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-gc.C:
			res, err := b.pipe.GC(b.opts.Timeouts)
			if err != nil {
				b.log.Warn("conntrack sweep", "err", err)
			} else if res.Expired+res.Orphans > 0 {
				b.log.Debug("conntrack sweep", "scanned", res.Scanned, "expired", res.Expired, "orphans", res.Orphans)
			}
			b.sample()
		case <-neigh.C:
			b.mu.Lock()
			for _, svc := range b.services {
				b.ensureNeighbours(svc.spec)
			}
			b.mu.Unlock()
		}
	}
}

// sample updates new-connections-per-second figures and frees retired
// backend ids whose connections have all ended.
func (b *Balancer) sample() {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	for _, svc := range b.services {
		for _, bk := range svc.backends {
			st, err := b.pipe.BackendStats(bk.id)
			if err != nil {
				continue
			}
			if dt := now.Sub(bk.lastAt).Seconds(); dt > 0 {
				bk.rate = float64(st.NewConns-bk.lastNew) / dt
			}
			bk.lastNew, bk.lastAt = st.NewConns, now
		}
	}
	kept := b.retired[:0]
	for _, id := range b.retired {
		if st, err := b.pipe.BackendStats(id); err == nil && st.Active <= 0 {
			b.bkIDs.free(id)
			continue
		}
		kept = append(kept, id)
	}
	b.retired = kept
}

// ensureNeighbours asks the kernel to resolve the next hop of every
// backend that has no valid neighbour entry, so bpf_fib_lookup finds one.
func (b *Balancer) ensureNeighbours(s Service) {
	for _, bk := range s.Backends {
		dst := net.IP(bk.Address.Addr().AsSlice())
		routes, err := netlink.RouteGet(dst)
		if err != nil || len(routes) == 0 {
			b.log.Warn("no route to backend", "backend", bk.Address.String(), "err", err)
			continue
		}
		hop := dst
		if routes[0].Gw != nil {
			hop = routes[0].Gw
		}
		if neighValid(routes[0].LinkIndex, hop) {
			continue
		}
		err = netlink.NeighSet(&netlink.Neigh{
			LinkIndex: routes[0].LinkIndex,
			Family:    netlink.FAMILY_V4,
			IP:        hop,
			State:     netlink.NUD_PERMANENT,
			Flags:     netlink.NTF_USE,
		})
		if err != nil {
			b.log.Warn("resolve backend neighbour", "backend", bk.Address.String(), "next_hop", hop.String(), "err", err)
		}
	}
}

func neighValid(ifindex int, ip net.IP) bool {
	neighs, err := netlink.NeighList(ifindex, netlink.FAMILY_V4)
	if err != nil {
		return false
	}
	const valid = netlink.NUD_REACHABLE | netlink.NUD_STALE | netlink.NUD_DELAY | netlink.NUD_PROBE | netlink.NUD_PERMANENT
	for _, n := range neighs {
		if n.IP.Equal(ip) && n.State&valid != 0 && len(n.HardwareAddr) == 6 {
			return true
		}
	}
	return false
}

type idAllocator struct {
	released []uint32
	next     uint32
	max      uint32
}

func newIDAllocator(max uint32) idAllocator { return idAllocator{max: max} }

func (a *idAllocator) alloc() (uint32, bool) {
	if n := len(a.released); n > 0 {
		id := a.released[n-1]
		a.released = a.released[:n-1]
		return id, true
	}
	if a.next >= a.max {
		return 0, false
	}
	a.next++
	return a.next - 1, true
}

func (a *idAllocator) free(id uint32) { a.released = append(a.released, id) }
