package metrics

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/xlb-project/xlb/dispatcher"
)

// script is a Source that returns its snapshots in turn, for the
// collector's own arithmetic; the end-to-end test (cmd/xlbd TestMetrics)
// scrapes the real xlbd.
type script struct{ snaps []Snapshot }

func (s *script) Snapshot(context.Context) (Snapshot, error) {
	snap := s.snaps[0]
	if len(s.snaps) > 1 {
		s.snaps = s.snaps[1:]
	}
	return snap, nil
}

var (
	vip = netip.MustParseAddrPort("10.0.0.10:80")
	bkA = netip.MustParseAddrPort("10.0.0.21:8080")
	bkB = netip.MustParseAddrPort("10.0.0.22:8080")
)

func service(backends ...Backend) Snapshot {
	return Snapshot{
		Counters: map[string]uint64{"fwd": 1, "drop_no_conn": 2, "pass_not_ours": 3, "tailcall_fail": 4, "new_conn": 5, "something_new": 6,
			"rst_no_port": 7, "syn_challenge": 8, "untrusted_rst_fin": 9},
		Services: []Service{{VIP: vip, Policy: "hash", Backends: backends}},
		Ports:    PortUse{Used: 1, Held: 2, Capacity: 8},
		Plugins:  []Plugin{{Policy: "hash", Up: true, Restarts: 1}},
	}
}

func bk(a netip.AddrPort, active int64, created uint64) Backend {
	return Backend{Address: a, Up: true, State: "up", Health: "passing", Stats: dispatcher.BackendStats{Active: active, NewConns: created, HalfOpen: 1, NoPort: 2},
		Ports: dispatcher.PortUse{Used: 3, Held: 4}, PortPool: 22768}
}

func gather(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	fams, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		out[f.GetName()] = f
	}
	return out
}

func sample(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
next:
	for _, m := range fams[name].GetMetric() {
		for k, v := range labels {
			if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == k && l.GetValue() == v }) {
				continue next
			}
		}
		if m.Counter != nil {
			return m.GetCounter().GetValue(), true
		}
		return m.GetGauge().GetValue(), true
	}
	return 0, false
}

func TestCounters(t *testing.T) {
	m := New(&script{snaps: []Snapshot{service(bk(bkA, 2, 5))}})
	fams := gather(t, m)
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"xlb_transmitted_packets_total", map[string]string{"direction": "to_backend"}, 1},
		{"xlb_dropped_packets_total", map[string]string{"reason": "no_conn"}, 2},
		{"xlb_passed_packets_total", map[string]string{"reason": "not_ours"}, 3},
		{"xlb_passed_packets_total", map[string]string{"reason": "tailcall_fail"}, 4},
		{"xlb_connection_events_total", map[string]string{"event": "new_conn"}, 5},
		{"xlb_datapath_events_total", map[string]string{"counter": "something_new"}, 6},
		{"xlb_rejected_syns_total", map[string]string{"reason": "no_port"}, 7},
		{"xlb_syn_defence_total", map[string]string{"event": "challenge"}, 8},
		{"xlb_connection_events_total", map[string]string{"event": "untrusted_rst_fin"}, 9},
		{"xlb_source_port_ways", map[string]string{"state": "used"}, 1},
		{"xlb_source_port_ways", map[string]string{"state": "held"}, 2},
		{"xlb_source_port_ways_capacity", nil, 8},
		{"xlb_policy_plugin_up", map[string]string{"policy": "hash"}, 1},
		{"xlb_policy_plugin_restarts_total", map[string]string{"policy": "hash"}, 1},
		{"xlb_backend_active_connections", map[string]string{"service": vip.String(), "backend": bkA.String()}, 2},
		{"xlb_backend_new_connections_total", map[string]string{"service": vip.String(), "backend": bkA.String()}, 5},
		{"xlb_service_info", map[string]string{"service": vip.String(), "policy": "hash"}, 1},
		{"xlb_backend_up", map[string]string{"service": vip.String(), "backend": bkA.String()}, 1},
		{"xlb_backend_half_open_connections", map[string]string{"service": vip.String(), "backend": bkA.String()}, 1},
		{"xlb_backend_no_port_total", map[string]string{"service": vip.String(), "backend": bkA.String()}, 2},
		{"xlb_backend_source_ports_used", map[string]string{"service": vip.String(), "backend": bkA.String()}, 3},
		{"xlb_backend_source_ports_resting", map[string]string{"service": vip.String(), "backend": bkA.String()}, 4},
		{"xlb_backend_source_port_pool", map[string]string{"service": vip.String(), "backend": bkA.String()}, 22768},
	} {
		if got, ok := sample(fams, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
}

// TestServiceCounterNeverDrops removes and re-adds backends between
// scrapes: the service's new-connection counter must only grow.
func TestServiceCounterNeverDrops(t *testing.T) {
	steps := []struct {
		snap Snapshot
		want float64
	}{
		{service(bk(bkA, 1, 5), bk(bkB, 1, 3)), 8},
		{service(bk(bkA, 1, 6)), 9},                 // b removed: its 3 carried
		{service(bk(bkA, 1, 7), bk(bkB, 0, 1)), 11}, // b back with a fresh count
		{service(bk(bkA, 1, 7), bk(bkB, 0, 0)), 11}, // b removed and added again between scrapes
	}
	src := &script{}
	m := New(src)
	for i, s := range steps {
		src.snaps = []Snapshot{s.snap}
		got, ok := sample(gather(t, m), "xlb_service_new_connections_total", map[string]string{"service": vip.String()})
		if !ok || got != s.want {
			t.Errorf("step %d: service new connections %v, want %v", i, got, s.want)
		}
	}
}

var metricName = regexp.MustCompile(`\bxlb_[a-z0-9_]+`)

// TestDashboard checks that docs/grafana-dashboard.json is valid JSON,
// that every metric its queries use is exported, and that it shows
// every metric xlbd exports.
func TestDashboard(t *testing.T) {
	raw, err := os.ReadFile("../../docs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash map[string]any
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("dashboard is not valid JSON: %v", err)
	}
	var exprs []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "query" || k == "definition") {
					exprs = append(exprs, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
	if len(exprs) < 10 {
		t.Fatalf("found %d queries in the dashboard", len(exprs))
	}

	exported := map[string]bool{}
	fams := gather(t, New(&script{snaps: []Snapshot{service(bk(bkA, 1, 1))}}))
	for name, f := range fams {
		exported[name] = true
		if f.GetType() == dto.MetricType_HISTOGRAM {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				exported[name+suffix] = true
			}
		}
	}
	used := map[string]bool{}
	for _, e := range exprs {
		for _, name := range metricName.FindAllString(e, -1) {
			used[name] = true
			if !exported[name] {
				t.Errorf("dashboard query %q uses %s, which xlbd does not export", e, name)
			}
		}
	}
	for name, f := range fams {
		if !metricName.MatchString(name) || name == "xlb_datapath_events_total" { // a fallback for counters not yet named
			continue
		}
		shown := used[name]
		if f.GetType() == dto.MetricType_HISTOGRAM {
			shown = used[name+"_bucket"] || used[name+"_sum"]
		}
		if !shown {
			t.Errorf("the dashboard does not show %s", name)
		}
	}
}

// TestBackendStateAndHealth: xlb_backend_state is 1 for the backend's state
// only, and xlb_backend_health_check is 1 for its check's result only and
// absent for a backend without a check.
func TestBackendStateAndHealth(t *testing.T) {
	a, b := bk(bkA, 0, 0), bk(bkB, 0, 0)
	a.Up, a.State, a.Health = false, "down", "failing"
	b.State, b.Health = "draining", ""
	fams := gather(t, New(&script{snaps: []Snapshot{service(a, b)}}))
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"xlb_backend_up", map[string]string{"backend": bkA.String()}, 0},
		{"xlb_backend_state", map[string]string{"backend": bkA.String(), "state": "down"}, 1},
		{"xlb_backend_state", map[string]string{"backend": bkA.String(), "state": "up"}, 0},
		{"xlb_backend_state", map[string]string{"backend": bkA.String(), "state": "draining"}, 0},
		{"xlb_backend_state", map[string]string{"backend": bkB.String(), "state": "draining"}, 1},
		{"xlb_backend_state", map[string]string{"backend": bkB.String(), "state": "up"}, 0},
		{"xlb_backend_health_check", map[string]string{"backend": bkA.String(), "result": "failing"}, 1},
		{"xlb_backend_health_check", map[string]string{"backend": bkA.String(), "result": "passing"}, 0},
		{"xlb_backend_health_check", map[string]string{"backend": bkA.String(), "result": "unchecked"}, 0},
	} {
		if got, ok := sample(fams, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
	if _, ok := sample(fams, "xlb_backend_health_check", map[string]string{"backend": bkB.String()}); ok {
		t.Error("xlb_backend_health_check exported for a backend without a check")
	}
}
