package main

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	benchWorkers  = 4
	benchDuration = 2 * time.Second
	benchMaxReqs  = 200000
)

// BenchmarkEndToEnd measures HTTP requests per second from one client
// namespace, with a new connection per request (short) and over kept-alive
// connections, straight to the backends (direct) and through xlbd in
// native mode (xlb). Direct requests alternate between backend-a and
// backend-b by worker, as xlb spreads them over both. Each xlb case
// measures the direct figure again in the same invocation and reports
// ratio_to_direct from the two.
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
			b.Run("direct", func(b *testing.B) {
				b.ReportMetric(rps(b, direct), "req/s")
			})
			b.Run("xlb", func(b *testing.B) {
				d := rps(b, direct)
				x := rps(b, viaXLB)
				b.ReportMetric(x, "req/s")
				b.ReportMetric(x/d, "ratio_to_direct")
				b.Logf("direct %.0f req/s, xlb %.0f req/s", d, x)
			})
		})
	}
	if c := ct.counters(b); c["new_conn"] == 0 {
		b.Errorf("no connection went through xlb: %v", c)
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
					if _, err := get(b, client, url); err != nil {
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
