// Package balancer is xlb's control plane as a library: it turns a set of
// services into the data path's map state, attaches the pipeline to an
// interface, has the host prepared for it (VIP and source addresses and
// forwarding through internal/host), keeps the backends' next hops
// resolved (internal/neigh), computes selection tables through a Selector
// and runs the conntrack sweeper. xlbd is a thin layer over it.
package balancer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/health"
	"github.com/xlb-project/xlb/internal/host"
	"github.com/xlb-project/xlb/internal/neigh"
	"github.com/xlb-project/xlb/internal/state"
	"github.com/xlb-project/xlb/internal/vipfilter"
	"github.com/xlb-project/xlb/plugins"
)

// Errors returned by the Balancer.
var (
	ErrVIPInPorts = errors.New("vip port inside the source-port range")
	ErrTooMany    = errors.New("too many services or backends")
	ErrNoService  = errors.New("no such service")
	// ErrUnavailable: a Selector cannot answer for now (see Selector).
	ErrUnavailable = errors.New("selector unavailable")
	// ErrBusy: the services kept changing while a change was computed.
	ErrBusy = errors.New("services changed concurrently, try again")
)

// Options configure a Balancer.
type Options struct {
	Iface   string
	XDPMode dispatcher.XDPMode
	// SourceAddresses are the addresses used towards backends by services
	// that name none of their own, IPv4 and IPv6 ones (a service uses
	// those of its VIP's family). No IPv4 one: the interface's primary
	// IPv4 address. No IPv6 one while IPv6 services are expected (IPv6):
	// the interface's primary global IPv6 address.
	SourceAddresses []netip.Addr
	// OtherSourceAddresses are the further addresses services may name
	// (Service.SourceAddresses): the data path is sized for all of them
	// at start.
	OtherSourceAddresses []netip.Addr
	// IPv6 sizes the IPv6 tables even when no IPv6 source address is
	// given: xlbd sets it when an IPv6 service is configured at start.
	// Without it (and without IPv6 source addresses) an IPv6 service is
	// refused until a restart.
	IPv6 bool
	// PortLo and PortHi are the source-port range; zero means 10000-32767
	// when a source address is one of the host's, 1024-65535 when none is.
	PortLo        uint16
	PortHi        uint16
	ConntrackSize uint32
	Timeouts      dispatcher.Timeouts
	SYN           dispatcher.SYNDefence
	GCInterval    time.Duration
	// HealthConcurrency bounds the health checks in flight; 1 when 0.
	HealthConcurrency int
	Logger            *slog.Logger
	// Selector computes selection tables (xlbd: the policy plugins).
	// Required.
	Selector Selector
	// State, when set, is the pin directory: the data path is pinned
	// there and outlives the process (Release), the host changes are
	// recorded there, and state an earlier run left there
	// (State.Pinned()) is adopted.
	State *state.Dir
	// VIPFilter, when set, keeps the host's own services off the VIPs
	// (internal/vipfilter): the VIP addresses xlbd added and those of
	// services with ExternalVIP.
	VIPFilter *vipfilter.Filter
	// ProbeVIP, when set, checks before a VIP address is added to the
	// interface that no other host answers ARP for it (duplicate address
	// detection); an error refuses the service.
	ProbeVIP func(ctx context.Context, ifindex int, a netip.Addr) error
}

// Backend is a configured backend of a service.
type Backend struct {
	Address netip.AddrPort
	// Weight 0 drains the backend: no new connections.
	Weight uint32
	// Health is the backend's check; the zero Spec (Check "") is none.
	Health health.Spec
	// ResetOnDown ends the backend's established connections when its
	// check takes it down.
	ResetOnDown bool
}

// Service is a configured service.
type Service struct {
	VIP      netip.AddrPort
	Protocol Protocol // TCP (the zero value means TCP) or UDP
	Policy   string
	// SourceAddresses, when set, are the source addresses of the
	// service's connections, among Options.SourceAddresses and
	// Options.OtherSourceAddresses; empty means Options.SourceAddresses.
	SourceAddresses []netip.Addr
	Backends        []Backend
	// ExternalVIP says another owner (keepalived, a routing daemon) adds
	// and removes the VIP address: the Balancer never does (manage-vip:
	// false).
	ExternalVIP bool
	// UseAllWhenDown: when no backend is up, the backends that are down
	// only because their check fails take new connections (else the
	// service refuses them with a RST).
	UseAllWhenDown bool
}

// Protocol is a service's transport protocol.
type Protocol uint8

// The protocols a service may balance.
const (
	TCP Protocol = iota // the zero value
	UDP
)

func (p Protocol) String() string {
	if p == UDP {
		return "udp"
	}
	return "tcp"
}

// number is the protocol's IP protocol number.
func (p Protocol) number() uint8 {
	if p == UDP {
		return dispatcher.UDP
	}
	return dispatcher.TCP
}

// ServiceKey names a service: its VIP and protocol (a TCP and a UDP
// service may share a VIP and port).
type ServiceKey struct {
	VIP      netip.AddrPort
	Protocol Protocol
}

func (k ServiceKey) String() string { return k.VIP.String() + "/" + k.Protocol.String() }

// Compare orders keys by VIP, then protocol.
func (k ServiceKey) Compare(o ServiceKey) int {
	if c := k.VIP.Compare(o.VIP); c != 0 {
		return c
	}
	return int(k.Protocol) - int(o.Protocol)
}

// Key is the service's key.
func (s Service) Key() ServiceKey { return ServiceKey{s.VIP, s.Protocol} }

// Key is the service's key.
func (s ServiceState) Key() ServiceKey { return ServiceKey{s.VIP, s.Protocol} }

// BackendState is a backend as a Selector sees it, with its state and
// live load.
type BackendState struct {
	Backend
	ID uint32 // data-path backend id
	// State: only an up backend may take new connections. A backend whose
	// next hop does not answer (the neighbour keeper) or whose health
	// check fails is down (unless the service uses all its backends);
	// one of weight 0 is draining.
	State plugins.BackendState
	// Reason says why the backend is not up.
	Reason string
	// Since is when State last changed.
	Since time.Time
	// Health is what its check found; Checked is false without a check.
	Health  health.Status
	Checked bool
	// NextHop is the neighbour keeper's view: the next hop, its interface
	// and MAC, or why it is unreachable.
	NextHop   string
	Active    int64  // open connections
	HalfOpen  int64  // connections whose handshake is not complete
	NoPort    uint64 // SYNs refused for want of a free source port
	NewPerSec float64
}

// ServiceState is a service as a Selector sees it.
type ServiceState struct {
	VIP      netip.AddrPort
	Protocol Protocol
	Policy   string
	Backends []BackendState
	// PortPool is how many source ports each backend of the service has:
	// the range on each of the service's source addresses (backends
	// sharing a port way share them).
	PortPool int
	// ExternalVIP: another owner manages the VIP address.
	ExternalVIP bool
	// UsingAll: no backend is up, and the backends whose check fails
	// take new connections (Service.UseAllWhenDown).
	UsingAll bool
}

// Selection is a selection table: a mode and indexes into
// ServiceState.Backends. An empty table means that no backend may take new
// connections: the service then has no table, and its SYNs are answered
// with a RST (counter rst_no_backend).
type Selection struct {
	Mode  dispatcher.Mode
	Table []int
	// Refresh asks for the table to be computed again after this long
	// with fresh load; 0 means only when the service changes (backends,
	// weights, states, policy).
	Refresh time.Duration
}

// Selector turns a service's backends and load into a selection table. It
// is called when a service changes and when its last Selection's Refresh
// has passed, never while the Balancer holds its lock. A Selector error
// that wraps ErrUnavailable is expected to pass (a plugin restarting): it
// is logged at debug level.
type Selector interface {
	Select(ctx context.Context, svc ServiceState) (Selection, error)
}

type service struct {
	id       uint32
	spec     Service
	backends []*backend // in spec order
	mode     dispatcher.Mode
	table    []uint32 // backend ids in force
	none     bool     // no table in force: no backend may take new connections
	// gen counts the changes of spec, backends and their states: a table
	// computed for an older gen is never installed.
	gen       uint64
	stale     bool      // the table must be computed again
	retryAt   time.Time // after a failed computation, not before
	refreshAt time.Time // the Selector's Refresh; zero: only on change
	adopted   bool      // taken from pinned state, not yet reconciled with a configuration
	usingAll  bool      // every backend down, those failing checks used
}

type backend struct {
	id      uint32
	spec    Backend
	state   plugins.BackendState // the state the table in force was computed with
	since   time.Time            // when state last changed
	lastNew uint64
	lastAt  time.Time
	rate    float64
	noPort  uint64    // refusals already reported
	warnAt  time.Time // when they were last reported
}

// noPortWarnEvery is how often, at most, the refusals of SYNs for want of
// a free source port are logged per backend.
const noPortWarnEvery = 10 * time.Second

// Balancer owns the pipeline, its attachment and the host changes made
// for it.
type Balancer struct {
	opts    Options
	log     *slog.Logger
	pipe    *dispatcher.Pipeline
	att     *dispatcher.Attachment
	host    *host.Iface
	fam     [2]sourceFamily // IPv4, IPv6
	neigh   *neigh.Keeper
	checker *health.Checker
	kick    chan struct{}                           // asks the refresher for a round now
	vips    atomic.Pointer[map[netip.Addr][]uint16] // VIP ports by address, for the checker

	// mu guards the fields below. It is never held across a Selector call.
	mu        sync.Mutex
	services  map[ServiceKey]*service
	svcIDs    idAllocator
	bkIDs     idAllocator
	retired   []retiredBackend // removed backends waiting for their connections to end
	resets    []reset          // backends whose connections to end, outside the lock
	addedVIPs []netip.Addr     // VIPs the host did not have, added for their services
	svcGen    uint64           // counts committed service changes
	adopted   *Adoption        // what New adopted; nil for a fresh start

	filterMu sync.Mutex // serialises VIP filter updates (never held with mu)
}

// Adoption says what New took over from an earlier run's pinned state.
type Adoption struct {
	Services    int // services in the pinned maps
	Backends    int // backend ids in use, retired ones included
	Retired     int // backend ids whose service or backend is gone, waiting for their connections to end
	Connections int // open connections (half-open ones included), as their backends count them
	Addresses   int // addresses the earlier run added to the interface
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
		services: make(map[ServiceKey]*service),
		svcIDs:   newIDAllocator(uint32(dispatcher.MaxServices)),
		bkIDs:    newIDAllocator(uint32(dispatcher.MaxBackends)),
		kick:     make(chan struct{}, 1),
	}
	defer func() {
		if err != nil {
			b.closeFailed()
		}
	}()
	if b.neigh, err = neigh.New(neigh.Options{Logger: opts.Logger, OnChange: b.syncStates}); err != nil {
		return nil, err
	}
	if b.host, err = host.Open(opts.Iface); err != nil {
		return nil, err
	}
	var pinned *dispatcher.Pinned
	if st := opts.State; st != nil {
		pinned = st.Pinned()
		if pinned != nil {
			if err := b.checkPinned(pinned); err != nil {
				return nil, err
			}
			found := st.Found()
			if err := b.host.Adopt(found.Addresses, found.Forwarding); err != nil {
				return nil, err
			}
			if found.Filter && opts.VIPFilter != nil {
				opts.VIPFilter.Adopt()
			}
		}
		b.host.SetRecorder(st)
		if err := st.SetIface(b.host.Index()); err != nil {
			return nil, err
		}
	}
	if err := b.prepareSources(); err != nil {
		return nil, err
	}
	if pinned != nil {
		if err := b.samePinnedSizes(pinned); err != nil {
			return nil, err
		}
	}
	if err := b.addSources(); err != nil {
		return nil, err
	}
	b.checker = health.New(health.Options{Concurrency: opts.HealthConcurrency, Reserved: b.reserved, Logger: opts.Logger,
		OnChange: b.syncStates})
	lopts := dispatcher.Options{ConntrackSize: opts.ConntrackSize, PortLo: b.opts.PortLo, PortHi: b.opts.PortHi,
		Sources: len(b.fam[0].sources), Sources6: len(b.fam[1].sources)}
	if opts.State != nil {
		lopts.PinPath, lopts.Adopt = opts.State.Path(), pinned != nil
	}
	loading := time.Now()
	b.pipe, err = dispatcher.Load(lopts)
	if err != nil {
		return nil, err
	}
	b.log.Debug("pipeline loaded", "adopted", b.pipe.Adopted(), "took", time.Since(loading).String())
	err = b.pipe.SetSettings(dispatcher.Settings{
		SourceAddresses:  b.fam[0].sources,
		SourceAddresses6: b.fam[1].sources,
		PortLo:           b.opts.PortLo,
		PortHi:           b.opts.PortHi,
		ConntrackTimeout: opts.Timeouts,
		SYN:              opts.SYN,
	})
	if err != nil {
		return nil, err
	}
	if b.pipe.Adopted() {
		if err := b.adopt(); err != nil {
			return nil, err
		}
	}
	if err := b.host.EnableForwarding(true, len(b.fam[1].sources) > 0); err != nil {
		return nil, err
	}
	// VLAN-tagged frames must keep their tag where XDP sees it, so the
	// data path passes them rather than balancing them without it.
	off, err := b.host.KeepVLANTags()
	if errors.Is(err, host.ErrVLANOffloadFixed) {
		b.log.Warn("vlan-tagged frames reach xdp without their tag and would be balanced", "iface", opts.Iface, "error", err.Error())
	} else if err != nil {
		return nil, err
	}
	if len(off) > 0 {
		b.log.Info("vlan receive offload turned off", "iface", opts.Iface, "offloads", strings.Join(off, ","))
	}
	return b, nil
}

// sourceFamily is one family's source addresses.
type sourceFamily struct {
	sources  []netip.Addr // by data-path index (Settings.SourceAddresses or SourceAddresses6)
	defaults []int        // indexes of those among Options.SourceAddresses
}

// family is the index into Balancer.fam of a's family.
func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// familyName names a fam index for messages.
func familyName(fam int) string { return [2]string{"IPv4", "IPv6"}[fam] }

// prepareSources settles the source addresses and the port range: the
// interface's primary address of a family when none of it is configured
// (for IPv6 only when IPv6 services are expected); the default range by
// whether any is the host's; no overlap between the range and the
// kernel's ephemeral ports on an address of the host's. It changes
// nothing: addSources adds the addresses that are not the host's.
func (b *Balancer) prepareSources() error {
	for _, a := range b.opts.SourceAddresses {
		f := &b.fam[family(a)]
		if !slices.Contains(f.sources, a) {
			f.defaults = append(f.defaults, len(f.sources))
			f.sources = append(f.sources, a)
		}
	}
	for _, a := range b.opts.OtherSourceAddresses {
		if f := &b.fam[family(a)]; !slices.Contains(f.sources, a) {
			f.sources = append(f.sources, a)
		}
	}
	if len(b.fam[0].defaults) == 0 {
		a, err := b.host.PrimaryIPv4()
		if err != nil {
			return err
		}
		b.fam[0].defaults = []int{len(b.fam[0].sources)}
		b.fam[0].sources = append(b.fam[0].sources, a)
	}
	if len(b.fam[1].defaults) == 0 && (b.opts.IPv6 || len(b.fam[1].sources) > 0) {
		a, err := b.host.PrimaryIPv6()
		if err != nil {
			return fmt.Errorf("ipv6 services without an ipv6 source address use the interface's: %w", err)
		}
		b.fam[1].defaults = []int{len(b.fam[1].sources)}
		b.fam[1].sources = append(b.fam[1].sources, a)
	}
	all := b.SourceAddresses()
	for fam, f := range b.fam {
		if len(f.sources) > dispatcher.MaxSources {
			return fmt.Errorf("%d %s source addresses: at most %d", len(f.sources), familyName(fam), dispatcher.MaxSources)
		}
	}
	local := make([]bool, len(all))
	anyLocal := false
	for i, a := range all {
		var err error
		if local[i], err = host.IsLocal(a); err != nil {
			return err
		}
		// An address an earlier run added is not the host's.
		local[i] = local[i] && !b.host.Owns(a)
		anyLocal = anyLocal || local[i]
	}
	if b.opts.PortLo == 0 && b.opts.PortHi == 0 {
		b.opts.PortLo, b.opts.PortHi = 1024, 65535
		if anyLocal {
			b.opts.PortLo, b.opts.PortHi = 10000, 32767
		}
	}
	for i, a := range all {
		if local[i] {
			if err := host.CheckPortRange(a, b.opts.PortLo, b.opts.PortHi); err != nil {
				return err
			}
		}
	}
	return nil
}

// addSources adds the source addresses that are not the host's to the
// interface (backends' replies must reach them: ARP, neighbour discovery).
func (b *Balancer) addSources() error {
	for _, a := range b.SourceAddresses() {
		added, err := b.host.AddAddress(a)
		if err != nil {
			return err
		}
		if added {
			b.log.Info("source address added", "address", a.String(), "iface", b.opts.Iface)
		}
	}
	return nil
}

// sourceIndexes returns the data-path indexes of a service's source
// addresses, in its VIP's family: its own, or the defaults.
func (b *Balancer) sourceIndexes(s Service) ([]int, error) {
	fam := family(s.VIP.Addr())
	f := b.fam[fam]
	if len(f.sources) == 0 {
		return nil, fmt.Errorf("service %s: xlbd started without IPv6 services or source addresses, so its IPv6 tables are not sized (an IPv6 service needs a restart)", s.Key())
	}
	if len(s.SourceAddresses) == 0 {
		return f.defaults, nil
	}
	var out []int
	for _, a := range s.SourceAddresses {
		i := slices.Index(f.sources, a)
		switch {
		case family(a) != fam:
			return nil, fmt.Errorf("service %s: source address %s is not %s", s.Key(), a, familyName(fam))
		case i < 0:
			return nil, fmt.Errorf("service %s: source address %s was not configured when xlbd started (a new source address needs a restart)", s.Key(), a)
		}
		out = append(out, i)
	}
	return out, nil
}

// onSource reports whether a VIP lies on a source address inside the
// source-port range, where replies are expected: its packets would be
// taken for replies.
func (b *Balancer) onSource(vip netip.AddrPort) bool {
	return slices.Contains(b.fam[family(vip.Addr())].sources, vip.Addr()) && vip.Port() >= b.opts.PortLo && vip.Port() <= b.opts.PortHi
}

// Attach attaches prog (nil: the pipeline's own entry, xlb_dispatch) to
// the interface. Calling it after SetServices (and after building an XDP
// chain around the pipeline) puts the whole configuration in place at
// once: no packet meets a half-configured interface.
func (b *Balancer) Attach(prog *ebpf.Program) error {
	if prog == nil {
		prog = b.pipe.Entry()
	}
	att, err := b.pipe.Attach(prog, b.host.Index(), b.opts.XDPMode)
	if err != nil {
		if other := b.host.AttachedXDP(); other != "" && (errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST)) {
			return fmt.Errorf("%w: %s already runs an XDP program that xlbd did not attach (%s); remove it first, for example with `xdp-loader unload %s --all` or `ip link set dev %s xdp off`",
				err, b.opts.Iface, other, b.opts.Iface, b.opts.Iface)
		}
		return err
	}
	b.att = att
	b.log.Info("attached", "iface", b.opts.Iface, "xdp_mode", string(b.opts.XDPMode), "source_addresses", fmt.Sprint(b.SourceAddresses()),
		"source_ports", fmt.Sprintf("%d-%d", b.opts.PortLo, b.opts.PortHi))
	return nil
}

// Pipeline gives access to the loaded pipeline (counters, conntrack).
func (b *Balancer) Pipeline() *dispatcher.Pipeline { return b.pipe }

// Attachment is the interface attachment, for chaining.
func (b *Balancer) Attachment() *dispatcher.Attachment { return b.att }

// SourceAddresses are the addresses used towards backends: the IPv4
// ones, then the IPv6 ones.
func (b *Balancer) SourceAddresses() []netip.Addr {
	return slices.Concat(b.fam[0].sources, b.fam[1].sources)
}

// SourcePorts is the source-port range in force.
func (b *Balancer) SourcePorts() (lo, hi uint16) { return b.opts.PortLo, b.opts.PortHi }

// portPool is the number of source ports a backend of a service has: the
// whole range on each of the service's source addresses, unless it shares
// its port way with another backend.
func (b *Balancer) portPool(s Service) int {
	n := len(s.SourceAddresses)
	if n == 0 {
		n = len(b.fam[family(s.VIP.Addr())].defaults)
	}
	return n * b.pipe.PortPool()
}

// Close stops the data path and undoes everything: it detaches (removing
// the link's pin), removes the pipeline's pins, releases the pipeline,
// removes the VIP filter and undoes the host changes.
func (b *Balancer) Close() error {
	var errs []error
	if b.checker != nil {
		errs = append(errs, b.checker.Close())
	}
	if b.att != nil {
		errs = append(errs, b.att.Close())
		b.att = nil
	}
	if b.pipe != nil {
		errs = append(errs, b.pipe.Unpin(), b.pipe.Close())
		b.pipe = nil
	}
	if f := b.opts.VIPFilter; f != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		errs = append(errs, f.Remove(ctx))
		cancel()
		if b.opts.State != nil {
			errs = append(errs, b.opts.State.FilterInstalled(false))
		}
	}
	if b.host != nil {
		errs = append(errs, b.host.Close())
	}
	if b.neigh != nil {
		errs = append(errs, b.neigh.Close())
	}
	b.addedVIPs = nil
	return errors.Join(errs...)
}

// Release lets the Balancer go and leaves the data path running: the
// pinned link keeps the programs attached with their maps, the addresses,
// forwarding and the VIP filter stay, all recorded in the pin directory
// for the next xlbd to adopt. Without a pin directory it is Close.
func (b *Balancer) Release() error {
	if b.opts.State == nil {
		return b.Close()
	}
	var errs []error
	if b.att != nil {
		errs = append(errs, b.att.Release())
		b.att = nil
	}
	if b.pipe != nil {
		errs = append(errs, b.pipe.Close())
		b.pipe = nil
	}
	if b.neigh != nil {
		errs = append(errs, b.neigh.Close())
	}
	return errors.Join(errs...)
}

// closeFailed cleans up after New failed: an adopted data path is left
// running as it was found (Release); a fresh one is undone (Close).
func (b *Balancer) closeFailed() {
	if b.pipe != nil && b.pipe.Adopted() || b.opts.State != nil && b.opts.State.Pinned() != nil {
		b.Release()
		return
	}
	b.Close()
}

// Adopted says what New took over from an earlier run, or nil.
func (b *Balancer) Adopted() *Adoption {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.adopted
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

func (b *Balancer) removeService(key ServiceKey, svc *service) error {
	vip := key.VIP
	if err := b.pipe.DeleteService(vip, key.Protocol.number()); err != nil {
		return err
	}
	if err := b.pipe.ClearSelection(svc.id); err != nil {
		return err
	}
	for _, bk := range svc.backends {
		b.retire(key, bk)
	}
	b.svcIDs.free(svc.id)
	delete(b.services, key)
	b.log.Info("service removed", "vip", vip.String(), "protocol", key.Protocol.String())
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
		if other.VIP.Addr() == a {
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

// retire stops new connections to a backend that goes and keeps its id
// (and its place in status) until its connections have ended. Caller
// holds b.mu.
func (b *Balancer) retire(key ServiceKey, bk *backend) {
	_ = b.pipe.SetBackend(bk.id, bk.spec.Address, 0)
	b.retired = append(b.retired, retiredBackend{id: bk.id, svc: key, spec: bk.spec, since: time.Now()})
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

// Services returns the services with their live backend state.
func (b *Balancer) Services() []ServiceState {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]ServiceState, 0, len(b.services))
	for _, svc := range b.services {
		out = append(out, b.state(svc))
	}
	slices.SortFunc(out, func(x, y ServiceState) int { return x.Key().Compare(y.Key()) })
	return out
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
			if st.NoPort > bk.noPort && now.Sub(bk.warnAt) >= noPortWarnEvery {
				b.log.Warn("source ports exhausted: SYNs refused with a RST", "vip", svc.spec.VIP.String(),
					"backend", bk.spec.Address.String(), "refused", st.NoPort-bk.noPort,
					"hint", "add source-addresses, widen source-ports or shorten conntrack.timeouts.time-wait")
				bk.noPort, bk.warnAt = st.NoPort, now
			}
		}
	}
	kept := b.retired[:0]
	for _, r := range b.retired {
		if st, err := b.pipe.BackendStats(r.id); err == nil && st.Active <= 0 {
			if err := b.pipe.FreeBackend(r.id); err != nil {
				b.log.Warn("free backend id", "id", r.id, "err", err)
			}
			b.bkIDs.free(r.id)
			b.log.Info("removed backend has no connection left: forgotten", "vip", r.svc.VIP.String(), "backend", r.spec.Address.String())
			continue
		}
		kept = append(kept, r)
	}
	b.retired = kept
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

// reserve marks id as in use (an id an adopted state uses).
func (a *idAllocator) reserve(id uint32) {
	if id >= a.max {
		return
	}
	if id >= a.next {
		for i := a.next; i < id; i++ {
			a.released = append(a.released, i)
		}
		a.next = id + 1
		return
	}
	a.released = slices.DeleteFunc(a.released, func(x uint32) bool { return x == id })
}
