package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/xlb-project/xlb/dispatcher"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/xlb-project/xlb/internal/control"
	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
)

const metricsAddr = "127.0.0.1:9190"

// scrape fetches xlbd's /metrics from inside the load balancer's
// namespace and parses it with Prometheus' text parser.
func (tp *topo) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := tp.lb.NS.HTTPClient(false).Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape: %s\n%s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	return fams
}

// value returns the value of the sample of family name whose labels
// include every label in want, and whether there is one.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range want {
			if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == k && l.GetValue() == v }) {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func mustValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	v, ok := value(fams, name, labels)
	if !ok {
		t.Fatalf("no sample %s%v in the scrape", name, labels)
	}
	return v
}

// TestMetrics sends requests through xlbd and checks that a scrape of its
// Prometheus endpoint counts them per backend, and shows the counters,
// the source-port table, the plugins and a policy swap.
func TestMetrics(t *testing.T) {
	tp := newTopo(t, "native", "--metrics-address", metricsAddr, "--log-format", "json")
	svc := tp.vip.String()
	backendA := fmt.Sprintf("%s:%d", tp.ba.IP, backendPort)
	backendB := fmt.Sprintf("%s:%d", tp.bb.IP, backendPort)

	fams := tp.scrape(t)
	for _, b := range []string{backendA, backendB} {
		if v := mustValue(t, fams, "xlb_backend_new_connections_total", map[string]string{"service": svc, "backend": b}); v != 0 {
			t.Errorf("backend %s has %v new connections before any request", b, v)
		}
	}
	for _, b := range []string{backendA, backendB} {
		if v := mustValue(t, fams, "xlb_backend_up", map[string]string{"service": svc, "backend": b}); v != 1 {
			t.Errorf("backend %s up = %v", b, v)
		}
	}
	if v := mustValue(t, fams, "xlb_source_port_ways_capacity", nil); v != float64((32767-10000+1)*dispatcher.PortWays) {
		t.Errorf("source-port capacity %v, want %d", v, (32767-10000+1)*dispatcher.PortWays)
	}

	// New connections, each a request: per-backend counts must be the
	// answers each backend gave.
	const n = 300
	seen := tp.split(t, "http://"+svc+"/", n)
	fams = tp.scrape(t)
	gotA := mustValue(t, fams, "xlb_backend_new_connections_total", map[string]string{"service": svc, "backend": backendA})
	gotB := mustValue(t, fams, "xlb_backend_new_connections_total", map[string]string{"service": svc, "backend": backendB})
	if int(gotA) != seen["backend-a"] || int(gotB) != seen["backend-b"] {
		t.Errorf("new connections: metrics a=%v b=%v, answers %v", gotA, gotB, seen)
	}
	// Each connection carried a SYN, an ACK and a request to its backend
	// and a SYN-ACK and an answer back; every packet is an IP packet of
	// 40 to 1500 bytes.
	for b, conns := range map[string]float64{backendA: gotA, backendB: gotB} {
		labels := map[string]string{"service": svc, "protocol": "tcp", "backend": b}
		in := mustValue(t, fams, "xlb_backend_packets_in_total", labels)
		out := mustValue(t, fams, "xlb_backend_packets_out_total", labels)
		bin := mustValue(t, fams, "xlb_backend_bytes_in_total", labels)
		bout := mustValue(t, fams, "xlb_backend_bytes_out_total", labels)
		if in < 3*conns || out < 2*conns || bin < 40*in || bin > 1500*in || bout < 40*out || bout > 1500*out {
			t.Errorf("backend %s after %v connections: packets in %v out %v, bytes in %v out %v", b, conns, in, out, bin, bout)
		}
	}
	if v := mustValue(t, fams, "xlb_service_new_connections_total", map[string]string{"service": svc}); v != n {
		t.Errorf("service new connections %v, want %d", v, n)
	}
	if v := mustValue(t, fams, "xlb_connection_events_total", map[string]string{"event": "new_conn"}); v != n {
		t.Errorf("new_conn events %v, want %d", v, n)
	}
	if v := mustValue(t, fams, "xlb_transmitted_packets_total", map[string]string{"direction": "to_backend"}); v < 3*n {
		t.Errorf("packets to backends %v, want at least %d for %d connections", v, 3*n, n)
	}
	if v := mustValue(t, fams, "xlb_transmitted_packets_total", map[string]string{"direction": "to_client"}); v < 3*n {
		t.Errorf("packets to clients %v, want at least %d", v, 3*n)
	}
	for _, reason := range []string{"no_conn", "fib", "bad_csum", "stale"} {
		mustValue(t, fams, "xlb_dropped_packets_total", map[string]string{"reason": reason})
	}
	for _, reason := range []string{"no_backend", "no_port"} {
		if v := mustValue(t, fams, "xlb_rejected_syns_total", map[string]string{"reason": reason}); v != 0 {
			t.Errorf("%v SYNs answered with a RST for %s", v, reason)
		}
	}
	mustValue(t, fams, "xlb_syn_defence_total", map[string]string{"event": "challenge"})
	mustValue(t, fams, "xlb_passed_packets_total", map[string]string{"reason": "not_ours"})
	if v := mustValue(t, fams, "xlb_passed_packets_total", map[string]string{"reason": "not_ipv4"}); v == 0 {
		t.Errorf("no packets passed as not IPv4 (ARP passes)")
	}
	if v := mustValue(t, fams, "xlb_policy_plugin_up", map[string]string{"policy": "random"}); v != 1 {
		t.Errorf("random plugin up = %v", v)
	}
	mustValue(t, fams, "xlb_policy_plugin_restarts_total", map[string]string{"policy": "random"})
	mustValue(t, fams, "xlb_service_info", map[string]string{"service": svc, "policy": "random"})
	if v := mustValue(t, fams, "xlb_policy_swap_seconds", nil); v != 0 {
		t.Errorf("%v policy swaps before any", v)
	}

	// Open connections are active; ports are in use while they are.
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < 4; i++ {
		c, err := tp.c1.NS.Dial(context.Background(), "tcp", svc)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := request(c); err != nil {
			t.Fatal(err)
		}
	}
	var active, used float64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		fams = tp.scrape(t)
		active = mustValue(t, fams, "xlb_service_active_connections", map[string]string{"service": svc})
		used = mustValue(t, fams, "xlb_source_port_ways", map[string]string{"state": "used"})
		if active == 4 {
			break
		}
	}
	if active != 4 {
		t.Errorf("service active connections %v with 4 open", active)
	}
	if used < 4 {
		t.Errorf("source-port ways used %v with 4 open connections", used)
	}
	var backendUsed, pool float64
	for _, b := range []string{backendA, backendB} {
		backendUsed += mustValue(t, fams, "xlb_backend_source_ports_used", map[string]string{"service": svc, "backend": b})
		pool = mustValue(t, fams, "xlb_backend_source_port_pool", map[string]string{"service": svc, "backend": b})
		mustValue(t, fams, "xlb_backend_half_open_connections", map[string]string{"service": svc, "backend": b})
		if v := mustValue(t, fams, "xlb_backend_no_port_total", map[string]string{"service": svc, "backend": b}); v != 0 {
			t.Errorf("backend %s: %v SYNs refused for want of a port", b, v)
		}
	}
	if backendUsed != used || pool != 32767-10000+1 {
		t.Errorf("backends' source ports used %v (all: %v), pool %v, want %d", backendUsed, used, pool, 32767-10000+1)
	}

	// A policy swap is timed.
	if out, err := tp.xlbctl(t, "policy", "set", "hash"); err != nil {
		t.Fatalf("policy set: %v: %s", err, out)
	}
	fams = tp.scrape(t)
	if v := mustValue(t, fams, "xlb_policy_swap_seconds", nil); v != 1 {
		t.Errorf("%v policy swaps counted after one", v)
	}
	if v := mustValue(t, fams, "xlb_policy_plugin_up", map[string]string{"policy": "hash"}); v != 1 {
		t.Errorf("hash plugin up = %v", v)
	}
	if _, ok := value(fams, "xlb_policy_plugin_up", map[string]string{"policy": "random"}); ok {
		t.Errorf("the random plugin is still exported after the swap")
	}

	// --log-format json: every line xlbd wrote is a JSON object.
	lines := strings.Split(strings.TrimSpace(tp.d.Output()), "\n")
	ready := false
	for _, l := range lines {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("log line is not JSON: %q", l)
			continue
		}
		if rec["msg"] == "ready" && rec["metrics_address"] == metricsAddr {
			ready = true
		}
	}
	if !ready {
		t.Errorf("no JSON \"ready\" record with metrics_address in the log:\n%s", tp.d.Output())
	}
}

// TestCLIAgainstDaemon runs xlbctl's stats and filtered conns against a
// real xlbd with connections open to both backends.
func TestCLIAgainstDaemon(t *testing.T) {
	tp := newTopo(t, "generic")
	svc := tp.vip.String()
	backendA := fmt.Sprintf("%s:%d", tp.ba.IP, backendPort)

	// Keep connections open until each backend has some.
	byBackend := map[string]int{}
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := 0; i < 64 && (byBackend["backend-a"] < 2 || byBackend["backend-b"] < 2); i++ {
		c, err := tp.c1.NS.Dial(context.Background(), "tcp", svc)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		b, err := request(c)
		if err != nil {
			t.Fatal(err)
		}
		byBackend[b]++
	}
	total := len(conns)

	t.Run("stats", func(t *testing.T) {
		out, err := tp.xlbctl(t, "stats")
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		t.Logf("xlbctl stats:\n%s", out)
		for _, want := range []string{"Prot LocalAddress:Port", "ActiveConn", "Conns", "InPkts", "OutBytes", "TCP  " + svc, "  -> " + backendA,
			"source-port ways:", "counters:", "new_conn"} {
			if !strings.Contains(out, want) {
				t.Errorf("stats lacks %q", want)
			}
		}
		fields := strings.Fields(lineWith(out, "TCP  "+svc))
		if len(fields) < 5 || fields[3] != fmt.Sprint(total) || fields[4] != fmt.Sprint(total) {
			t.Errorf("service row %q, want %d active and %d connections", fields, total, total)
		}
		fields = strings.Fields(lineWith(out, "  -> "+backendA))
		if len(fields) < 4 || fields[2] != fmt.Sprint(byBackend["backend-a"]) || fields[3] != fmt.Sprint(byBackend["backend-a"]) {
			t.Errorf("backend-a row %q, want %d active and connections", fields, byBackend["backend-a"])
		}

		out, err = tp.xlbctl(t, "stats", "--json")
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		st := &controlpb.Stats{}
		if err := protojson.Unmarshal([]byte(out), st); err != nil {
			t.Fatalf("stats --json: %v\n%s", err, out)
		}
		if len(st.Services) != 1 || len(st.Services[0].Backends) != 2 {
			t.Fatalf("stats --json services %+v", st.Services)
		}
		for _, b := range st.Services[0].Backends {
			name := "backend-a"
			if b.Address != backendA {
				name = "backend-b"
			}
			if n := uint64(byBackend[name]); b.Counters["packets_in"] < 3*n || b.Counters["packets_out"] < 2*n || b.Counters["bytes_in"] < 40*b.Counters["packets_in"] {
				t.Errorf("stats --json %s: traffic %+v after %d connections", b.Address, b.Counters, n)
			}
			if b.Counters["new_conns"] != uint64(byBackend[name]) || b.Gauges["active"] != int64(byBackend[name]) {
				t.Errorf("stats --json %s: %+v, want %d new and active", b.Address, b, byBackend[name])
			}
		}
	})

	t.Run("stats --rate", func(t *testing.T) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			c := tp.c2.NS.HTTPClient(false)
			for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
				if _, err := testnet.Get(t.Context(), c, "http://"+svc+"/"); err != nil {
					t.Errorf("request: %v", err)
					return
				}
			}
		}()
		out, err := tp.xlbctl(t, "stats", "--rate", "--interval", "1s", "--json")
		<-done
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		var r struct {
			Interval float64            `json:"interval_seconds"`
			Counters map[string]float64 `json:"counters_per_second"`
			Services []struct {
				Backends []struct {
					Rates map[string]float64 `json:"per_second"`
				} `json:"backends"`
			} `json:"services"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("stats --rate --json: %v\n%s", err, out)
		}
		cps := 0.0
		for _, b := range r.Services[0].Backends {
			cps += b.Rates["new_conns"]
		}
		if r.Interval < 1 || cps <= 0 || r.Counters["new_conn"] <= 0 {
			t.Errorf("rates while requests flowed: interval %v, backends' CPS %v, new_conn/s %v", r.Interval, cps, r.Counters["new_conn"])
		}
		out, err = tp.xlbctl(t, "stats", "--rate", "--interval", "200ms")
		if err != nil || !strings.Contains(out, "CPS") || !strings.Contains(out, "counters per second over") {
			t.Errorf("stats --rate: %v\n%s", err, out)
		}
	})

	t.Run("conns filters", func(t *testing.T) {
		count := func(args ...string) int {
			t.Helper()
			out, err := tp.xlbctl(t, append([]string{"conns", "--json"}, args...)...)
			if err != nil {
				t.Fatalf("xlbctl conns %v: %v: %s", args, err, out)
			}
			var r controlpb.ListConnsResponse
			if err := protojson.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("conns --json: %v\n%s", err, out)
			}
			f := &controlpb.ListConnsRequest{Vip: flagArg(args, "--vip"), Backend: flagArg(args, "--backend"), State: flagArg(args, "--state"),
				Protocol: flagArg(args, "--protocol")}
			for _, c := range r.GetConns() {
				if !control.MatchConn(f, c) {
					t.Errorf("conns %v listed %+v", args, c)
				}
			}
			return len(r.GetConns())
		}
		if n := count("--backend", backendA, "--state", "established"); n != byBackend["backend-a"] {
			t.Errorf("established connections to backend-a: %d, want %d", n, byBackend["backend-a"])
		}
		if n := count("--vip", svc, "--state", "established"); n != total {
			t.Errorf("established connections to %s: %d, want %d", svc, n, total)
		}
		if n := count("--vip", svc, "--protocol", "tcp"); n < total {
			t.Errorf("tcp connections to %s: %d, want at least %d", svc, n, total)
		}
		if n := count("--vip", svc, "--protocol", "udp"); n != 0 {
			t.Errorf("%d udp flows to the tcp service %s", n, svc)
		}
		if n := count("--vip", fmt.Sprintf("%s:81", tp.lb.IP)); n != 0 {
			t.Errorf("%d connections to a vip that does not exist", n)
		}
		out, err := tp.xlbctl(t, "conns", "--backend", backendA)
		if err != nil || strings.Count(out, backendA) < byBackend["backend-a"] || !strings.HasPrefix(out, "PROTO") {
			t.Errorf("conns --backend: %v\n%s", err, out)
		}
	})

	t.Run("completion asks xlbd", func(t *testing.T) {
		out, err := tp.xlbctl(t, "__complete", "conns", "--vip", "")
		if err != nil || !strings.Contains(out, svc+"\n") {
			t.Errorf("completion of --vip: %v\n%s", err, out)
		}
		out, err = tp.xlbctl(t, "__complete", "conns", "--backend", "")
		if err != nil || !strings.Contains(out, backendA+"\n") {
			t.Errorf("completion of --backend: %v\n%s", err, out)
		}
	})

	t.Run("xlbd's refusal is shown as it is", func(t *testing.T) {
		out, err := tp.xlbctl(t, "policy", "set", "no-such-policy")
		if err == nil || !strings.Contains(out, "no-such-policy") || strings.Contains(out, "Run 'xlbctl") {
			t.Errorf("policy set no-such-policy: %v\n%s", err, out)
		}
	})
}

func lineWith(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

func flagArg(args []string, name string) string {
	if i := slices.Index(args, name); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}
