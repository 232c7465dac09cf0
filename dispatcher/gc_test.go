package dispatcher

import (
	"net/netip"
	"testing"
	"time"
)

// TestGC expires connections with 1-second timeouts, in the data path (a
// SYN reusing an expired flow) and in the control plane (GC), and checks
// that ports are freed and backends uncounted exactly once.
func TestGC(t *testing.T) {
	// 16 source ports (XLB_PORT_TRIES, so the port search covers the
	// range): the 17th connection to A must wait for a free one.
	const ports = 16
	e := newEnvPorts(t, 1024, portLo, portLo+ports-1)
	short := Timeouts{SYN: time.Second, Established: time.Second, FIN: time.Second, Closed: time.Second}
	e.opts.ConntrackTimeout = short
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	s := seg{flags: "S", seq: 1}
	open := netip.AddrPortFrom(client1, 50000)
	other := netip.AddrPortFrom(client1, 50100)

	for i := range ports {
		cl := netip.AddrPortFrom(client1, 50000+uint16(i))
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), s) },
			map[string]uint64{"fwd": 1, "new_conn": 1})
	}
	c := e.mustConn(open, vip)
	e.expect(t, e.p.Entry(), fromBackend(backendA, c.Source.Port(), seg{flags: "SA", ack: 2}), xdpTX, toClient(c, seg{flags: "SA", ack: 2}),
		map[string]uint64{"ret": 1})
	e.expect(t, e.p.Entry(), fromClient(other, vip, s), xdpDrop, nil, map[string]uint64{"drop_no_port": 1})

	// Nothing is idle yet.
	res, err := e.p.GC(short)
	e.must(err)
	if res.Expired != 0 || res.Scanned != ports {
		t.Errorf("early sweep %+v, want %d scanned, none expired", res, ports)
	}

	time.Sleep(1200 * time.Millisecond)
	// The data path recycles an expired entry when its client port
	// comes back with a SYN, uncounting the backend once.
	e.expectFn(t, e.p.Entry(), fromClient(open, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(open, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1, "recycled": 1})
	if a := e.backendStats(idA); a.Active != ports || a.NewConns != ports+1 {
		t.Errorf("after recycling: %+v, want %d active, %d new", a, ports, ports+1)
	}
	// Close it with a RST, let it expire, sweep.
	e.expect(t, e.p.Entry(), fromClient(open, vip, seg{flags: "R", seq: 2}), xdpTX, toBackend(e.mustConn(open, vip), seg{flags: "R", seq: 2}),
		map[string]uint64{"fwd": 1, "closed": 1})
	if a := e.backendStats(idA).Active; a != ports-1 {
		t.Errorf("after rst: %d active, want %d", a, ports-1)
	}
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Expired != ports {
		t.Errorf("sweep %+v, want %d expired", res, ports)
	}
	if a := e.backendStats(idA).Active; a != 0 {
		t.Errorf("after sweeping 15 open and 1 closed connection: %d active, want 0", a)
	}
	if conns, _ := e.p.Conns(); len(conns) != 0 || e.retEntries() != 0 {
		t.Errorf("after sweep: %d connections, %d return entries", len(conns), e.retEntries())
	}

	// The port is free again.
	e.expectFn(t, e.p.Entry(), fromClient(other, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(other, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	e.checkLport(t, e.mustConn(other, vip))
	// An open connection expired by GC is uncounted by GC.
	time.Sleep(1200 * time.Millisecond)
	res, err = e.p.GC(short)
	e.must(err)
	if res.Expired != 1 {
		t.Errorf("sweep %+v, want 1 expired", res)
	}
	if a := e.backendStats(idA).Active; a != 0 {
		t.Errorf("after sweeping an open connection: %d active, want 0", a)
	}

	// A return entry without its forward entry is an orphan.
	e.expectFn(t, e.p.Entry(), fromClient(open, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(open, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
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
