package main

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

const (
	benchWorkers  = 4
	benchDuration = 30 * time.Second
	benchMaxReqs  = 10000000
)

// BenchmarkEndToEnd measures HTTP requests per second from one client
// namespace, with a new connection per request (short) and over kept-alive
// connections, straight to the backends (direct) and through xlbd in
// native mode (xlb), 30 s each, direct first, in the same invocation; it
// reports both and ratio_to_direct. Direct requests alternate between
// backend-a and backend-b by worker, as xlb spreads them over both. The
// backends close each short connection first (the client asks for
// Connection: close), so they hold TIME_WAIT for every four-tuple; 30 s of
// short connections is several times the default source-port range per
// backend, so ports are reused under TIME_WAIT all along.
func BenchmarkEndToEnd(b *testing.B) {
	ct := newConfigTopo(b, "native")
	ct.start(b, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s, %s]\n",
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	direct := []string{
		fmt.Sprintf("http://%s/", addr(ct.ba, backendPort)),
		fmt.Sprintf("http://%s/", addr(ct.bb, backendPort)),
	}
	viaXLB := []string{"http://" + ct.vip.String() + "/"}

	for _, mode := range []struct {
		name      string
		keepAlive bool
	}{{"short", false}, {"keepalive", true}} {
		b.Run(mode.name, func(b *testing.B) {
			rps := func(b *testing.B, urls []string) float64 {
				client := ct.c1.NS.HTTPClient(mode.keepAlive)
				defer client.Transport.(*http.Transport).CloseIdleConnections()
				return measureRPS(b, client, urls)
			}
			before := ct.counters(b)
			d := rps(b, direct)
			x := rps(b, viaXLB)
			c := ct.counters(b)
			b.ReportMetric(d, "direct_req/s")
			b.ReportMetric(x, "xlb_req/s")
			b.ReportMetric(x/d, "ratio_to_direct")
			b.Logf("direct %.0f req/s, xlb %.0f req/s, ratio %.2f; through xlb: %d connections, %d refused for want of a port",
				d, x, x/d, c["new_conn"]-before["new_conn"], c["rst_no_port"]-before["rst_no_port"])
			if c["rst_no_port"] != before["rst_no_port"] {
				b.Errorf("SYNs refused for want of a source port")
			}
		})
	}
}

// measureRPS runs benchWorkers workers, worker i sending requests to
// urls[i%len(urls)], for benchDuration (at most benchMaxReqs requests)
// per b.N, and returns requests per second. Any failed request fails the
// benchmark.
func measureRPS(b *testing.B, client *http.Client, urls []string) float64 {
	b.Helper()
	var (
		total   int64
		elapsed time.Duration
	)
	for range b.N {
		var (
			done   atomic.Int64
			failed atomic.Int64
			first  error
			once   sync.Once
			wg     sync.WaitGroup
		)
		start := time.Now()
		deadline := start.Add(benchDuration)
		for w := range benchWorkers {
			url := urls[w%len(urls)]
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) && done.Load() < benchMaxReqs {
					if _, err := testnet.Get(b.Context(), client, url); err != nil {
						failed.Add(1)
						once.Do(func() { first = err })
						continue
					}
					done.Add(1)
				}
			}()
		}
		wg.Wait()
		elapsed += time.Since(start)
		total += done.Load()
		if n := failed.Load(); n > 0 {
			b.Fatalf("%d requests failed, first: %v", n, first)
		}
	}
	return float64(total) / elapsed.Seconds()
}
