package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/chain"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/health"
	"github.com/xlb-project/xlb/internal/live"
	"github.com/xlb-project/xlb/internal/metrics"
	"github.com/xlb-project/xlb/internal/neigh"
	"github.com/xlb-project/xlb/internal/policy"
	"github.com/xlb-project/xlb/internal/preflight"
	"github.com/xlb-project/xlb/internal/sdnotify"
	"github.com/xlb-project/xlb/internal/state"
	"github.com/xlb-project/xlb/internal/vipfilter"
)

// daemon ties the configuration, the balancer and the control socket.
type daemon struct {
	controlpb.UnimplementedControlServer

	cfg      *config.Config // as xlbd started: the keys a reload does not change
	args     []string
	log      *slog.Logger
	pins     *state.Dir
	filter   *vipfilter.Filter // nil with vip-filter: false
	bal      *balancer.Balancer
	pol      *policy.Manager
	chain    *chain.Chain
	metrics  *metrics.Metrics
	metricsL net.Listener       // nil when metrics-address is not set
	notify   *sdnotify.Notifier // systemd's Type=notify; nil sends nothing
	stop     chan bool          // a shutdown asked over the socket: true keeps the data path
	gid      int                // socket-group's; -1: root only
	// started is when the daemon began to start, for the ready log.
	started time.Time

	// changing serialises reloads and live changes; state is what they
	// put in force.
	changing sync.Mutex
	state    atomic.Pointer[inForce]

	lastMu     sync.Mutex
	lastReload *controlpb.ReloadOutcome
}

// inForce is the configuration in force: the file's (with flags and
// environment) and the live changes over it.
type inForce struct {
	file *config.Config // the file's, with the keys a reload does not change as xlbd started
	live *live.Changes
	cfg  *config.Config // file with live applied
}

func newDaemon(ctx context.Context, cfg *config.Config, args []string, log *slog.Logger) (_ *daemon, err error) {
	d := &daemon{cfg: cfg, args: args, log: log, stop: make(chan bool, 1), started: time.Now()}
	d.state.Store(&inForce{file: cfg, live: new(live.Changes), cfg: cfg})
	if err := checkChain(cfg); err != nil {
		return nil, configError{err}
	}
	if err := chain.CheckPinPath(cfg.PinPath); err != nil {
		return nil, configError{fmt.Errorf("pin-path: %w", err)}
	}
	if err := preflight.Check(cfg); err != nil {
		return nil, configError{err}
	}
	if d.gid, err = preflight.SocketGroup(cfg.SocketGroup); err != nil {
		return nil, configError{fmt.Errorf("socket-group: %w", err)}
	}
	d.metrics = metrics.New(d)
	if cfg.MetricsAddress != "" {
		if d.metricsL, err = metrics.Listen(cfg.MetricsAddress); err != nil {
			return nil, configError{fmt.Errorf("metrics-address: %w", err)}
		}
	}
	if d.pol, err = newPolicies(cfg, d); err != nil {
		d.closeMetrics()
		return nil, configError{err}
	}
	if err := startPolicies(ctx, d.pol, cfg.Services); err != nil {
		d.pol.Close()
		d.closeMetrics()
		return nil, configError{err}
	}
	if _, err := net.InterfaceByName(cfg.Iface); err != nil {
		d.pol.Close()
		return nil, fmt.Errorf("find interface %s: %w", cfg.Iface, err)
	}
	if d.pins, err = state.Open(ctx, cfg.PinPath, state.Options{Fresh: cfg.FreshState, Logger: log}); err != nil {
		d.pol.Close()
		return nil, err
	}
	log.Debug("pin directory opened", "pin_path", cfg.PinPath, "adopt", d.pins.Pinned() != nil, "took", time.Since(d.started).String())
	if cfg.VIPFilter {
		d.filter = vipfilter.New(cfg.Iface)
	}
	d.bal, err = balancer.New(balancer.Options{
		Iface:                cfg.Iface,
		XDPMode:              dispatcher.XDPMode(cfg.XDPMode),
		SourceAddresses:      cfg.SourceAddresses.Addrs(),
		OtherSourceAddresses: cfg.AllSourceAddresses(),
		IPv6:                 cfg.HasIPv6(),
		PortLo:               cfg.SourcePorts.Lo,
		PortHi:               cfg.SourcePorts.Hi,
		ConntrackSize:        uint32(cfg.Conntrack.MaxEntries),
		Timeouts:             timeouts(cfg.Conntrack.Timeouts),
		SYN:                  synDefence(cfg.SYNDefence),
		GCInterval:           cfg.Conntrack.GCInterval,
		HealthConcurrency:    cfg.HealthConcurrency,
		Logger:               log,
		Selector:             d.pol,
		State:                d.pins,
		VIPFilter:            d.filter,
		ProbeVIP:             neigh.Probe,
	})
	if err != nil {
		d.pol.Close()
		d.closeMetrics()
		if d.pins.Pinned() == nil {
			d.pins.Remove()
		}
		d.pins.Close()
		return nil, err
	}
	defer func() {
		if err != nil {
			d.closeFailed()
		}
	}()
	// The chain and the services are ready before anything is attached
	// (or, when a pinned link is taken over, swapped in), so the interface
	// goes from no program, or the earlier run's, to the whole
	// configuration in one step (a filter in front of xlb is never
	// missing).
	if d.chain, err = chain.New(chainOptions(cfg, d), chainSpecs(cfg)); err != nil {
		return nil, err
	}
	if err := d.bal.SetServices(ctx, services(cfg)); err != nil {
		return nil, err
	}
	if err := d.bal.Attach(d.chain.Entry()); err != nil {
		return nil, err
	}
	d.chain.Attached(d.bal.Attachment())
	return d, nil
}

func (d *daemon) closeMetrics() {
	if d.metricsL != nil {
		d.metricsL.Close()
	}
}

// Close stops and undoes everything: the data path (link, programs, maps
// and their pins), the chain members' pins, the VIP filter, the host
// changes, the pin directory and the policy plugins.
func (d *daemon) Close() error {
	d.closeMetrics()
	err := d.bal.Close()
	d.pol.Close()
	if cerr := d.chain.Close(); err == nil {
		err = cerr
	}
	if rerr := d.pins.Remove(); err == nil {
		err = rerr
	}
	return err
}

// Release stops the daemon and leaves the data path running with the
// tables in force, pinned for the next xlbd: the link, the maps, the
// chain members' maps, the host changes and the VIP filter stay. The
// policy plugins stop.
func (d *daemon) Release() error {
	err := d.bal.Release()
	d.pol.Close()
	if cerr := d.chain.Release(); err == nil {
		err = cerr
	}
	d.pins.Close()
	return err
}

// closeFailed cleans up after a start that failed: state that was adopted
// is left running as it was found; a fresh start is undone.
func (d *daemon) closeFailed() {
	if d.pins.Pinned() != nil {
		d.log.Warn("start failed: the adopted data path is left running as it was found")
		d.Release()
		return
	}
	d.Close()
}

// Run serves until ctx ends or a shutdown is asked for; a signal on hup
// reloads the configuration. It reports whether the data path is to be
// kept: a signal on keep or `xlbctl shutdown --keep-datapath`.
func (d *daemon) Run(ctx context.Context, hup, keep <-chan os.Signal) (keepDatapath bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var kept atomic.Bool
	go func() {
		select {
		case <-ctx.Done():
		case <-keep:
			kept.Store(true)
			cancel()
		case k := <-d.stop:
			kept.Store(k)
			cancel()
		}
	}()
	err = d.run(ctx, hup)
	cancel()
	return kept.Load(), err
}

func (d *daemon) run(ctx context.Context, hup <-chan os.Signal) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return d.bal.Run(ctx) })
	g.Go(func() error { return d.pol.Watch(ctx, 200*time.Millisecond, d.bal.Invalidate) })
	sock, err := control.Listen(d.cfg.Socket, d.gid)
	if err != nil {
		return err
	}
	g.Go(func() error { return control.Serve(ctx, sock, d) })
	if d.metricsL != nil {
		g.Go(func() error { return d.metrics.Serve(ctx, d.metricsL) })
	}
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-hup:
				d.notifyErr(d.notify.Reloading())
				if _, err := d.reloadAndLog(ctx); err != nil {
					msg, _, _ := strings.Cut(err.Error(), "\n")
					d.notifyErr(d.notify.Ready("last reload failed: " + msg))
				} else {
					d.notifyErr(d.notify.Ready(d.statusLine()))
				}
			}
		}
	})
	g.Go(func() error {
		<-ctx.Done()
		d.notifyErr(d.notify.Stopping())
		return nil
	})
	start := "fresh"
	if d.bal.Adopted() != nil {
		start = "adopted"
	}
	d.log.Info("ready", "iface", d.cfg.Iface, "services", len(d.cfg.Services), "socket", d.cfg.Socket, "socket_group", d.cfg.SocketGroup,
		"metrics_address", d.cfg.MetricsAddress, "pin_path", d.cfg.PinPath, "state", start, "took", time.Since(d.started).Round(time.Millisecond).String())
	d.notifyErr(d.notify.Ready(d.statusLine()))
	return g.Wait()
}

// reloadResult says what a reload put in force.
type reloadResult struct {
	Services int      // services in force
	Chain    []string // the chain's changes
	Dropped  []string // live changes the file overrode
	Took     time.Duration
}

// errPartlyApplied marks a reload that failed while switching (a kernel
// map update failed): part of the new configuration is in force.
var errPartlyApplied = errors.New("reload partly applied")

// statusLine is the line `systemctl status` shows.
func (d *daemon) statusLine() string {
	return fmt.Sprintf("serving %d services on %s", len(d.state.Load().cfg.Services), d.cfg.Iface)
}

func (d *daemon) notifyErr(err error) {
	if err != nil {
		d.log.Warn("notify systemd", "err", err)
	}
}

// reload re-reads the configuration from the same arguments and puts its
// services, their policies and the chain in force, with the live changes
// whose items the file does not change (live.Changes.Rebase), as one
// transaction (apply). Settings that need a restart are reported, not
// applied. Reloads and live changes run one at a time.
func (d *daemon) reload(ctx context.Context) (res reloadResult, err error) {
	d.changing.Lock()
	defer d.changing.Unlock()
	start := time.Now()
	parsed, err := config.Parse(d.args)
	if err != nil {
		return res, err
	}
	if parsed.Iface != d.cfg.Iface || parsed.XDPMode != d.cfg.XDPMode || !slices.Equal(parsed.AllSourceAddresses(), d.cfg.AllSourceAddresses()) ||
		!slices.Equal(parsed.SourceAddresses.Addrs(), d.cfg.SourceAddresses.Addrs()) ||
		parsed.SourcePorts != d.cfg.SourcePorts || parsed.Conntrack.MaxEntries != d.cfg.Conntrack.MaxEntries {
		d.log.Warn("reload: iface, xdp-mode, the set of source addresses, source-ports and conntrack.max-entries need a restart; kept")
	}
	file := d.reloadable(parsed)
	ch := d.state.Load().live.Clone()
	dropped := ch.Rebase(file)
	cfg := ch.Apply(file)
	if err := cfg.Validate(); err != nil {
		return res, fmt.Errorf("the new file with the live changes kept (%s): %w", strings.Join(ch.List(), "; "), err)
	}
	summary, err := d.apply(ctx, cfg)
	if err != nil {
		return res, err
	}
	d.state.Store(&inForce{file: file, live: ch, cfg: cfg})
	for _, line := range dropped {
		d.log.Warn("reload: live change dropped, the file changes the same item", "change", line)
	}
	return reloadResult{Services: len(cfg.Services), Chain: summary, Dropped: dropped, Took: time.Since(start)}, nil
}

// reloadable is parsed with only what a reload changes taken from it:
// the services, the chain, xlb-priority and the default policy; every
// other key stays as xlbd started.
func (d *daemon) reloadable(parsed *config.Config) *config.Config {
	out := *d.cfg
	out.Services, out.Chain, out.XLBPriority, out.DefaultPolicy = parsed.Services, parsed.Chain, parsed.XLBPriority, parsed.DefaultPolicy
	return &out
}

// apply puts cfg's services, their policies and the chain in force as one
// transaction: first everything that can fail is prepared (the host checked,
// chain members loaded and the new chain verified, policy plugins started
// and every selection table computed, health checks of new backends run
// once, VIP addresses added), then it is switched in. If preparing fails,
// the running services, backends, policies and chain are exactly the old
// ones. It returns the chain's changes. Caller holds d.changing.
func (d *daemon) apply(ctx context.Context, cfg *config.Config) ([]string, error) {
	if err := preflight.Check(cfg); err != nil {
		return nil, err
	}
	if err := checkPolicies(d.pol, cfg.Services); err != nil {
		return nil, err
	}
	if err := checkChain(cfg); err != nil {
		return nil, err
	}
	cp, err := d.chain.Prepare(chainSpecs(cfg), cfg.XLBPriority)
	if err != nil {
		return nil, fmt.Errorf("prepare chain: %w", err)
	}
	sp, err := d.bal.PrepareServices(ctx, services(cfg))
	if err != nil {
		cp.Abort()
		d.pol.Prune(d.bal.Policies()) // stop plugins started for nothing
		return nil, fmt.Errorf("prepare services: %w", err)
	}
	// Switch: the chain first (its link update is the step that can still
	// fail without anything changed), then the services' maps.
	if err := cp.Commit(); err != nil && !errors.Is(err, chain.ErrUnpinned) {
		sp.Abort()
		d.pol.Prune(d.bal.Policies())
		return nil, fmt.Errorf("switch chain: %w", err)
	} else if err != nil {
		d.log.Error("chain in force, pins missing", "err", err)
	}
	err = sp.Commit()
	d.pol.Prune(d.bal.Policies())
	if err != nil {
		return nil, fmt.Errorf("%w: chain switched, services: %w", errPartlyApplied, err)
	}
	return cp.Summary, nil
}

// reloadAndLog reloads and logs the outcome: ERROR with what failed, or
// INFO "reloaded".
func (d *daemon) reloadAndLog(ctx context.Context) (reloadResult, error) {
	at := time.Now()
	res, err := d.reload(ctx)
	last := &controlpb.ReloadOutcome{At: timestamppb.New(at), Ok: err == nil}
	if err != nil {
		last.Error = err.Error()
	} else {
		last.Took = durationpb.New(res.Took)
	}
	d.lastMu.Lock()
	d.lastReload = last
	d.lastMu.Unlock()
	switch {
	case errors.Is(err, errPartlyApplied):
		d.log.Error("reload failed while switching, configuration partly applied", "err", err)
	case err != nil:
		d.log.Error("reload refused, configuration unchanged", "err", err)
	default:
		d.log.Info("reloaded", "services", res.Services, "chain_changes", res.Chain, "live_changes_dropped", len(res.Dropped),
			"took", res.Took.String())
	}
	return res, err
}

func timeouts(t config.Timeouts) dispatcher.Timeouts {
	return dispatcher.Timeouts{SYN: t.SYN, Established: t.Established, FIN: t.FIN, Closed: t.Closed, UDP: t.UDP, TimeWait: t.TimeWait}
}

func synDefence(s config.SYNDefence) dispatcher.SYNDefence {
	mode := map[string]dispatcher.SYNMode{"off": dispatcher.SYNOff, "auto": dispatcher.SYNAuto, "on": dispatcher.SYNOn}[s.Mode]
	return dispatcher.SYNDefence{Mode: mode, HalfOpen: uint32(s.HalfOpen), TrustFor: s.TrustFor}
}

func services(cfg *config.Config) []balancer.Service {
	out := make([]balancer.Service, 0, len(cfg.Services))
	for _, s := range cfg.Services {
		bs := make([]balancer.Backend, 0, len(s.Backends))
		for j, b := range s.Backends {
			bk := balancer.Backend{Address: b.Address, Weight: b.Weight}
			if h := s.BackendHealth(j); h.Check != config.HealthNone {
				bk.Health = healthSpec(h)
				bk.ResetOnDown = *h.ResetEstablished
			}
			bs = append(bs, bk)
		}
		proto := balancer.TCP
		if s.Protocol == "udp" {
			proto = balancer.UDP
		}
		out = append(out, balancer.Service{VIP: s.VIP, Protocol: proto, Policy: s.Policy, Backends: bs, SourceAddresses: s.SourceAddresses.Addrs(),
			ExternalVIP: !cfg.ManagesVIP(s), UseAllWhenDown: s.AllDown == config.AllDownUseAll})
	}
	return out
}

// healthSpec is a resolved health check as the checker runs it.
func healthSpec(h config.Health) health.Spec {
	return health.Spec{Check: h.Check, Interval: h.Interval, Timeout: h.Timeout, Rise: h.Rise, Fall: h.Fall, Path: h.HTTP.Path,
		Host: h.HTTP.Host, ExpectStatus: h.HTTP.ExpectStatus}
}

// stateStatus is the state line of the status.
func (d *daemon) stateStatus() *controlpb.PinnedState {
	st := &controlpb.PinnedState{PinPath: d.pins.Path()}
	if l, err := dispatcher.BuildLayout(); err == nil {
		st.Layout = l.Version()
	}
	if a := d.bal.Adopted(); a != nil {
		st.Adopted = &controlpb.Adopted{Services: uint32(a.Services), BackendIds: uint32(a.Backends), Retired: uint32(a.Retired),
			Connections: uint64(a.Connections), Addresses: uint32(a.Addresses)}
	}
	if d.filter != nil {
		st.VipFilter = "nftables table inet " + d.filter.Name()
		for _, a := range d.filter.Addrs() {
			st.VipFilterAddresses = append(st.VipFilterAddresses, a.String())
		}
	}
	return st
}

// Shutdown implements controlpb.ControlServer.
func (d *daemon) Shutdown(ctx context.Context, req *controlpb.ShutdownRequest) (*controlpb.ShutdownResponse, error) {
	select {
	case d.stop <- req.GetKeepDatapath():
		if req.GetKeepDatapath() {
			d.log.Info("shutdown asked: stopping, the data path keeps running", peerAttrs(ctx)...)
		} else {
			d.log.Info("shutdown asked: stopping and removing everything", peerAttrs(ctx)...)
		}
	default: // one is under way
	}
	return &controlpb.ShutdownResponse{}, nil
}
