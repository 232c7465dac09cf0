// Package metrics exports xlb's figures to Prometheus. A collector reads
// the data path at scrape time through a Source (xlbd): the global
// counters, each backend's figures, the source-port table's use and the
// policy plugins; the policy swap time is a histogram that xlbd observes.
//
// Per-backend figures are defined once, in BackendFigures: the collector
// and `xlbctl stats` (through the control socket) both read that table, so
// a figure the data path starts keeping, such as packets and bytes per
// backend, is one more row there.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/xlb-project/xlb/dispatcher"
)

// Snapshot is the state the collector exports, read at scrape time.
type Snapshot struct {
	// Counters are the data path's global counters by name, summed over
	// CPUs (dispatcher.Pipeline.Stats).
	Counters map[string]uint64
	Services []Service
	Ports    PortUse
	Plugins  []Plugin
}

// Service is a configured service and its backends.
type Service struct {
	VIP      netip.AddrPort
	Protocol string // tcp or udp: a VIP and port may carry a service of each
	Policy   string
	Backends []Backend
}

// key tells services apart: by VIP and protocol.
func (s Service) key() string { return s.VIP.String() + "/" + s.Protocol }

// Backend is a configured backend with the data path's figures for it.
type Backend struct {
	Address netip.AddrPort
	Up      bool // takes new connections
	// State is one of BackendStates: why it takes new connections or not.
	State string
	// Health is one of HealthResults, or "" when it has no health check.
	Health string
	Stats  dispatcher.BackendStats
	// Traffic is the packets and bytes the data path forwarded to and
	// from the backend (dispatcher.Pipeline.BackendTraffic).
	Traffic dispatcher.Traffic
	// Ports are the source-port ways of its connections, live and
	// resting; PortPool is how many ports it has (its service's
	// source addresses times the range).
	Ports    dispatcher.PortUse
	PortPool int
}

// PortUse counts source-port ways (dispatcher.Pipeline.PortsInUse):
// taken by a connection, held for a backend's TIME_WAIT, and all there are.
type PortUse struct {
	Used, Held, Capacity int
}

// BackendStates are the values of Backend.State, each a label value of
// xlb_backend_state.
var BackendStates = []string{"up", "down", "draining"}

// HealthResults are the values of Backend.Health, each a label value of
// xlb_backend_health_check.
var HealthResults = []string{"unchecked", "passing", "failing"}

// Plugin is a policy's plugin process.
type Plugin struct {
	Policy   string
	Up       bool
	Restarts int
}

// Source gives the collector a snapshot at each scrape.
type Source interface {
	Snapshot(ctx context.Context) (Snapshot, error)
}

// Kind says how a figure behaves.
type Kind int

// Kinds of figures.
const (
	Gauge   Kind = iota // a value now
	Counter             // only grows while its backend is configured
)

// BackendFigure is one per-backend figure of the data path.
type BackendFigure struct {
	Key    string // name in the control protocol's BackendStats and in `xlbctl stats`
	Metric string // Prometheus metric name
	Help   string
	Kind   Kind
	Value  func(Backend) float64
}

// BackendFigures are the per-backend figures, in the order `xlbctl stats`
// shows them. The data path keeps them in xlb_bk_stats
// (dispatcher.BackendStats).
var BackendFigures = []BackendFigure{
	{
		Key: "active", Metric: "xlb_backend_active_connections", Kind: Gauge,
		Help:  "Open connections to the backend (the data path's count; a connection stops counting at its close or expiry).",
		Value: func(b Backend) float64 { return float64(max(b.Stats.Active, 0)) },
	},
	{
		Key: "new_conns", Metric: "xlb_backend_new_connections_total", Kind: Counter,
		Help:  "Connections the data path has given the backend since it was configured.",
		Value: func(b Backend) float64 { return float64(b.Stats.NewConns) },
	},
	{
		Key: "half_open", Metric: "xlb_backend_half_open_connections", Kind: Gauge,
		Help:  "Connections to the backend whose handshake is not complete.",
		Value: func(b Backend) float64 { return float64(max(b.Stats.HalfOpen, 0)) },
	},
	{
		Key: "no_port", Metric: "xlb_backend_no_port_total", Kind: Counter,
		Help:  "SYNs for the backend refused for want of a free source port.",
		Value: func(b Backend) float64 { return float64(b.Stats.NoPort) },
	},
	{
		Key: "ports_used", Metric: "xlb_backend_source_ports_used", Kind: Gauge,
		Help:  "Source ports held by the backend's live connections.",
		Value: func(b Backend) float64 { return float64(b.Ports.Used) },
	},
	{
		Key: "ports_held", Metric: "xlb_backend_source_ports_resting", Kind: Gauge,
		Help:  "Source ports of the backend resting after their connection ended (conntrack.timeouts.time-wait).",
		Value: func(b Backend) float64 { return float64(b.Ports.Held) },
	},
	{
		Key: "port_pool", Metric: "xlb_backend_source_port_pool", Kind: Gauge,
		Help:  "Source ports the backend has: the range on each of its service's source addresses (backends sharing a port way share them).",
		Value: func(b Backend) float64 { return float64(b.PortPool) },
	},
	{
		Key: "packets_in", Metric: "xlb_backend_packets_in_total", Kind: Counter,
		Help:  "Packets the data path forwarded to the backend (client to backend).",
		Value: func(b Backend) float64 { return float64(b.Traffic.ToBackendPackets) },
	},
	{
		Key: "packets_out", Metric: "xlb_backend_packets_out_total", Kind: Counter,
		Help:  "Packets the data path brought back from the backend (backend to client).",
		Value: func(b Backend) float64 { return float64(b.Traffic.FromBackendPackets) },
	},
	{
		Key: "bytes_in", Metric: "xlb_backend_bytes_in_total", Kind: Counter,
		Help:  "Bytes of IP packets the data path forwarded to the backend, as they left xlb.",
		Value: func(b Backend) float64 { return float64(b.Traffic.ToBackendBytes) },
	},
	{
		Key: "bytes_out", Metric: "xlb_backend_bytes_out_total", Kind: Counter,
		Help:  "Bytes of IP packets the data path brought back from the backend, as they left xlb.",
		Value: func(b Backend) float64 { return float64(b.Traffic.FromBackendBytes) },
	},
}

// Metric names of figures that are not per backend.
const (
	nameBackendUp      = "xlb_backend_up"
	nameBackendState   = "xlb_backend_state"
	nameBackendHealth  = "xlb_backend_health_check"
	nameServiceActive  = "xlb_service_active_connections"
	nameServiceNew     = "xlb_service_new_connections_total"
	nameServiceInfo    = "xlb_service_info"
	nameDropped        = "xlb_dropped_packets_total"
	namePassed         = "xlb_passed_packets_total"
	nameTransmitted    = "xlb_transmitted_packets_total"
	nameConnEvents     = "xlb_connection_events_total"
	nameRejected       = "xlb_rejected_syns_total"
	nameSYNDefence     = "xlb_syn_defence_total"
	nameOther          = "xlb_datapath_events_total"
	namePortWays       = "xlb_source_port_ways"
	namePortCapacity   = "xlb_source_port_ways_capacity"
	namePluginUp       = "xlb_policy_plugin_up"
	namePluginRestarts = "xlb_policy_plugin_restarts_total"
	nameSwapSeconds    = "xlb_policy_swap_seconds"
	nameScrapeErrors   = "xlb_scrape_errors_total"
)

// counterMetric maps a data path counter's name (from the enum xlb_stat)
// to its metric and label. Drop and pass reasons come from the name's
// prefix, so a reason added to the data path is exported without a
// change here.
func counterMetric(name string) (metric, labelValue string) {
	switch {
	case strings.HasPrefix(name, "drop_"):
		return nameDropped, strings.TrimPrefix(name, "drop_")
	case strings.HasPrefix(name, "pass_"):
		return namePassed, strings.TrimPrefix(name, "pass_")
	case strings.HasPrefix(name, "rst_"):
		return nameRejected, strings.TrimPrefix(name, "rst_")
	case strings.HasPrefix(name, "syn_"):
		return nameSYNDefence, strings.TrimPrefix(name, "syn_")
	case name == "tailcall_fail":
		return namePassed, name
	case name == "fwd":
		return nameTransmitted, "to_backend"
	case name == "ret":
		return nameTransmitted, "to_client"
	case name == "redirect":
		return nameTransmitted, "redirected"
	case name == "new_conn", name == "recycled", name == "closed", name == "evicted", name == "untrusted_rst_fin", name == "reset_no_conn":
		return nameConnEvents, name
	}
	return nameOther, name
}

// Metrics is xlb's Prometheus registry.
type Metrics struct {
	reg  *prometheus.Registry
	swap prometheus.Histogram
}

// New returns a registry with the collector reading src, the policy swap
// histogram, and Go's process and runtime collectors.
func New(src Source) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		swap: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: nameSwapSeconds,
			Help: "Time from a policy swap request (xlbctl policy set) to the new selection tables in force, starting the new plugin included.",
			// From 5 ms to about 10 s.
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}),
	}
	m.reg.MustRegister(newCollector(src), m.swap,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveSwap records a policy swap's duration.
func (m *Metrics) ObserveSwap(d time.Duration) { m.swap.Observe(d.Seconds()) }

// Gatherer is the registry, for tests and other exporters.
func (m *Metrics) Gatherer() prometheus.Gatherer { return m.reg }

// Listen opens addr for Serve; it is separate so that a bad address is
// found before anything else is set up.
func Listen(addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	return l, nil
}

// Serve answers /metrics on l until ctx ends, then closes l.
func (m *Metrics) Serve(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	if err := serveHTTP(ctx, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, l); err != nil {
		return fmt.Errorf("serve metrics: %w", err)
	}
	return nil
}

// serveHTTP serves srv on l until ctx ends, then shuts it down, giving
// requests in flight 2 s.
func serveHTTP(ctx context.Context, srv *http.Server, l net.Listener) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	err := srv.Serve(l)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// collector reads a Snapshot at each scrape.
type collector struct {
	src Source

	backend        []*prometheus.Desc // by BackendFigures index
	backendUp      *prometheus.Desc
	backendState   *prometheus.Desc
	backendHealth  *prometheus.Desc
	serviceActive  *prometheus.Desc
	serviceNew     *prometheus.Desc
	serviceInfo    *prometheus.Desc
	dropped        *prometheus.Desc
	passed         *prometheus.Desc
	transmitted    *prometheus.Desc
	connEvents     *prometheus.Desc
	rejected       *prometheus.Desc
	synDefence     *prometheus.Desc
	other          *prometheus.Desc
	portWays       *prometheus.Desc
	portCapacity   *prometheus.Desc
	pluginUp       *prometheus.Desc
	pluginRestarts *prometheus.Desc
	scrapeErrors   *prometheus.Desc

	mu      sync.Mutex
	errors  uint64
	seen    map[string]map[netip.AddrPort]uint64 // service key -> backend -> new connections at the last scrape
	carried map[string]uint64                    // service key -> new connections of its removed backends
}

func newCollector(src Source) *collector {
	c := &collector{
		src:            src,
		backendUp:      prometheus.NewDesc(nameBackendUp, "Whether the backend takes new connections (1) or not (0): its next hop does not answer ARP, its health check fails or its weight is 0 (xlb_backend_state says which).", []string{"service", "protocol", "backend"}, nil),
		backendState:   prometheus.NewDesc(nameBackendState, "The backend's state: 1 for the state it is in (up, down or draining), 0 for the others.", []string{"service", "protocol", "backend", "state"}, nil),
		backendHealth:  prometheus.NewDesc(nameBackendHealth, "What the backend's health check finds: 1 for its result (unchecked, passing or failing), 0 for the others; absent for a backend without a check.", []string{"service", "protocol", "backend", "result"}, nil),
		serviceActive:  prometheus.NewDesc(nameServiceActive, "Open connections of the service (the sum over its backends).", []string{"service", "protocol"}, nil),
		serviceNew:     prometheus.NewDesc(nameServiceNew, "Connections the data path has created for the service, its removed backends' included (those counted until the scrape before their removal).", []string{"service", "protocol"}, nil),
		serviceInfo:    prometheus.NewDesc(nameServiceInfo, "A configured service and its policy (always 1).", []string{"service", "protocol", "policy"}, nil),
		dropped:        prometheus.NewDesc(nameDropped, "Packets the data path dropped, by reason.", []string{"reason"}, nil),
		passed:         prometheus.NewDesc(namePassed, "Packets the data path handed to the kernel untouched, by reason.", []string{"reason"}, nil),
		transmitted:    prometheus.NewDesc(nameTransmitted, "Packets the data path rewrote and sent: to a backend, to a client, or redirected through another interface (also counted in to_backend or to_client).", []string{"direction"}, nil),
		connEvents:     prometheus.NewDesc(nameConnEvents, "Connection table events: new_conn (created), closed (FIN/RST seen), recycled (an ended entry replaced by a new SYN), evicted (a live entry replaced because its window was full), untrusted_rst_fin (a RST or FIN outside the tracked window: forwarded, state kept), reset_no_conn (a segment for a VIP that belongs to no connection, answered with a RST).", []string{"event"}, nil),
		rejected:       prometheus.NewDesc(nameRejected, "SYNs the data path answered with a RST, by reason: no_backend (no usable backend), no_port (no free source port for the backend).", []string{"reason"}, nil),
		synDefence:     prometheus.NewDesc(nameSYNDefence, "SYN flood defence: challenge (SYNs answered with a challenge), validated (sources that answered one).", []string{"event"}, nil),
		other:          prometheus.NewDesc(nameOther, "Data path counters not exported under another name.", []string{"counter"}, nil),
		portWays:       prometheus.NewDesc(namePortWays, "Source-port ways by state: used by a connection, or held for a backend's TIME_WAIT.", []string{"state"}, nil),
		portCapacity:   prometheus.NewDesc(namePortCapacity, "Source-port ways there are: the ports of source-ports times the ways per port.", nil, nil),
		pluginUp:       prometheus.NewDesc(namePluginUp, "Whether the policy's plugin process is running (1) or down and waiting to be restarted (0).", []string{"policy"}, nil),
		pluginRestarts: prometheus.NewDesc(namePluginRestarts, "Restarts of the policy's plugin after it exited, hung or failed to start.", []string{"policy"}, nil),
		scrapeErrors:   prometheus.NewDesc(nameScrapeErrors, "Scrapes that could not read the data path.", nil, nil),
		seen:           make(map[string]map[netip.AddrPort]uint64),
		carried:        make(map[string]uint64),
	}
	for _, f := range BackendFigures {
		c.backend = append(c.backend, prometheus.NewDesc(f.Metric, f.Help, []string{"service", "protocol", "backend"}, nil))
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.backend {
		ch <- d
	}
	for _, d := range []*prometheus.Desc{c.backendUp, c.backendState, c.backendHealth, c.serviceActive, c.serviceNew, c.serviceInfo, c.dropped, c.passed,
		c.transmitted, c.connEvents, c.rejected, c.synDefence, c.other, c.portWays, c.portCapacity, c.pluginUp, c.pluginRestarts, c.scrapeErrors} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap, err := c.src.Snapshot(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.errors++
		ch <- prometheus.NewInvalidMetric(c.scrapeErrors, err)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.scrapeErrors, prometheus.CounterValue, float64(c.errors))
	for name, v := range snap.Counters {
		metric, value := counterMetric(name)
		ch <- prometheus.MustNewConstMetric(c.descFor(metric), prometheus.CounterValue, float64(v), value)
	}
	c.collectServices(ch, snap.Services)
	ch <- prometheus.MustNewConstMetric(c.portWays, prometheus.GaugeValue, float64(snap.Ports.Used), "used")
	ch <- prometheus.MustNewConstMetric(c.portWays, prometheus.GaugeValue, float64(snap.Ports.Held), "held")
	ch <- prometheus.MustNewConstMetric(c.portCapacity, prometheus.GaugeValue, float64(snap.Ports.Capacity))
	for _, p := range snap.Plugins {
		ch <- prometheus.MustNewConstMetric(c.pluginUp, prometheus.GaugeValue, oneIf(p.Up), p.Policy)
		ch <- prometheus.MustNewConstMetric(c.pluginRestarts, prometheus.CounterValue, float64(p.Restarts), p.Policy)
	}
}

// oneIf is 1 when b holds, else 0.
func oneIf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *collector) descFor(metric string) *prometheus.Desc {
	switch metric {
	case nameDropped:
		return c.dropped
	case namePassed:
		return c.passed
	case nameTransmitted:
		return c.transmitted
	case nameConnEvents:
		return c.connEvents
	case nameRejected:
		return c.rejected
	case nameSYNDefence:
		return c.synDefence
	}
	return c.other
}

// collectServices exports per-backend figures and per-service sums. A
// service's new-connection counter must not go down when a backend is
// removed, so the last count seen of a removed backend is carried over;
// connections it got between that scrape and its removal are not.
// Caller holds c.mu.
func (c *collector) collectServices(ch chan<- prometheus.Metric, services []Service) {
	alive := make(map[string]bool, len(services))
	for _, s := range services {
		svc, key := s.VIP.String(), s.key()
		alive[key] = true
		ch <- prometheus.MustNewConstMetric(c.serviceInfo, prometheus.GaugeValue, 1, svc, s.Protocol, s.Policy)
		prev := c.seen[key]
		now := make(map[netip.AddrPort]uint64, len(s.Backends))
		var active, created float64
		for _, b := range s.Backends {
			for i, f := range BackendFigures {
				vt := prometheus.GaugeValue
				if f.Kind == Counter {
					vt = prometheus.CounterValue
				}
				ch <- prometheus.MustNewConstMetric(c.backend[i], vt, f.Value(b), svc, s.Protocol, b.Address.String())
			}
			ch <- prometheus.MustNewConstMetric(c.backendUp, prometheus.GaugeValue, oneIf(b.Up), svc, s.Protocol, b.Address.String())
			for _, st := range BackendStates {
				ch <- prometheus.MustNewConstMetric(c.backendState, prometheus.GaugeValue, oneIf(b.State == st), svc, s.Protocol, b.Address.String(), st)
			}
			if b.Health != "" {
				for _, r := range HealthResults {
					ch <- prometheus.MustNewConstMetric(c.backendHealth, prometheus.GaugeValue, oneIf(b.Health == r), svc, s.Protocol, b.Address.String(), r)
				}
			}
			active += float64(max(b.Stats.Active, 0))
			created += float64(b.Stats.NewConns)
			now[b.Address] = b.Stats.NewConns
		}
		for addr, n := range prev {
			// Gone, or removed and added again (its count restarted).
			if m, ok := now[addr]; !ok || m < n {
				c.carried[key] += n
			}
		}
		c.seen[key] = now
		ch <- prometheus.MustNewConstMetric(c.serviceActive, prometheus.GaugeValue, active, svc, s.Protocol)
		ch <- prometheus.MustNewConstMetric(c.serviceNew, prometheus.CounterValue, created+float64(c.carried[key]), svc, s.Protocol)
	}
	for key := range c.seen {
		if !alive[key] {
			delete(c.seen, key)
			delete(c.carried, key)
		}
	}
}
