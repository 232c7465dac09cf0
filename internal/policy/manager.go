// Package policy runs xlbd's selection policies: one go-plugin process per
// policy in use, asked for selection tables by the balancer. A plugin that
// crashes, hangs or answers nonsense never reaches the data path: the
// balancer keeps the last table in force, and the manager restarts the
// plugin with backoff.
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

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/plugins"
)

// Errors returned by the Manager.
var (
	ErrBackoff = errors.New("plugin restarting")
)

// Options configure a Manager.
type Options struct {
	Dir          string            // where policy names are looked up
	SHA256       map[string]string // policy name or path -> hex sha256 pin
	Logger       *slog.Logger
	CallTimeout  time.Duration // a Select slower than this counts as a hang; default 2s
	StartTimeout time.Duration // default 10s
	MaxBackoff   time.Duration // default 30s
}

// Manager owns the policy plugin processes. It implements
// balancer.Selector.
type Manager struct {
	opts Options
	log  *slog.Logger

	mu   sync.Mutex
	runs map[string]*run // by policy as configured
}

// run is one policy's plugin: the live client, or when it is down, when
// it may be started again.
type run struct {
	name     string
	path     string
	mu       sync.Mutex // serialises starts
	client   *plugins.Client
	restarts int
	failures int
	notUntil time.Time
}

// Status describes a running policy plugin.
type Status struct {
	Name     string
	Path     string
	Pid      int // 0 while down
	Restarts int
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

// client returns the policy's live plugin, starting it if it is down and
// its backoff has passed.
func (m *Manager) client(ctx context.Context, r *run) (*plugins.Client, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.client != nil && !r.client.Exited() {
		return r.client, nil
	}
	if r.client != nil {
		m.log.Error("policy plugin exited", "policy", r.name, "pid", r.client.Pid())
		r.client.Close()
		r.client = nil
		r.backoff(m.opts.MaxBackoff)
	}
	if wait := time.Until(r.notUntil); wait > 0 {
		return nil, fmt.Errorf("policy %s: %w for %s", r.name, ErrBackoff, wait.Round(time.Millisecond))
	}
	sum, err := m.checkFile(r.path)
	if err != nil {
		r.backoff(m.opts.MaxBackoff)
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, m.opts.StartTimeout)
	defer cancel()
	c, err := plugins.Launch(sctx, plugins.LaunchConfig{
		Path: r.path, SHA256: sum, Logger: m.log, StartTimeout: m.opts.StartTimeout,
	})
	if err != nil {
		r.backoff(m.opts.MaxBackoff)
		return nil, err
	}
	if r.restarts > 0 || r.failures > 0 {
		m.log.Info("policy plugin restarted", "policy", r.name, "pid", c.Pid(), "restarts", r.restarts)
	} else {
		m.log.Info("policy plugin started", "policy", r.name, "path", r.path, "pid", c.Pid())
	}
	r.client = c
	r.failures = 0
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

// Select implements balancer.Selector: it asks the service's policy
// plugin for a table. A call that outlives CallTimeout is taken for a
// hang: the plugin is killed and restarted with backoff.
func (m *Manager) Select(ctx context.Context, svc balancer.ServiceState) (balancer.Selection, error) {
	r, err := m.get(svc.Policy)
	if err != nil {
		return balancer.Selection{}, err
	}
	c, err := m.client(ctx, r)
	if err != nil {
		return balancer.Selection{}, err
	}
	req := plugins.Request{Service: svc.VIP, Backends: make([]plugins.Backend, len(svc.Backends))}
	for i, b := range svc.Backends {
		active := b.Active
		if active < 0 {
			active = 0
		}
		req.Backends[i] = plugins.Backend{
			Address: b.Address, Weight: b.Weight, Active: uint64(active), NewPerSec: b.NewPerSec,
		}
	}
	cctx, cancel := context.WithTimeout(ctx, m.opts.CallTimeout)
	defer cancel()
	sel, err := c.Select(cctx, req)
	if err != nil {
		// gRPC may report the deadline a moment before the context's
		// own timer fires: either says the plugin did not answer.
		hung := errors.Is(cctx.Err(), context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded
		if hung && ctx.Err() == nil {
			m.log.Error("policy plugin hung; killing it", "policy", r.name, "pid", c.Pid(), "timeout", m.opts.CallTimeout.String())
			r.mu.Lock()
			if r.client == c {
				c.Close()
				r.client = nil
				r.backoff(m.opts.MaxBackoff)
			}
			r.mu.Unlock()
			return balancer.Selection{}, fmt.Errorf("policy %s: no answer within %s, plugin killed: %w", r.name, m.opts.CallTimeout, context.DeadlineExceeded)
		}
		return balancer.Selection{}, err
	}
	table := make([]int, len(sel.Table))
	for i, v := range sel.Table {
		table[i] = int(v)
	}
	return balancer.Selection{Mode: dispatcher.Mode(sel.Mode), Table: table}, nil
}

// Prune stops the plugins of policies not in use.
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
		if r.client != nil {
			m.log.Info("policy plugin stopped", "policy", r.name, "pid", r.client.Pid())
			r.client.Close()
			r.client = nil
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
		if r.client != nil && !r.client.Exited() {
			s.Pid = r.client.Pid()
		}
		r.mu.Unlock()
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Watch restarts plugins that exit, with backoff, and calls refresh
// after each restart so their services get fresh tables; until ctx ends.
func (m *Manager) Watch(ctx context.Context, every time.Duration, refresh func(context.Context)) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		restarted := false
		for _, r := range m.current() {
			r.mu.Lock()
			down := r.client == nil || r.client.Exited()
			r.mu.Unlock()
			if !down {
				continue
			}
			if _, err := m.client(ctx, r); err == nil {
				restarted = true
			} else if !errors.Is(err, ErrBackoff) {
				m.log.Warn("restart policy plugin", "policy", r.name, "err", err)
			}
		}
		if restarted {
			refresh(ctx)
		}
	}
}

// Close stops every plugin.
func (m *Manager) Close() {
	m.Prune(nil)
}
