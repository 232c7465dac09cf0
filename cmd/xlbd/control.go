package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/balancer"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/live"
	"github.com/xlb-project/xlb/internal/metrics"
	"github.com/xlb-project/xlb/plugins"
)

// The control API (internal/control/proto): the daemon is its server.

var _ controlpb.ControlServer = (*daemon)(nil)

// GetStatus implements controlpb.ControlServer.
func (d *daemon) GetStatus(context.Context, *controlpb.GetStatusRequest) (*controlpb.Status, error) {
	counters, err := d.bal.Pipeline().Stats()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	lo, hi := d.bal.SourcePorts()
	st := &controlpb.Status{
		Iface:       d.cfg.Iface,
		XdpMode:     d.cfg.XDPMode,
		SourcePorts: fmt.Sprintf("%d-%d", lo, hi),
		Counters:    counters,
	}
	for _, a := range d.bal.SourceAddresses() {
		st.SourceAddresses = append(st.SourceAddresses, a.String())
	}
	in := d.state.Load()
	ports := d.bal.Pipeline().PortUse()
	byKey := map[string]*controlpb.Service{}
	for _, s := range d.bal.Services() {
		key := s.Key().String()
		cs := &controlpb.Service{Vip: s.VIP.String(), Protocol: s.Protocol.String(), Policy: s.Policy, Live: in.live.LiveService(key),
			AllDown: config.AllDownRST, UsingAll: s.UsingAll, ManageVip: !s.ExternalVIP}
		if c := configService(in.cfg, key); c != nil {
			cs.AllDown = c.AllDown
			cs.Health = healthCheckPB(c.BackendHealth(-1))
		}
		for _, b := range s.Backends {
			use := ports[b.Address]
			cb := &controlpb.Backend{
				Address: b.Address.String(), Weight: b.Weight, Id: b.ID, Active: b.Active, HalfOpen: b.HalfOpen, NewPerSec: b.NewPerSec,
				State: b.State.String(), Reason: b.Reason, StateSince: timestamp(b.Since), NextHop: b.NextHop,
				PortsUsed: uint32(use.Used), PortsHeld: uint32(use.Held), PortPool: uint32(s.PortPool), NoPort: b.NoPort,
				Live: in.live.LiveBackend(key, b.Address), Health: healthPB(b),
			}
			if b.State == plugins.StateDraining && b.Active <= 0 {
				cb.State = "drained"
			}
			cs.Backends = append(cs.Backends, cb)
		}
		byKey[key] = cs
		st.Services = append(st.Services, cs)
	}
	for _, r := range d.bal.Retired() {
		key := r.Service.String()
		cs, ok := byKey[key]
		if !ok {
			cs = &controlpb.Service{Vip: r.Service.VIP.String(), Protocol: r.Service.Protocol.String(), Removed: true}
			byKey[key] = cs
			st.Services = append(st.Services, cs)
		}
		use := ports[r.Address]
		cs.Backends = append(cs.Backends, &controlpb.Backend{
			Address: r.Address.String(), Id: r.ID, Active: r.Active, HalfOpen: r.HalfOpen, State: "removed", Reason: "removed",
			StateSince: timestamp(r.Since), PortsUsed: uint32(use.Used), PortsHeld: uint32(use.Held), NoPort: r.NoPort,
		})
	}
	d.lastMu.Lock()
	st.LastReload = d.lastReload
	d.lastMu.Unlock()
	st.State = d.stateStatus()
	for _, p := range d.pol.Statuses() {
		ps := &controlpb.PolicyPlugin{Name: p.Name, Path: p.Path, Pid: int64(p.Pid), Restarts: uint32(p.Restarts), ApiVersion: uint32(p.APIVersion)}
		if p.Pid != 0 {
			ps.Asked = p.Needs.String()
		}
		st.Policies = append(st.Policies, ps)
	}
	return st, nil
}

func configService(cfg *config.Config, key string) *config.Service {
	for i := range cfg.Services {
		if cfg.Services[i].Key() == key {
			return &cfg.Services[i]
		}
	}
	return nil
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// healthCheckPB is a resolved health check; nil for none.
func healthCheckPB(h config.Health) *controlpb.HealthCheck {
	if h.Check == config.HealthNone {
		return nil
	}
	return &controlpb.HealthCheck{Check: h.Check, Interval: durationpb.New(h.Interval), Timeout: durationpb.New(h.Timeout),
		Rise: uint32(h.Rise), Fall: uint32(h.Fall), HttpPath: h.HTTP.Path, HttpHost: h.HTTP.Host, HttpExpectStatus: uint32(h.HTTP.ExpectStatus),
		ResetEstablished: h.ResetEstablished != nil && *h.ResetEstablished}
}

// healthPB is what a backend's check found.
func healthPB(b balancer.BackendState) *controlpb.Health {
	if !b.Checked {
		return &controlpb.Health{Result: "none"}
	}
	sp := b.Backend.Health
	h := b.Health
	return &controlpb.Health{
		Check: &controlpb.HealthCheck{Check: sp.Check, Interval: durationpb.New(sp.Interval), Timeout: durationpb.New(sp.Timeout),
			Rise: uint32(sp.Rise), Fall: uint32(sp.Fall), HttpPath: sp.Path, HttpHost: sp.Host, HttpExpectStatus: uint32(sp.ExpectStatus),
			ResetEstablished: b.ResetOnDown},
		Result: h.Result.String(), LastResult: h.Last, LastCheck: timestamp(h.LastAt), Since: timestamp(h.Since),
		Passes: uint32(h.Passes), Failures: uint32(h.Failures),
	}
}

// ListConns implements controlpb.ControlServer.
func (d *daemon) ListConns(_ context.Context, f *controlpb.ListConnsRequest) (*controlpb.ListConnsResponse, error) {
	if err := control.ValidateConnFilter(f); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	conns, err := d.bal.Pipeline().Conns()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	out := &controlpb.ListConnsResponse{}
	for _, c := range conns {
		proto := "tcp"
		if c.Protocol == dispatcher.UDP {
			proto = "udp"
		}
		cc := &controlpb.Conn{Protocol: proto, Client: c.Client.String(), Vip: c.VIP.String(), Backend: c.Backend.String(),
			Source: c.Source.String(), State: c.State, IdleMs: c.Idle.Milliseconds()}
		if control.MatchConn(f, cc) {
			out.Conns = append(out.Conns, cc)
		}
	}
	return out, nil
}

// GetStats implements controlpb.ControlServer: the snapshot the metrics
// collector reads, with per-backend figures named as in
// metrics.BackendFigures.
func (d *daemon) GetStats(ctx context.Context, _ *controlpb.GetStatsRequest) (*controlpb.Stats, error) {
	snap, err := d.Snapshot(ctx)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	st := &controlpb.Stats{
		Counters: snap.Counters,
		Ports:    &controlpb.PortUse{Used: uint64(snap.Ports.Used), Held: uint64(snap.Ports.Held), Capacity: uint64(snap.Ports.Capacity)},
	}
	for _, s := range snap.Services {
		cs := &controlpb.ServiceStats{Vip: s.VIP.String(), Protocol: s.Protocol, Policy: s.Policy}
		for _, b := range s.Backends {
			cb := &controlpb.BackendStats{Address: b.Address.String(), Gauges: map[string]int64{}, Counters: map[string]uint64{}}
			for _, f := range metrics.BackendFigures {
				v := f.Value(b)
				if f.Kind == metrics.Counter {
					cb.Counters[f.Key] = uint64(v)
				} else {
					cb.Gauges[f.Key] = int64(v)
				}
			}
			cs.Backends = append(cs.Backends, cb)
		}
		st.Services = append(st.Services, cs)
	}
	return st, nil
}

// ListChain implements controlpb.ControlServer.
func (d *daemon) ListChain(context.Context, *controlpb.ListChainRequest) (*controlpb.ListChainResponse, error) {
	in := d.state.Load()
	out := &controlpb.ListChainResponse{}
	for _, m := range d.chain.List() {
		out.Members = append(out.Members, &controlpb.ChainMember{
			Name: m.Name, Object: m.Object, Program: m.Program, Sha256: m.SHA256, Priority: int32(m.Priority), HasPriority: true,
			ContinueOn: m.ContinueOn, Builtin: m.Builtin, PinPath: m.PinDir, Maps: m.Maps, Live: !m.Builtin && in.live.LiveMember(m.Name),
		})
	}
	return out, nil
}

// GetConfig implements controlpb.ControlServer.
func (d *daemon) GetConfig(context.Context, *controlpb.GetConfigRequest) (*controlpb.GetConfigResponse, error) {
	b, err := d.state.Load().cfg.YAML()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &controlpb.GetConfigResponse{Yaml: string(b)}, nil
}

// Reload implements controlpb.ControlServer: a reload as SIGHUP's,
// answered when it is done.
func (d *daemon) Reload(ctx context.Context, _ *controlpb.ReloadRequest) (*controlpb.ReloadResponse, error) {
	d.log.Info("control: reload requested", peerAttrs(ctx)...)
	d.notifyErr(d.notify.Reloading())
	res, err := d.reloadAndLog(ctx)
	if err != nil {
		msg, _, _ := strings.Cut(err.Error(), "\n")
		d.notifyErr(d.notify.Ready("last reload failed: " + msg))
		code := codes.FailedPrecondition
		if errors.Is(err, errPartlyApplied) {
			code = codes.Internal
		}
		return nil, status.Error(code, "reload refused, configuration unchanged: "+err.Error())
	}
	d.notifyErr(d.notify.Ready(d.statusLine()))
	return &controlpb.ReloadResponse{Services: uint32(res.Services), ChainChanges: res.Chain, DroppedLiveChanges: res.Dropped,
		Took: durationpb.New(res.Took)}, nil
}

// edit is a live change: it changes ch, made over the file's configuration
// file, and describes what it changed.
type edit func(file *config.Config, ch *live.Changes) ([]string, error)

// change applies a live change as one transaction (apply), keeps it (a
// reload keeps it unless the file changes the same item), and logs what
// changed and who asked, or why it was refused.
func (d *daemon) change(ctx context.Context, request string, fn edit) (*controlpb.ChangeResponse, error) {
	start := time.Now()
	res, err := d.changeLocked(ctx, fn)
	attrs := append([]any{"request", request}, peerAttrs(ctx)...)
	if err != nil {
		d.log.Warn("control: change refused", append(attrs, "err", err)...)
		return nil, grpcError(err)
	}
	res.Took = durationpb.New(time.Since(start))
	d.log.Info("control: change applied", append(attrs, "changes", res.Changes, "took", time.Since(start).String())...)
	return res, nil
}

func (d *daemon) changeLocked(ctx context.Context, fn edit) (*controlpb.ChangeResponse, error) {
	d.changing.Lock()
	defer d.changing.Unlock()
	cur := d.state.Load()
	ch := cur.live.Clone()
	lines, err := fn(cur.file, ch)
	if err != nil {
		return nil, err
	}
	cfg := ch.Apply(cur.file)
	if err := cfg.Validate(); err != nil {
		return nil, invalid(err)
	}
	if _, err := d.apply(ctx, cfg); err != nil {
		return nil, err
	}
	d.state.Store(&inForce{file: cur.file, live: ch, cfg: cfg})
	return &controlpb.ChangeResponse{Changes: lines}, nil
}

// invalidError marks a request that is malformed or makes the
// configuration invalid.
type invalidError struct{ error }

func (e invalidError) Unwrap() error { return e.error }

// invalid marks err as the request's fault.
func invalid(err error) error { return invalidError{err} }

// grpcError gives an error its status code.
func grpcError(err error) error {
	code := codes.FailedPrecondition
	switch {
	case errors.Is(err, live.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, live.ErrExists):
		code = codes.AlreadyExists
	case errors.As(err, new(invalidError)):
		code = codes.InvalidArgument
	case errors.Is(err, errPartlyApplied):
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}

func peerAttrs(ctx context.Context) []any {
	p, ok := control.Peer(ctx)
	if !ok {
		return nil
	}
	return []any{"uid", p.UID, "pid", p.PID}
}

// serviceKeys resolves a request's service; with allowAll, an empty VIP
// is every service.
func serviceKeys(cfg *config.Config, ref *controlpb.ServiceRef, allowAll bool) ([]string, error) {
	if ref.GetVip() == "" {
		if !allowAll {
			return nil, invalid(errors.New("no service named"))
		}
		var keys []string
		for _, s := range cfg.Services {
			keys = append(keys, s.Key())
		}
		return keys, nil
	}
	vip, err := netip.ParseAddrPort(ref.GetVip())
	if err != nil {
		return nil, invalid(fmt.Errorf("service %q is not VIP:PORT", ref.GetVip()))
	}
	if p := ref.GetProtocol(); p != "" && p != "tcp" && p != "udp" {
		return nil, invalid(fmt.Errorf("protocol %q is not tcp or udp", p))
	}
	if allowAll && ref.GetProtocol() == "" {
		var keys []string
		for _, s := range cfg.Services {
			if s.VIP == vip {
				keys = append(keys, s.Key())
			}
		}
		if len(keys) == 0 {
			return nil, fmt.Errorf("service %s: %w", vip, live.ErrNotFound)
		}
		return keys, nil
	}
	key, err := live.ResolveService(cfg, vip, ref.GetProtocol())
	if err != nil {
		return nil, err
	}
	return []string{key}, nil
}

// backendAddr parses a request's backend address.
func backendAddr(s string) (netip.AddrPort, error) {
	a, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, invalid(fmt.Errorf("backend %q is not IP:PORT", s))
	}
	return a, nil
}

// inForceOf is the configuration a change starts from.
func inForceOf(file *config.Config, ch *live.Changes) *config.Config { return ch.Apply(file) }

// SetPolicy implements controlpb.ControlServer: start the new policy's
// plugin, install its tables, then stop plugins no longer in use.
func (d *daemon) SetPolicy(ctx context.Context, req *controlpb.SetPolicyRequest) (*controlpb.ChangeResponse, error) {
	start := time.Now()
	var keys []string
	res, err := d.change(ctx, fmt.Sprintf("policy set %s %s", req.GetPolicy(), req.GetService().GetVip()), func(file *config.Config, ch *live.Changes) ([]string, error) {
		if err := plugins.CheckPolicy(req.GetPolicy()); err != nil {
			return nil, invalid(err)
		}
		var err error
		if keys, err = serviceKeys(inForceOf(file, ch), req.GetService(), true); err != nil {
			return nil, err
		}
		var lines []string
		for _, k := range keys {
			line, err := ch.SetPolicy(file, k, req.GetPolicy())
			if err != nil {
				return nil, err
			}
			lines = append(lines, line)
		}
		return lines, nil
	})
	if err != nil {
		return nil, err
	}
	d.metrics.ObserveSwap(time.Since(start))
	res.Services = keys
	return res, nil
}

// AddBackend implements controlpb.ControlServer.
func (d *daemon) AddBackend(ctx context.Context, req *controlpb.AddBackendRequest) (*controlpb.ChangeResponse, error) {
	return d.change(ctx, "backend add "+req.GetAddress(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		key, a, err := backendRef(inForceOf(file, ch), req.GetService(), req.GetAddress())
		if err != nil {
			return nil, err
		}
		line, err := ch.AddBackend(file, key, config.Backend{Address: a, Weight: cmp.Or(req.GetWeight(), 1)})
		return []string{line}, err
	})
}

// RemoveBackend implements controlpb.ControlServer.
func (d *daemon) RemoveBackend(ctx context.Context, req *controlpb.RemoveBackendRequest) (*controlpb.ChangeResponse, error) {
	return d.change(ctx, "backend remove "+req.GetAddress(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		key, a, err := backendRef(inForceOf(file, ch), req.GetService(), req.GetAddress())
		if err != nil {
			return nil, err
		}
		line, err := ch.RemoveBackend(file, key, a)
		return []string{line}, err
	})
}

// SetBackendWeight implements controlpb.ControlServer.
func (d *daemon) SetBackendWeight(ctx context.Context, req *controlpb.SetBackendWeightRequest) (*controlpb.ChangeResponse, error) {
	return d.setWeight(ctx, "backend set-weight", req.GetService(), req.GetAddress(), req.GetWeight())
}

// DrainBackend implements controlpb.ControlServer: weight 0.
func (d *daemon) DrainBackend(ctx context.Context, req *controlpb.DrainBackendRequest) (*controlpb.ChangeResponse, error) {
	return d.setWeight(ctx, "backend drain", req.GetService(), req.GetAddress(), 0)
}

func (d *daemon) setWeight(ctx context.Context, request string, ref *controlpb.ServiceRef, addr string, w uint32) (*controlpb.ChangeResponse, error) {
	return d.change(ctx, fmt.Sprintf("%s %s %d", request, addr, w), func(file *config.Config, ch *live.Changes) ([]string, error) {
		key, a, err := backendRef(inForceOf(file, ch), ref, addr)
		if err != nil {
			return nil, err
		}
		line, err := ch.SetWeight(file, key, a, w)
		return []string{line}, err
	})
}

func backendRef(cfg *config.Config, ref *controlpb.ServiceRef, addr string) (string, netip.AddrPort, error) {
	keys, err := serviceKeys(cfg, ref, false)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	a, err := backendAddr(addr)
	return keys[0], a, err
}

// AddService implements controlpb.ControlServer.
func (d *daemon) AddService(ctx context.Context, req *controlpb.AddServiceRequest) (*controlpb.ChangeResponse, error) {
	spec := req.GetService()
	return d.change(ctx, "service add "+spec.GetVip(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		s, err := serviceFromPB(spec, file.DefaultPolicy)
		if err != nil {
			return nil, invalid(err)
		}
		line, err := ch.AddService(file, s)
		return []string{line}, err
	})
}

// RemoveService implements controlpb.ControlServer.
func (d *daemon) RemoveService(ctx context.Context, req *controlpb.RemoveServiceRequest) (*controlpb.ChangeResponse, error) {
	return d.change(ctx, "service remove "+req.GetService().GetVip(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		keys, err := serviceKeys(inForceOf(file, ch), req.GetService(), false)
		if err != nil {
			return nil, err
		}
		line, err := ch.RemoveService(file, keys[0])
		return []string{line}, err
	})
}

// AddChainMember implements controlpb.ControlServer.
func (d *daemon) AddChainMember(ctx context.Context, req *controlpb.AddChainMemberRequest) (*controlpb.ChangeResponse, error) {
	m := req.GetMember()
	return d.change(ctx, "chain add "+m.GetName(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		cm := config.ChainMember{Name: m.GetName(), Object: m.GetObject(), Program: m.GetProgram(), ContinueOn: m.GetContinueOn()}
		if m.GetHasContinueOn() && cm.ContinueOn == nil {
			cm.ContinueOn = []string{} // given empty: refused as the file's would be
		}
		if m.GetHasPriority() {
			p := int(m.GetPriority())
			cm.Priority = &p
		}
		line, err := ch.AddMember(file, cm)
		return []string{line}, err
	})
}

// RemoveChainMember implements controlpb.ControlServer.
func (d *daemon) RemoveChainMember(ctx context.Context, req *controlpb.RemoveChainMemberRequest) (*controlpb.ChangeResponse, error) {
	return d.change(ctx, "chain remove "+req.GetName(), func(file *config.Config, ch *live.Changes) ([]string, error) {
		if req.GetName() == "xlb" {
			return nil, invalid(errors.New("xlb is xlb's own pipeline, not a member to remove"))
		}
		line, err := ch.RemoveMember(file, req.GetName())
		return []string{line}, err
	})
}

// serviceFromPB turns an AddService request's service into a configured
// one (checked later with the whole configuration).
func serviceFromPB(spec *controlpb.ServiceSpec, defaultPolicy string) (config.Service, error) {
	vip, err := netip.ParseAddrPort(spec.GetVip())
	if err != nil {
		return config.Service{}, fmt.Errorf("vip %q is not VIP:PORT", spec.GetVip())
	}
	s := config.Service{VIP: vip, Protocol: cmp.Or(spec.GetProtocol(), "tcp"), Policy: cmp.Or(spec.GetPolicy(), defaultPolicy),
		AllDown: cmp.Or(spec.GetAllDown(), config.AllDownRST)}
	for _, b := range spec.GetBackends() {
		a, err := netip.ParseAddrPort(b.GetAddress())
		if err != nil {
			return config.Service{}, fmt.Errorf("backend %q is not IP:PORT", b.GetAddress())
		}
		w := b.GetWeight()
		if !b.GetHasWeight() && w == 0 {
			w = 1
		}
		s.Backends = append(s.Backends, config.Backend{Address: a, Weight: w})
	}
	for _, a := range spec.GetSourceAddresses() {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return config.Service{}, fmt.Errorf("source address %q is not an IP address", a)
		}
		s.SourceAddresses = append(s.SourceAddresses, netip.PrefixFrom(ip, ip.BitLen()))
	}
	if h := spec.GetHealth(); h != nil {
		s.Health = &config.Health{Check: h.GetCheck(), Interval: h.GetInterval().AsDuration(), Timeout: h.GetTimeout().AsDuration(),
			Rise: int(h.GetRise()), Fall: int(h.GetFall()),
			HTTP: config.HTTPCheck{Path: h.GetHttpPath(), Host: h.GetHttpHost(), ExpectStatus: int(h.GetHttpExpectStatus())}}
		if h.GetResetEstablished() {
			yes := true
			s.Health.ResetEstablished = &yes
		}
	}
	return s, nil
}
