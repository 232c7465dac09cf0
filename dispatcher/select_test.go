package dispatcher

import (
	"net/netip"
	"testing"
)

// synFlow sends a SYN from client i (distinct address and port per i) and
// returns the backend id it was given.
func (e *env) synFlow(t *testing.T, i int) (netip.AddrPort, uint32) {
	t.Helper()
	// Clients 11.0.0.0/8 onwards, reached through the default route.
	a := netip.AddrFrom4([4]byte{11 + byte(i>>16), byte(i >> 8), byte(i), 1})
	cl := netip.AddrPortFrom(a, uint16(1024+i%60000))
	before := e.stats()
	verdict, _ := e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: uint32(i)}))
	if verdict != xdpTX {
		t.Fatalf("syn %d from %s: verdict %s, counters %v", i, cl, verdictName(verdict), statsDelta(before, e.stats()))
	}
	return cl, e.mustConnFwd(cl).BackendId
}

// mustConnFwd reads one forward entry directly (Conns walks the table).
func (e *env) mustConnFwd(cl netip.AddrPort) connHead {
	e.t.Helper()
	k := keyOf(cl, vip, TCP)
	s, ok := e.p.t4.find(&k)
	if !ok {
		e.t.Fatalf("no connection of %s", cl)
	}
	return *s.head()
}

// keyOf is the connection table key of a flow.
func keyOf(cl, to netip.AddrPort, proto uint8) flowKey {
	return flowKey{saddr: cl.Addr().AsSlice(), daddr: to.Addr().AsSlice(), sport: portBE(cl.Port()), dport: portBE(to.Port()), proto: proto}
}

func TestSelectRandom(t *testing.T) {
	// A wide range: 10000 connections over two backends, which share
	// the range when their hashes pick the same port way.
	e := newEnvPorts(t, 16384, 1024, 65535)
	const n = 10000
	count := map[uint32]int{}
	for i := range n {
		_, id := e.synFlow(t, i)
		count[id]++
	}
	t.Logf("random over A, B: %v", count)
	for _, id := range []uint32{idA, idB} {
		if c := count[id]; c < n*45/100 || c > n*55/100 {
			t.Errorf("backend %d got %d of %d SYNs, want 45-55%%", id, c, n)
		}
	}
	if len(count) != 2 {
		t.Errorf("backends chosen: %v, want only A and B", count)
	}
	// Every connection has its own source port per backend.
	conns, err := e.p.Conns()
	e.must(err)
	seen := map[netip.AddrPort]bool{}
	for _, c := range conns {
		k := netip.AddrPortFrom(c.Backend.Addr(), c.Source.Port())
		if seen[k] {
			t.Errorf("source port %d used twice towards %s", c.Source.Port(), c.Backend)
		}
		seen[k] = true
		e.checkLport(t, c)
	}
	if len(conns) != n || e.retEntries() != n {
		t.Errorf("%d connections, %d return entries, want %d", len(conns), e.retEntries(), n)
	}
	for id, c := range count {
		if s := e.backendStats(id); s.Active != int64(c) || s.NewConns != uint64(c) {
			t.Errorf("backend %d stats %+v, want %d active and new", id, s, c)
		}
	}
}

// flowHashRef is flow_hash() of a client flow to a VIP, through the
// daemon's rendering of it (flowHash, which also places flows in the
// connection table); TestSelectHash checks the kernel agrees.
func flowHashRef(cl, to netip.AddrPort) uint32 {
	k := flowOf(cl, to)
	return flowHash(&k)
}

func TestSelectHash(t *testing.T) {
	e := newEnv(t, 4096)
	table := []uint32{idA, idB, idC}
	e.must(e.p.SetSelection(1, ModeHash, table))
	const n = 1500
	first := make([]uint32, n)
	count := map[uint32]int{}
	for i := range n {
		cl, id := e.synFlow(t, i)
		first[i] = id
		count[id]++
		if want := table[uint64(flowHashRef(cl, vip))*uint64(len(table))>>32]; id != want {
			t.Errorf("flow %s: backend %d, the reference hash says %d", cl, id, want)
		}
	}
	t.Logf("hash over A, B, C: %v", count)
	for _, id := range table {
		if c := count[id]; c < n*25/100 || c > n*42/100 {
			t.Errorf("backend %d got %d of %d flows, want 25-42%%", id, c, n)
		}
	}
	// The same flows again, as new connections: the same backends.
	e.clearConntrack()
	for i := range n {
		if _, id := e.synFlow(t, i); id != first[i] {
			t.Errorf("flow %d: backend %d, first time %d", i, id, first[i])
		}
	}
}

func TestSelectLeastConn(t *testing.T) {
	e := newEnv(t, 4096)
	// 50 connections on A alone.
	e.must(e.p.SetSelection(1, ModeLeastConn, []uint32{idA}))
	for i := range 50 {
		if _, id := e.synFlow(t, i); id != idA {
			t.Fatalf("syn %d went to %d with only A in the table", i, id)
		}
	}
	if s := e.backendStats(idA); s.Active != 50 {
		t.Fatalf("A active %d, want 50", s.Active)
	}
	e.must(e.p.SetSelection(1, ModeLeastConn, []uint32{idA, idB}))
	for i := 50; i < 100; i++ {
		if _, id := e.synFlow(t, i); id != idB {
			t.Errorf("syn %d went to %d, want B (A has 50 active, B %d)", i, id, e.backendStats(idB).Active)
		}
	}
	// Now 50 each; closing 10 of A's makes the next 10 go to A.
	for i := range 10 {
		a := netip.AddrFrom4([4]byte{11, 0, byte(i), 1})
		cl := netip.AddrPortFrom(a, uint16(1024+i))
		if v, _ := e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "R", seq: uint32(i) + 1})); v != xdpTX {
			t.Fatalf("rst %d: %s", i, verdictName(v))
		}
	}
	for i := 100; i < 110; i++ {
		if _, id := e.synFlow(t, i); id != idA {
			t.Errorf("syn %d went to %d, want A after its closes", i, id)
		}
	}
}

func TestSelectLeastConnWeights(t *testing.T) {
	e := newEnv(t, 4096)
	weights := map[uint32]uint16{idA: 3, idB: 1, idC: 2}
	for id, w := range weights {
		addr := map[uint32]netip.AddrPort{idA: backendA, idB: backendB, idC: backendC}[id]
		e.must(e.p.SetBackend(id, addr, w))
	}
	table := []uint32{idA, idB, idC}
	e.must(e.p.SetSelection(1, ModeLeastConn, table))
	for i := range 120 {
		// The chosen backend must have the least active/weight.
		best := map[uint32]bool{}
		var bestNum, bestDen int64 = -1, 1
		for _, id := range table {
			a, w := e.backendStats(id).Active, int64(weights[id])
			switch {
			case bestNum < 0 || a*bestDen < bestNum*w:
				best = map[uint32]bool{id: true}
				bestNum, bestDen = a, w
			case a*bestDen == bestNum*w:
				best[id] = true
			}
		}
		if _, id := e.synFlow(t, i); !best[id] {
			t.Fatalf("syn %d went to %d, want one of %v", i, id, best)
		}
	}
	for id, w := range weights {
		if a := e.backendStats(id).Active; a != 20*int64(w) {
			t.Errorf("backend %d (weight %d): %d active of 120, want %d", id, w, a, 20*w)
		}
	}
}

func TestSelectRoundRobin(t *testing.T) {
	e := newEnv(t, 4096)
	table := []uint32{idA, idB, idC}
	e.must(e.p.SetSelection(1, ModeRoundRobin, table))
	var got []uint32
	for i := range 30 {
		_, id := e.synFlow(t, i)
		got = append(got, id)
	}
	start := -1
	for j, id := range table {
		if id == got[0] {
			start = j
		}
	}
	for i, id := range got {
		if start < 0 || id != table[(start+i)%len(table)] {
			t.Fatalf("round robin sequence %v does not cycle through %v", got, table)
		}
	}
}
