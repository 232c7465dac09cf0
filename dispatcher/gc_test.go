package dispatcher

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestGC expires connections with 1-second timeouts, in the data path (a
// SYN reusing an expired flow) and in the control plane (GC), and checks
// that ports rest for their hold before they serve again, that the data
// path takes a port whose hold has passed, and that backends are
// uncounted exactly once.
func TestGC(t *testing.T) {
	// 16 source ports (XLB_PORT_TRIES, so the port search covers the
	// range): the 17th connection to A is refused.
	const ports = 16
	e := newEnvPorts(t, 1024, portLo, portLo+ports-1)
	short := Timeouts{SYN: time.Second, Established: time.Second, FIN: time.Second, Closed: time.Second, TimeWait: time.Second}
	e.opts.ConntrackTimeout = short
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	s := seg{flags: "S", seq: 1}
	open := netip.AddrPortFrom(client1, 50000)
	other := netip.AddrPortFrom(client1, 50100)
	syn := func(cl netip.AddrPort, counters map[string]uint64) {
		t.Helper()
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), s) }, counters)
	}

	for i := range ports {
		syn(netip.AddrPortFrom(client1, 50000+uint16(i)), map[string]uint64{"fwd": 1, "new_conn": 1})
	}
	c := e.mustConn(open, vip)
	sa := seg{flags: "SA", ack: c.SeqDelta + 2}
	e.expect(t, e.p.Entry(), fromBackend(backendA, c.Source.Port(), sa), xdpTX, toClient(c, sa), map[string]uint64{"ret": 1})
	e.expect(t, e.p.Entry(), fromClient(other, vip, s), xdpTX, refusal(other, vip, s), map[string]uint64{"rst_no_port": 1})
	if a := e.backendStats(idA); a.Active != ports || a.HalfOpen != ports || a.NoPort != 1 {
		t.Errorf("full: %+v, want %d active and half-open, 1 refused", a, ports)
	}

	// Nothing is idle yet.
	res, err := e.p.GC(short)
	e.must(err)
	if res.Expired != 0 || res.Scanned != ports {
		t.Errorf("early sweep %+v, want %d scanned, none expired", res, ports)
	}

	// Half-open connections expire on the client's silence, the one the
	// backend answered too; their ports rest.
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Expired != ports {
		t.Errorf("sweep %+v, want %d expired", res, ports)
	}
	if a := e.backendStats(idA); a.Active != 0 || a.HalfOpen != 0 {
		t.Errorf("after the sweep: %+v, want nothing active or half-open", a)
	}
	if conns, _ := e.p.Conns(); len(conns) != 0 {
		t.Errorf("after the sweep: %d connections", len(conns))
	}
	if used, held := e.p.PortsInUse(); used != 0 || held != ports {
		t.Errorf("after the sweep: %d ports used, %d held; want all held", used, held)
	}
	// While they rest no new connection gets one ...
	e.expect(t, e.p.Entry(), fromClient(other, vip, s), xdpTX, refusal(other, vip, s), map[string]uint64{"rst_no_port": 1})
	// ... and once the hold has passed the data path takes one without
	// waiting for a sweep.
	time.Sleep(1100 * time.Millisecond)
	syn(other, map[string]uint64{"fwd": 1, "new_conn": 1})
	e.checkLport(t, e.mustConn(other, vip))
	res, err = e.p.GC(short)
	e.must(err)
	if res.Released != ports-1 {
		t.Errorf("sweep %+v, want %d holds released", res, ports-1)
	}

	// An established connection expired by GC is uncounted by GC.
	o := e.mustConn(other, vip)
	sa = seg{flags: "SA", seq: 100, ack: o.SeqDelta + 2}
	e.expect(t, e.p.Entry(), fromBackend(backendA, o.Source.Port(), sa), xdpTX, toClient(o, sa), map[string]uint64{"ret": 1})
	ack := seg{flags: "A", seq: 2, ack: 101}
	e.expect(t, e.p.Entry(), fromClient(other, vip, ack), xdpTX, toBackend(o, ack), map[string]uint64{"fwd": 1})
	if a := e.backendStats(idA); a.Active != 1 || a.HalfOpen != 0 {
		t.Errorf("established: %+v, want 1 active, none half-open", a)
	}
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Expired != 1 {
		t.Errorf("sweep %+v, want 1 expired", res)
	}
	if a := e.backendStats(idA).Active; a != 0 {
		t.Errorf("after sweeping an open connection: %d active, want 0", a)
	}

	// The data path recycles an expired entry when its client port comes
	// back with a SYN, uncounting the backend once.
	syn(open, map[string]uint64{"fwd": 1, "new_conn": 1})
	time.Sleep(1200 * time.Millisecond)
	syn(open, map[string]uint64{"fwd": 1, "new_conn": 1, "recycled": 1})
	if a := e.backendStats(idA); a.Active != 1 || a.HalfOpen != 1 {
		t.Errorf("after recycling: %+v, want 1 active and half-open", a)
	}

	// A return entry without its forward entry is an orphan.
	e.orphan(open, vip)
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Orphans != 1 || e.retEntries() != 0 {
		t.Errorf("sweep %+v with %d return entries left, want 1 orphan removed", res, e.retEntries())
	}
}

// TestPortReuseRate drives short connections that the backend closes
// first (SYN, SYN-ACK, ACK, the backend's FIN, the client's FIN, the last
// ACK) through the pipeline to one backend at 10,500 per second for 6 s,
// with the default range (22,768 ports) and hold (2 s), whose capacity is
// 22,768 / 2 s = 11,384 per second: almost three times the range, with no
// SYN refused. The data path takes a port back by itself once its hold
// has passed; no sweep runs.
func TestPortReuseRate(t *testing.T) {
	if testing.Short() {
		t.Skip("a 6 s run skipped in -short mode")
	}
	e := newEnvPorts(t, 1<<17, 10000, 32767)
	e.opts.ConntrackTimeout = Timeouts{SYN: 5 * time.Second, Established: time.Hour, FIN: time.Minute, Closed: 10 * time.Second}
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	const rate, secs = 10500, 6
	before := e.stats()
	start := time.Now()
	var n, refused int
	e.ns.Do(func() {
		tr := newTestRun(e.p.Entry(), e.lb0, 256)
		defer tr.close()
		for n = 0; n < rate*secs; n++ {
			if ahead := time.Duration(n)*time.Second/rate - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
			cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, byte(n >> 16), byte(n >> 8), byte(n)}), uint16(1024+n%60000))
			v, _, err := tr.run(fromClient(cl, vip, seg{flags: "S", seq: 1}))
			if err != nil {
				t.Fatal(err)
			}
			if v != xdpTX {
				t.Fatalf("syn %d: %s", n, verdictName(v))
			}
			// The port the SYN went out from: the rewritten packet.
			lport := binary.BigEndian.Uint16(tr.out[14+20:])
			if lport == 0 || tr.out[14+20+13]&0x04 != 0 {
				refused++
				continue
			}
			isn := binary.BigEndian.Uint32(tr.out[14+20+4:])
			steps := []struct {
				back bool
				s    seg
			}{
				{true, seg{flags: "SA", seq: 100, ack: isn + 1}},
				{false, seg{flags: "A", seq: 2, ack: 101}},
				{true, seg{flags: "FA", seq: 101, ack: isn + 1}},
				{false, seg{flags: "FA", seq: 2, ack: 102}},
				{true, seg{flags: "A", seq: 102, ack: isn + 2}},
			}
			for _, st := range steps {
				pkt := fromClient(cl, vip, st.s)
				if st.back {
					pkt = fromBackend(backendA, lport, st.s)
				}
				if v, _, err := tr.run(pkt); err != nil || v != xdpTX {
					t.Fatalf("connection %d, %s: %s, %v", n, st.s.flags, verdictName(v), err)
				}
			}
		}
	})
	took := time.Since(start)
	d := statsDelta(before, e.stats())
	t.Logf("%d connections closed by the backend in %v (%.0f/s); counters %v", n, took, float64(n)/took.Seconds(), d)
	if refused > 0 || d["rst_no_port"] > 0 {
		t.Errorf("%d SYNs refused for want of a port (rst_no_port %d)", refused, d["rst_no_port"])
	}
	if d["closed"] != uint64(n) {
		t.Errorf("%d connections closed, want %d", d["closed"], n)
	}
	if float64(n)/took.Seconds() < 10000 {
		t.Errorf("only %.0f connections/s: the machine could not keep the pace, the test proves nothing", float64(n)/took.Seconds())
	}
}

// BenchmarkSweepIdle reports what the conntrack sweeper costs with no
// connection at three table sizes (conntrack.max-entries): the default
// 262,144, 1 Mi and 16 Mi. It reports the time of one sweep
// (cpu_share_at_1s: the share of a core one sweep a second takes) and how
// much of the tables the sweep mapped into xlbd's memory (rss_mb_added).
// The sweep visits only what the occupancy bitmaps mark, so neither
// follows the tables' size beyond the bitmaps (a bit per slot).
func BenchmarkSweepIdle(b *testing.B) {
	for _, size := range []uint32{262144, 1 << 20, 1 << 24} {
		b.Run(fmt.Sprintf("entries=%d", size), func(b *testing.B) {
			e := newEnv(b, size)
			before := rssKB(b)
			b.ResetTimer()
			for range b.N {
				if _, err := e.p.GC(defaultTimeouts); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			perSweep := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			b.ReportMetric(perSweep/1e9, "cpu_share_at_1s")
			b.ReportMetric(float64(rssKB(b)-before)/1024, "rss_mb_added")
		})
	}
}

// rssKB is the process's resident set size.
func rssKB(tb testing.TB) int64 {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return n
		}
	}
	tb.Fatal("no VmRSS in /proc/self/status")
	return 0
}
