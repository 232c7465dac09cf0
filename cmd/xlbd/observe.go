package main

import (
	"context"

	"github.com/xlb-project/xlb/dispatcher"
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
			mb := metrics.Backend{Address: b.Address, Up: b.State == plugins.StateUp, State: b.State.String(), Stats: st,
				Traffic: traffic[b.ID], Ports: ports[b.Address], PortPool: s.PortPool}
			if b.Checked {
				mb.Health = b.Health.Result.String()
			}
			ms.Backends = append(ms.Backends, mb)
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
