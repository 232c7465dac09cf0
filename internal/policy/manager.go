// Package policy runs xlbd's selection policies: one go-plugin process per
// policy in use, asked for selection tables by the balancer. A plugin that
// crashes, hangs or answers nonsense never reaches the data path: the
// balancer keeps the last table in force, and the manager restarts the
// plugin with backoff.
//
// Every call to a plugin has a deadline (Options.CallTimeout), after which
// the plugin is killed (SIGKILL) and restarted; an idle plugin is pinged
// every PingInterval with the same deadline, so a stopped one is replaced
// even when nothing asks it for a table. No lock of the manager is held
// across a plugin call or a plugin start.
package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/tick"
	"github.com/xlb-project/xlb/plugins"
)

// Errors returned by the Manager.
var (
	// ErrBackoff: the policy's plugin is down and waits before it is
	// started again. It wraps balancer.ErrUnavailable.
	ErrBackoff = fmt.Errorf("plugin restarting: %w", balancer.ErrUnavailable)
)

// Options configure a Manager.
type Options struct {
	Dir             string            // where policy names are looked up
	SHA256          map[string]string // policy name or path -> hex sha256 pin
	Logger          *slog.Logger
	CallTimeout     time.Duration // a call slower than this counts as a hang; default 2s
	StartTimeout    time.Duration // default 10s
	ShutdownTimeout time.Duration // a clean stop slower than this ends with SIGKILL; default 1s
	PingInterval    time.Duration // how often an idle plugin is checked; default 1s
	MaxBackoff      time.Duration // default 30s
}

// Manager owns the policy plugin processes. It implements
// balancer.Selector.
type Manager struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	runs    map[string]*run // by policy as configured
	closing sync.WaitGroup  // plugins being stopped in the background
}

// run is one policy's plugin: the live client, or when it is down, when
// it may be started again.
type run struct {
	name  string
	path  string
	start sync.Mutex // serialises starts; taken by nothing else

	mu       sync.Mutex // guards the fields below; never held across a plugin call
	client   *plugins.Client
	restarts int
	failures int
	notUntil time.Time
	lastCall time.Time // of the last call that answered
}

// Status describes a running policy plugin.
type Status struct {
	Name       string
	Path       string
	Pid        int // 0 while down
	Restarts   int
	APIVersion int           // negotiated; 0 while down
	Needs      plugins.Needs // what the plugin reads
}

// NewManager returns a Manager; plugins start on first use.
func NewManager(opts Options) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = 2 * time.Second
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 10 * time.Second
	}
	if opts.ShutdownTimeout <= 0 {
		opts.ShutdownTimeout = time.Second
	}
	if opts.PingInterval <= 0 {
		opts.PingInterval = time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 30 * time.Second
	}
	return &Manager{opts: opts, log: opts.Logger, runs: make(map[string]*run)}
}

// Check resolves a policy name to its plugin binary, checks that only
// root can have written it and verifies its pin, without starting it.
func (m *Manager) Check(name string) error {
	file, err := m.resolve(name)
	if err != nil {
		return err
	}
	sum, err := m.checkFile(file)
	if err != nil || sum == nil {
		return err
	}
	return plugins.VerifySHA256(file, sum)
}

// Start starts the policy's plugin unless it runs, without asking it for
// anything: xlbd does it for every policy in use before it loads the data
// path, so that a binary that fails the plugin handshake is refused as a
// configuration error.
func (m *Manager) Start(ctx context.Context, name string) error {
	r, err := m.get(name)
	if err != nil {
		return err
	}
	_, err = m.client(ctx, r)
	return err
}

func (m *Manager) get(name string) (*run, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r := m.runs[name]; r != nil {
		return r, nil
	}
	path, err := m.resolve(name)
	if err != nil {
		return nil, err
	}
	r := &run{name: name, path: path}
	m.runs[name] = r
	return r, nil
}

// live returns the policy's plugin if it runs.
func (r *run) live() *plugins.Client {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.client != nil && !r.client.Exited() {
		return r.client
	}
	return nil
}

// client returns the policy's live plugin, starting it if it is down and
// its backoff has passed.
func (m *Manager) client(ctx context.Context, r *run) (*plugins.Client, error) {
	if c := r.live(); c != nil {
		return c, nil
	}
	r.start.Lock()
	defer r.start.Unlock()
	r.mu.Lock()
	if c := r.client; c != nil && !c.Exited() {
		r.mu.Unlock()
		return c, nil // started by another caller meanwhile
	}
	if c := r.client; c != nil {
		m.log.Error("policy plugin exited", "policy", r.name, "pid", c.Pid())
		r.client = nil
		r.backoff(m.opts.MaxBackoff)
		m.closeLater(c)
	}
	wait := time.Until(r.notUntil)
	r.mu.Unlock()
	if wait > 0 {
		return nil, fmt.Errorf("policy %s: %w for %s", r.name, ErrBackoff, wait.Round(time.Millisecond))
	}
	sum, err := m.checkFile(r.path)
	if err != nil {
		r.mu.Lock()
		r.backoff(m.opts.MaxBackoff)
		r.mu.Unlock()
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, m.opts.StartTimeout)
	defer cancel()
	c, err := plugins.Launch(sctx, plugins.LaunchConfig{
		Path: r.path, SHA256: sum, Logger: m.log, StartTimeout: m.opts.StartTimeout,
		CallTimeout: m.opts.CallTimeout, ShutdownTimeout: m.opts.ShutdownTimeout,
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil {
		r.backoff(m.opts.MaxBackoff)
		return nil, err
	}
	if r.restarts > 0 || r.failures > 0 {
		m.log.Info("policy plugin restarted", "policy", r.name, "pid", c.Pid(), "restarts", r.restarts,
			"api_version", c.APIVersion(), "needs", c.Needs().String())
	} else {
		m.log.Info("policy plugin started", "policy", r.name, "path", r.path, "pid", c.Pid(),
			"api_version", c.APIVersion(), "needs", c.Needs().String())
	}
	r.client, r.failures, r.lastCall = c, 0, time.Now()
	return c, nil
}

// backoff schedules the next start: 100ms after a first failure, doubling
// up to max. Caller holds r.mu.
func (r *run) backoff(max time.Duration) {
	d := 100 * time.Millisecond << min(r.failures, 20)
	if d > max {
		d = max
	}
	r.failures++
	r.restarts++
	r.notUntil = time.Now().Add(d)
}

// failed handles a call's error: a plugin that hung has been killed by
// its client; it is taken down and restarted with backoff.
func (m *Manager) failed(r *run, c *plugins.Client, err error) {
	if !errors.Is(err, plugins.ErrHung) {
		return
	}
	m.log.Error("policy plugin hung; killed it", "policy", r.name, "pid", c.Pid(), "timeout", m.opts.CallTimeout.String())
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.client == c {
		r.client = nil
		r.backoff(m.opts.MaxBackoff)
		m.closeLater(c)
	}
}

// answered records a call the plugin answered.
func (r *run) answered() {
	r.mu.Lock()
	r.lastCall = time.Now()
	r.mu.Unlock()
}

// Select implements balancer.Selector: it asks the service's policy
// plugin for a table. Backends go with their states, and with live load
// only when the plugin reads it; the Selection asks for a refresh as the
// plugin's Needs say. The plugin's "no backend" answer is the empty
// Selection. A call that outlives CallTimeout is taken for a hang: the
// plugin is killed and restarted with backoff.
func (m *Manager) Select(ctx context.Context, svc balancer.ServiceState) (balancer.Selection, error) {
	r, err := m.get(svc.Policy)
	if err != nil {
		return balancer.Selection{}, err
	}
	c, err := m.client(ctx, r)
	if err != nil {
		return balancer.Selection{}, err
	}
	needs := c.Needs()
	req := plugins.Request{Service: svc.VIP, Backends: make([]plugins.Backend, len(svc.Backends))}
	for i, b := range svc.Backends {
		req.Backends[i] = plugins.Backend{Address: b.Address, Weight: b.Weight, State: b.State, Health: b.PluginHealth()}
		if needs.LiveLoad {
			req.Backends[i].Active = uint64(max(b.Active, 0))
			req.Backends[i].NewPerSec = b.NewPerSec
		}
	}
	sel, err := c.Select(ctx, req)
	if errors.Is(err, plugins.ErrNoBackends) {
		r.answered()
		return balancer.Selection{Refresh: needs.Interval()}, nil
	}
	if err != nil {
		m.failed(r, c, err)
		return balancer.Selection{}, err
	}
	r.answered()
	table := make([]int, len(sel.Table))
	for i, v := range sel.Table {
		table[i] = int(v)
	}
	return balancer.Selection{Mode: dispatcher.Mode(sel.Mode), Table: table, Refresh: needs.Interval()}, nil
}

// closeLater stops a plugin in the background (its Close is bounded by
// the shutdown deadline); Close waits for it.
func (m *Manager) closeLater(c *plugins.Client) {
	m.closing.Add(1)
	go func() {
		defer m.closing.Done()
		c.Close()
	}()
}

// Prune stops the plugins of policies not in use. It does not wait for
// them to exit (each gets SIGKILL after the shutdown deadline).
func (m *Manager) Prune(inUse []string) {
	m.mu.Lock()
	var stop []*run
	for name, r := range m.runs {
		if !slices.Contains(inUse, name) {
			stop = append(stop, r)
			delete(m.runs, name)
		}
	}
	m.mu.Unlock()
	for _, r := range stop {
		r.mu.Lock()
		if c := r.client; c != nil {
			m.log.Info("policy plugin stopped", "policy", r.name, "pid", c.Pid())
			r.client = nil
			m.closeLater(c)
		}
		r.mu.Unlock()
	}
}

// current lists the policies in use.
func (m *Manager) current() []*run {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Collect(maps.Values(m.runs))
}

// Statuses lists the policies' plugins.
func (m *Manager) Statuses() []Status {
	runs := m.current()
	out := make([]Status, 0, len(runs))
	for _, r := range runs {
		r.mu.Lock()
		s := Status{Name: r.name, Path: r.path, Restarts: r.restarts}
		if c := r.client; c != nil && !c.Exited() {
			s.Pid, s.APIVersion, s.Needs = c.Pid(), c.APIVersion(), c.Needs()
		}
		r.mu.Unlock()
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Watch restarts plugins that exit or hang, with backoff, and calls
// restarted with the policy's name after each restart, so its services
// get fresh tables; every PingInterval it pings the plugins that answered
// no call meanwhile. Until ctx ends.
func (m *Manager) Watch(ctx context.Context, every time.Duration, restarted func(policy string)) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return tick.Every(ctx, every, nil, func() {
			for _, r := range m.current() {
				if r.live() != nil {
					continue
				}
				if _, err := m.client(ctx, r); err == nil {
					restarted(r.name)
				} else if !errors.Is(err, ErrBackoff) && ctx.Err() == nil {
					m.log.Warn("restart policy plugin", "policy", r.name, "err", err)
				}
			}
		})
	})
	g.Go(func() error { return tick.Every(ctx, m.opts.PingInterval, nil, func() { m.pingIdle(ctx) }) })
	return g.Wait()
}

// pingIdle pings, all at once, the live plugins that answered no call for
// half a PingInterval, and waits for the answers (at most CallTimeout).
func (m *Manager) pingIdle(ctx context.Context) {
	var g errgroup.Group
	for _, r := range m.current() {
		r.mu.Lock()
		// Half the interval: a plugin last heard of just after the
		// previous tick is pinged at this one, not at the next.
		c, idle := r.client, time.Since(r.lastCall) >= m.opts.PingInterval/2
		r.mu.Unlock()
		if c == nil || c.Exited() || !idle {
			continue
		}
		g.Go(func() error {
			if err := c.Ping(ctx); err != nil {
				m.failed(r, c, err)
			} else {
				r.answered()
			}
			return nil
		})
	}
	_ = g.Wait()
}

// Close stops every plugin and waits until they are gone (each gets
// SIGKILL after the shutdown deadline).
func (m *Manager) Close() {
	m.Prune(nil)
	m.closing.Wait()
}
