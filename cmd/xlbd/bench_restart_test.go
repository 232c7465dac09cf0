package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/xlbtest"
)

// BenchmarkRestart measures a restart that keeps the data path: from
// `xlbctl shutdown --keep-datapath` being asked to the new xlbd ready
// (its control socket answers, the pinned state adopted, the services
// reconciled with the configuration, the new programs swapped into the
// link), with the connection table empty and holding 100,000 connections
// (half-open connections made by SYNs from spoofed sources, with the SYN
// defence off and a syn timeout of 10 minutes, so none expires meanwhile).
// It reports the whole restart and the new xlbd's share of it: from its
// start to ready.
func BenchmarkRestart(b *testing.B) {
	for _, conns := range []int{0, 100000} {
		b.Run(fmt.Sprintf("%d connections", conns), func(b *testing.B) {
			ct := newConfigTopo(b, "native")
			pin := xlbtest.NewPinPath()
			src := ct.lan.AddrInSubnet(101)
			// Two source addresses give each of the three backends
			// 2 x 22768 ports: room for 100,000 connections.
			yaml := fmt.Sprintf("iface: eth0\npin-path: %s\nsource-addresses: [%s, %s]\nsyn-defence: {mode: off}\nconntrack: {timeouts: {syn: 10m}}\nservices:\n  - vip: %s\n    backends: [%s, %s, %s]\n",
				pin, ct.lb.IP, src, ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort), addr(ct.bc, backendPort))
			ct.start(b, yaml)
			if conns > 0 {
				fill(b, ct, conns)
			}
			var total, own time.Duration
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if err := ct.d.Client().Stop(context.Background(), true); err != nil {
					b.Fatal(err)
				}
				for done, _ := ct.d.Exited(); !done; done, _ = ct.d.Exited() {
					time.Sleep(time.Millisecond)
				}
				started := time.Now()
				ct.start(b, yaml)
				ready := time.Now()
				total += ready.Sub(start)
				own += ready.Sub(started)
				b.StopTimer()
				st, err := ct.d.Client().Status(context.Background())
				if err != nil {
					b.Fatal(err)
				}
				if a := st.GetState().GetAdopted(); a == nil || a.GetConnections() < uint64(conns) {
					b.Fatalf("adopted %+v, want %d connections", a, conns)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/restart")
			b.ReportMetric(float64(own.Microseconds())/1000/float64(b.N), "ms/start-to-ready")
		})
	}
}

// fill sends SYNs from spoofed sources until the load balancer counts at
// least n connections (a few SYNs are lost on the way).
func fill(tb testing.TB, ct *configTopo, n int) {
	tb.Helper()
	start := time.Now()
	sent := 0
	for try := 0; ; try++ {
		time.Sleep(500 * time.Millisecond)
		st, err := ct.d.Client().Status(context.Background())
		if err != nil {
			tb.Fatal(err)
		}
		got := int(activeSum(st))
		if got >= n {
			tb.Logf("%d connections in the table after %d spoofed SYNs, in %v", got, sent, time.Since(start))
			return
		}
		if try == 10 {
			tb.Fatalf("%d connections in the table after %d spoofed SYNs, want %d", got, sent, n)
		}
		sent += spoofSYNs(tb, ct.c2, ct.lb.MAC, ct.vip, n-got+n/100)
	}
}
