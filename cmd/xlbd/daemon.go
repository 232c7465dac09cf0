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

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/chain"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
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
	cfg      *config.Config
	args     []string
	log      *slog.Logger
	state    *state.Dir
	filter   *vipfilter.Filter // nil with vip-filter: false
	bal      *balancer.Balancer
	pol      *policy.Manager
	chain    *chain.Chain
	metrics  *metrics.Metrics
	metricsL net.Listener       // nil when metrics-address is not set
	notify   *sdnotify.Notifier // systemd's Type=notify; nil sends nothing
	stop     chan bool          // a shutdown asked over the socket: true keeps the data path
	// started is when the daemon began to start, for the ready log.
	started time.Time

	reloading sync.Mutex // serialises reloads (and only them)

	lastMu     sync.Mutex
	lastReload *control.ReloadStatus
}

func newDaemon(ctx context.Context, cfg *config.Config, args []string, log *slog.Logger) (_ *daemon, err error) {
	d := &daemon{cfg: cfg, args: args, log: log, stop: make(chan bool, 1), started: time.Now()}
	if err := checkChain(cfg); err != nil {
		return nil, configError{err}
	}
	if err := chain.CheckPinPath(cfg.PinPath); err != nil {
		return nil, configError{fmt.Errorf("pin-path: %w", err)}
	}
	if err := preflight.Check(cfg); err != nil {
		return nil, configError{err}
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
	if d.state, err = state.Open(ctx, cfg.PinPath, state.Options{Fresh: cfg.FreshState, Logger: log}); err != nil {
		d.pol.Close()
		return nil, err
	}
	log.Debug("pin directory opened", "pin_path", cfg.PinPath, "adopt", d.state.Pinned() != nil, "took", time.Since(d.started).String())
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
		Logger:               log,
		Selector:             d.pol,
		State:                d.state,
		VIPFilter:            d.filter,
		ProbeVIP:             neigh.Probe,
	})
	if err != nil {
		d.pol.Close()
		d.closeMetrics()
		if d.state.Pinned() == nil {
			d.state.Remove()
		}
		d.state.Close()
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
	if rerr := d.state.Remove(); err == nil {
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
	d.state.Close()
	return err
}

// closeFailed cleans up after a start that failed: state that was adopted
// is left running as it was found; a fresh start is undone.
func (d *daemon) closeFailed() {
	if d.state.Pinned() != nil {
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
	g.Go(func() error { return control.Serve(ctx, d.cfg.Socket, d) })
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
				if err := d.reloadAndLog(ctx); err != nil {
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
	d.log.Info("ready", "iface", d.cfg.Iface, "services", len(d.cfg.Services), "socket", d.cfg.Socket, "metrics_address", d.cfg.MetricsAddress,
		"pin_path", d.cfg.PinPath, "state", start, "took", time.Since(d.started).Round(time.Millisecond).String())
	d.notifyErr(d.notify.Ready(d.statusLine()))
	return g.Wait()
}

// reloadResult says what a reload put in force.
type reloadResult struct {
	Services int      // services in force
	Chain    []string // the chain's changes
	Took     time.Duration
}

// errPartlyApplied marks a reload that failed while switching (a kernel
// map update failed): part of the new configuration is in force.
var errPartlyApplied = errors.New("reload partly applied")

// statusLine is the line `systemctl status` shows.
func (d *daemon) statusLine() string {
	return fmt.Sprintf("serving %d services on %s", len(d.cfg.Services), d.cfg.Iface)
}

func (d *daemon) notifyErr(err error) {
	if err != nil {
		d.log.Warn("notify systemd", "err", err)
	}
}

// reload re-reads the configuration from the same arguments and applies
// its services, their policies and the chain as one transaction: first
// everything that can fail is prepared (the configuration checked, chain
// members loaded and the new chain verified, policy plugins started and
// every selection table computed, VIP addresses added), then it is
// switched in. If preparing fails, the running services, backends,
// policies and chain are exactly the old ones. Settings that need a
// restart are reported, not applied. Reloads run one at a time.
func (d *daemon) reload(ctx context.Context) (res reloadResult, err error) {
	d.reloading.Lock()
	defer d.reloading.Unlock()
	start := time.Now()
	cfg, err := config.Parse(d.args)
	if err != nil {
		return res, err
	}
	if cfg.Iface != d.cfg.Iface || cfg.XDPMode != d.cfg.XDPMode || !slices.Equal(cfg.AllSourceAddresses(), d.cfg.AllSourceAddresses()) ||
		!slices.Equal(cfg.SourceAddresses.Addrs(), d.cfg.SourceAddresses.Addrs()) ||
		cfg.SourcePorts != d.cfg.SourcePorts || cfg.Conntrack.MaxEntries != d.cfg.Conntrack.MaxEntries {
		d.log.Warn("reload: iface, xdp-mode, the set of source addresses, source-ports and conntrack.max-entries need a restart; kept")
	}
	kept := *cfg
	kept.Iface, kept.SourceAddresses, kept.SourcePorts = d.cfg.Iface, d.cfg.SourceAddresses, d.cfg.SourcePorts
	if err := preflight.Check(&kept); err != nil {
		return res, err
	}
	if err := checkPolicies(d.pol, cfg.Services); err != nil {
		return res, err
	}
	if err := checkChain(cfg); err != nil {
		return res, err
	}
	cp, err := d.chain.Prepare(chainSpecs(cfg), cfg.XLBPriority)
	if err != nil {
		return res, fmt.Errorf("prepare chain: %w", err)
	}
	sp, err := d.bal.PrepareServices(ctx, services(cfg))
	if err != nil {
		cp.Abort()
		d.pol.Prune(d.bal.Policies()) // stop plugins started for nothing
		return res, fmt.Errorf("prepare services: %w", err)
	}
	// Switch: the chain first (its link update is the step that can still
	// fail without anything changed), then the services' maps.
	if err := cp.Commit(); err != nil && !errors.Is(err, chain.ErrUnpinned) {
		sp.Abort()
		d.pol.Prune(d.bal.Policies())
		return res, fmt.Errorf("switch chain: %w", err)
	} else if err != nil {
		d.log.Error("reload: chain in force, pins missing", "err", err)
	}
	err = sp.Commit()
	d.pol.Prune(d.bal.Policies())
	if err != nil {
		return res, fmt.Errorf("%w: chain switched, services: %w", errPartlyApplied, err)
	}
	d.cfg.Services, d.cfg.Chain, d.cfg.XLBPriority = cfg.Services, cfg.Chain, cfg.XLBPriority
	return reloadResult{Services: len(cfg.Services), Chain: cp.Summary, Took: time.Since(start)}, nil
}

// reloadAndLog reloads and logs the outcome: ERROR with what failed, or
// INFO "reloaded".
func (d *daemon) reloadAndLog(ctx context.Context) error {
	at := time.Now()
	res, err := d.reload(ctx)
	last := &control.ReloadStatus{At: at, OK: err == nil}
	if err != nil {
		last.Error = err.Error()
	} else {
		last.Took = res.Took.String()
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
		d.log.Info("reloaded", "services", res.Services, "chain_changes", res.Chain, "took", res.Took.String())
	}
	return err
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
		for _, b := range s.Backends {
			bs = append(bs, balancer.Backend{Address: b.Address, Weight: b.Weight})
		}
		proto := balancer.TCP
		if s.Protocol == "udp" {
			proto = balancer.UDP
		}
		out = append(out, balancer.Service{VIP: s.VIP, Protocol: proto, Policy: s.Policy, Backends: bs, SourceAddresses: s.SourceAddresses.Addrs(),
			ExternalVIP: !cfg.ManagesVIP(s)})
	}
	return out
}

// Status implements control.Handler.
func (d *daemon) Status(context.Context) (control.Status, error) {
	counters, err := d.bal.Pipeline().Stats()
	if err != nil {
		return control.Status{}, err
	}
	lo, hi := d.bal.SourcePorts()
	st := control.Status{
		Iface:       d.cfg.Iface,
		XDPMode:     d.cfg.XDPMode,
		SourcePorts: fmt.Sprintf("%d-%d", lo, hi),
		Counters:    counters,
	}
	for _, a := range d.bal.SourceAddresses() {
		st.SourceAddresses = append(st.SourceAddresses, a.String())
	}
	ports := d.bal.Pipeline().PortUse()
	for _, s := range d.bal.Services() {
		cs := control.Service{VIP: s.VIP.String(), Protocol: s.Protocol.String(), Policy: s.Policy, ManageVIP: !s.ExternalVIP}
		for _, b := range s.Backends {
			use := ports[b.Address]
			cs.Backends = append(cs.Backends, control.Backend{
				Address: b.Address.String(), Weight: b.Weight, ID: b.ID, Active: b.Active, HalfOpen: b.HalfOpen,
				NewPerSec: b.NewPerSec, PortsUsed: use.Used, PortsHeld: use.Held, PortPool: s.PortPool, NoPort: b.NoPort,
				State: b.State.String(), NextHop: b.NextHop,
			})
		}
		st.Services = append(st.Services, cs)
	}
	d.lastMu.Lock()
	st.LastReload = d.lastReload
	d.lastMu.Unlock()
	st.State = d.stateStatus()
	for _, p := range d.pol.Statuses() {
		ps := control.PolicyStatus{Name: p.Name, Path: p.Path, Pid: p.Pid, Restarts: p.Restarts, APIVersion: p.APIVersion}
		if p.Pid != 0 {
			ps.Asked = p.Needs.String()
		}
		st.Policies = append(st.Policies, ps)
	}
	return st, nil
}

// Conns implements control.Handler.
func (d *daemon) Conns(_ context.Context, f control.ConnFilter) ([]control.Conn, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	conns, err := d.bal.Pipeline().Conns()
	if err != nil {
		return nil, err
	}
	out := make([]control.Conn, 0, len(conns))
	for _, c := range conns {
		proto := "tcp"
		if c.Protocol == dispatcher.UDP {
			proto = "udp"
		}
		cc := control.Conn{
			Protocol: proto,
			Client:   c.Client.String(), VIP: c.VIP.String(), Backend: c.Backend.String(),
			Source: c.Source.String(), State: c.State, IdleMS: c.Idle.Milliseconds(),
		}
		if f.Match(cc) {
			out = append(out, cc)
		}
	}
	return out, nil
}

// stateStatus is the state line of the status.
func (d *daemon) stateStatus() control.StateStatus {
	st := control.StateStatus{PinPath: d.state.Path()}
	if l, err := dispatcher.BuildLayout(); err == nil {
		st.Layout = l.Version()
	}
	if a := d.bal.Adopted(); a != nil {
		st.Adopted = &control.Adopted{Services: a.Services, BackendIDs: a.Backends, Retired: a.Retired,
			Connections: a.Connections, Addresses: a.Addresses}
	}
	if d.filter != nil {
		st.VIPFilter = "nftables table inet " + d.filter.Name()
		for _, a := range d.filter.Addrs() {
			st.VIPFilterAddr = append(st.VIPFilterAddr, a.String())
		}
	}
	return st
}

// Shutdown implements control.Handler.
func (d *daemon) Shutdown(_ context.Context, req control.ShutdownRequest) error {
	select {
	case d.stop <- req.KeepDatapath:
		if req.KeepDatapath {
			d.log.Info("shutdown asked: stopping, the data path keeps running")
		} else {
			d.log.Info("shutdown asked: stopping and removing everything")
		}
	default: // one is under way
	}
	return nil
}
