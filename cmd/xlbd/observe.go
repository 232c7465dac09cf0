package main

import (
	"context"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/control"
	"github.com/xlb-project/xlb/internal/metrics"
	"github.com/xlb-project/xlb/plugins"
)

// Snapshot implements metrics.Source: the data path's counters, each
// backend's figures, the source-port table's use and the policy plugins,
// read now.
func (d *daemon) Snapshot(context.Context) (metrics.Snapshot, error) {
	pipe := d.bal.Pipeline()
	counters, err := pipe.Stats()
	if err != nil {
		return metrics.Snapshot{}, err
	}
	snap := metrics.Snapshot{Counters: counters}
	ports := pipe.PortUse()
	traffic, err := pipe.BackendTraffic()
	if err != nil {
		return metrics.Snapshot{}, err
	}
	for _, s := range d.bal.Services() {
		ms := metrics.Service{VIP: s.VIP, Protocol: s.Protocol.String(), Policy: s.Policy}
		for _, b := range s.Backends {
			st, err := pipe.BackendStats(b.ID)
			if err != nil {
				return metrics.Snapshot{}, err
			}
			ms.Backends = append(ms.Backends, metrics.Backend{Address: b.Address, Up: b.State == plugins.StateUp, Stats: st,
				Traffic: traffic[b.ID],
				Ports:   ports[b.Address], PortPool: s.PortPool})
		}
		snap.Services = append(snap.Services, ms)
	}
	used, held := pipe.PortsInUse()
	capacity := len(d.bal.SourceAddresses()) * pipe.PortPool() * dispatcher.PortWays
	snap.Ports = metrics.PortUse{Used: used, Held: held, Capacity: capacity}
	for _, p := range d.pol.Statuses() {
		snap.Plugins = append(snap.Plugins, metrics.Plugin{Policy: p.Name, Up: p.Pid > 0, Restarts: p.Restarts})
	}
	return snap, nil
}

// Stats implements control.Handler: the snapshot the metrics collector
// reads, with per-backend figures named as in metrics.BackendFigures.
func (d *daemon) Stats(ctx context.Context) (control.Stats, error) {
	snap, err := d.Snapshot(ctx)
	if err != nil {
		return control.Stats{}, err
	}
	st := control.Stats{
		Counters: snap.Counters,
		Ports:    control.PortUse{Used: snap.Ports.Used, Held: snap.Ports.Held, Capacity: snap.Ports.Capacity},
	}
	for _, s := range snap.Services {
		cs := control.ServiceStats{VIP: s.VIP.String(), Protocol: s.Protocol, Policy: s.Policy}
		for _, b := range s.Backends {
			cb := control.BackendStats{Address: b.Address.String(), Gauges: map[string]int64{}, Counters: map[string]uint64{}}
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
