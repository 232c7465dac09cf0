package dispatcher

import (
	"net/netip"
	"testing"
	"time"
)

// sameWindow returns n client flows to vip whose connections hash to the
// same 8-slot window of a table with the given mask.
func sameWindow(mask uint32, n int) []netip.AddrPort {
	cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, 0, 0, 0}), 20000)
	k := flowOf(cl, vip)
	return windowOf(mask, flowHash(&k)&mask, vip, n)
}

// windowOf returns n client flows to dst whose hash lands on window w.
func windowOf(mask, w uint32, dst netip.AddrPort, n int) []netip.AddrPort {
	var out []netip.AddrPort
	for i := 0; len(out) < n; i++ {
		cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(20000+i%40000))
		k := flowOf(cl, dst)
		if flowHash(&k)&mask == w {
			out = append(out, cl)
		}
	}
	return out
}

// TestConnTableEviction fills one flow window with 8 live connections:
// the 9th SYN evicts the least recently seen one, which is uncounted from
// its backend and whose source port is freed, and the other connections
// keep flowing. A tombstone left by a closed connection is reused, and
// scans go past it.
func TestConnTableEviction(t *testing.T) {
	const ctWays = int(ctWays)
	e := newEnv(t, 1024)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	flows := sameWindow(e.p.t4.ctMask, ctWays+2)
	if f := flowHash(ptr(flowOf(flows[0], vip))); f&e.p.t4.ctMask != flowHash(ptr(flowOf(flows[ctWays], vip)))&e.p.t4.ctMask {
		t.Fatal("flows do not share a window")
	}
	syn := seg{flags: "S", seq: 1}
	for _, cl := range flows[:ctWays] {
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, syn), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), syn) },
			map[string]uint64{"fwd": 1, "new_conn": 1})
	}
	// Every connection but the first is seen again a few ticks later, so
	// the first is the least recently seen.
	time.Sleep(3 * e.p.tick)
	data := seg{flags: "A", seq: 2, ack: 1}
	for _, cl := range flows[1:ctWays] {
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, data), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), data) },
			map[string]uint64{"fwd": 1})
	}
	// A SYN to another address on the VIP's port, in the same full
	// window, is not load balanced and evicts nobody.
	other := netip.AddrPortFrom(lbAddr, vip.Port())
	k0 := flowOf(flows[0], vip)
	stranger := windowOf(e.p.t4.ctMask, flowHash(&k0)&e.p.t4.ctMask, other, 1)[0]
	e.expect(t, e.p.Entry(), fromClient(stranger, other, syn), xdpPass, nil, map[string]uint64{"pass_not_ours": 1})

	victim := e.mustConn(flows[0], vip)
	if got := e.backendStats(idA).Active; got != int64(ctWays) {
		t.Fatalf("active %d, want %d", got, ctWays)
	}

	last := flows[ctWays]
	e.expectFn(t, e.p.Entry(), fromClient(last, vip, syn), xdpTX, func() []byte { return toBackend(e.mustConn(last, vip), syn) },
		map[string]uint64{"fwd": 1, "new_conn": 1, "evicted": 1})
	if _, ok := e.conn(flows[0], vip); ok {
		t.Errorf("the least recently seen connection %s was not evicted", flows[0])
	}
	if got := e.backendStats(idA).Active; got != int64(ctWays) {
		t.Errorf("active %d after an eviction, want %d (one evicted, one new)", got, ctWays)
	}
	if i, ok := e.p.t4.portEntry(0, portBE(victim.Source.Port()), victim.Backend.Addr().AsSlice(), portBE(victim.Backend.Port())); !ok ||
		(e.p.t4.portAt(i).State == portUsed && addrOf(e.p.t4.portAddr(i, e.p.t4.rCaddr)) == flows[0].Addr()) {
		t.Errorf("the evicted connection's port %d is still in use: %v", victim.Source.Port(), ok)
	}
	// The survivors still flow; the evicted flow's packets find nothing
	// and are answered with a RST.
	for _, cl := range flows[1 : ctWays+1] {
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, data), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), data) },
			map[string]uint64{"fwd": 1})
	}
	e.expect(t, e.p.Entry(), fromClient(flows[0], vip, data), xdpTX, reset(flows[0], vip, "R", data.ack, 0), map[string]uint64{"reset_no_conn": 1})

	// Close one with RST and sweep it: its slot becomes a tombstone that
	// scans pass over (the flows after it in the window are still found)
	// and that the window's next new flow takes, evicting nobody.
	closing := flows[1]
	rst := seg{flags: "R", seq: 2}
	e.expectFn(t, e.p.Entry(), fromClient(closing, vip, rst), xdpTX, func() []byte { return toBackend(e.mustConn(closing, vip), rst) },
		map[string]uint64{"fwd": 1, "closed": 1})
	time.Sleep(3 * e.p.tick)
	res, err := e.p.GC(Timeouts{SYN: time.Hour, Established: time.Hour, FIN: time.Hour, Closed: time.Nanosecond, TimeWait: time.Nanosecond})
	e.must(err)
	if res.Expired != 1 {
		t.Fatalf("sweep %+v, want the closed connection expired", res)
	}
	if _, ok := e.conn(closing, vip); ok {
		t.Fatalf("closed connection %s still in the table after the sweep", closing)
	}
	for _, cl := range flows[2 : ctWays+1] {
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, data), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), data) },
			map[string]uint64{"fwd": 1})
	}
	next := flows[ctWays+1]
	e.expectFn(t, e.p.Entry(), fromClient(next, vip, syn), xdpTX, func() []byte { return toBackend(e.mustConn(next, vip), syn) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
}

func ptr[T any](v T) *T { return &v }

// TestEndBackendConns ends one backend's connections from the control
// plane: they are uncounted and their ports rest, each client's next
// segment is answered with a RST, another backend's connections are
// untouched, and a client may connect again at once.
func TestEndBackendConns(t *testing.T) {
	e := newEnv(t, 4096)
	syn := seg{flags: "S", seq: 1}
	open := func(id uint32, n int, first byte) []netip.AddrPort {
		e.must(e.p.SetSelection(1, ModeRandom, []uint32{id}))
		var out []netip.AddrPort
		for i := range n {
			cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{12, 0, first, byte(i)}), 30000)
			e.expectFn(t, e.p.Entry(), fromClient(cl, vip, syn), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), syn) },
				map[string]uint64{"fwd": 1, "new_conn": 1})
			out = append(out, cl)
		}
		return out
	}
	onA, onB := open(idA, 5, 1), open(idB, 3, 2)
	if a, b := e.backendStats(idA).Active, e.backendStats(idB).Active; a != 5 || b != 3 {
		t.Fatalf("active a=%d b=%d before, want 5 and 3", a, b)
	}
	_, heldBefore := e.p.PortsInUse()

	n, err := e.p.EndBackendConns(idA)
	if err != nil || n != 5 {
		t.Fatalf("EndBackendConns(a) = %d, %v; want 5 ended", n, err)
	}
	if st := e.backendStats(idA); st.Active != 0 || st.HalfOpen != 0 {
		t.Errorf("backend a after its connections ended: %+v", st)
	}
	if got := e.backendStats(idB).Active; got != 3 {
		t.Errorf("backend b active %d, want 3 untouched", got)
	}
	if _, held := e.p.PortsInUse(); held-heldBefore != 5 {
		t.Errorf("%d more ports resting, want the 5 of the ended connections", held-heldBefore)
	}
	data := seg{flags: "PA", seq: 2, ack: 500, payload: []byte("x")}
	for _, cl := range onA {
		e.expect(t, e.p.Entry(), fromClient(cl, vip, data), xdpTX, reset(cl, vip, "R", data.ack, 0), map[string]uint64{"reset_no_conn": 1})
	}
	for _, cl := range onB {
		e.expectFn(t, e.p.Entry(), fromClient(cl, vip, data), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), data) },
			map[string]uint64{"fwd": 1})
	}
	// The selection now has b only: a's client connects again at once.
	cl := onA[0]
	e.expectFn(t, e.p.Entry(), fromClient(cl, vip, syn), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), syn) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	if c := e.mustConn(cl, vip); c.Backend.Addr() != backendB.Addr() {
		t.Errorf("reconnected to %s, want backend b", c.Backend)
	}
	if n, err := e.p.EndBackendConns(idA); err != nil || n != 0 {
		t.Errorf("EndBackendConns(a) again = %d, %v; want nothing to end", n, err)
	}
	if _, err := e.p.EndBackendConns(uint32(MaxBackends)); err == nil {
		t.Errorf("EndBackendConns of an id out of range succeeded")
	}
}
