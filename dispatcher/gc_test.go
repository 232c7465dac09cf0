package dispatcher

import (
	"net/netip"
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
	k := flowOf(open, vip)
	snap, ok := e.p.find(&k)
	if !ok || !e.p.take(snap) {
		t.Fatalf("cannot remove the connection of %s", open)
	}
	e.p.connAt(snap.idx).Flags = ctDead
	e.p.release(snap.idx)
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Orphans != 1 || e.retEntries() != 0 {
		t.Errorf("sweep %+v with %d return entries left, want 1 orphan removed", res, e.retEntries())
	}
}
