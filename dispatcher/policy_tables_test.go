package dispatcher

import (
	"context"
	"net/netip"
	"testing"

	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/hash"
	"github.com/xlb-project/xlb/plugins/leastconn"
	"github.com/xlb-project/xlb/plugins/random"
)

// builtinPolicies are the built-in policies' libraries: the tables they
// compute are what the plugins send, installed here as xlbd installs them.
var builtinPolicies = []struct {
	name string
	pol  plugins.Policy
}{
	{"random", random.Policy{}},
	{"hash", hash.Policy{}},
	{"least-conn", leastconn.Policy{}},
}

// policyBackends are A, B and C with weights 1, 2, 1.
var policyBackends = []struct {
	id     uint32
	addr   netip.AddrPort
	weight uint32
}{{idA, backendA, 1}, {idB, backendB, 2}, {idC, backendC, 1}}

// installPolicy asks a policy for service 1's table over policyBackends
// and installs it.
func (e *env) installPolicy(t testing.TB, pol plugins.Policy) {
	t.Helper()
	req := plugins.Request{Service: vip}
	for _, b := range policyBackends {
		e.must(e.p.SetBackend(b.id, b.addr, uint16(b.weight)))
		req.Backends = append(req.Backends, plugins.Backend{Address: b.addr, Weight: b.weight})
	}
	sel, err := pol.Select(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if err := sel.ValidateFor(req.Backends); err != nil {
		t.Fatal(err)
	}
	ids := make([]uint32, len(sel.Table))
	for i, idx := range sel.Table {
		ids[i] = policyBackends[idx].id
	}
	e.must(e.p.SetSelection(1, Mode(sel.Mode), ids))
}

// TestPolicyTablesInDataPath sends 10,000 SYNs of distinct flows through
// the pipeline with each built-in policy's own table: random and hash
// spread by weight (1:2:1), least-conn keeps the weighted active counts
// level, and hash sends the same flow to the same backend every time.
func TestPolicyTablesInDataPath(t *testing.T) {
	for _, p := range builtinPolicies {
		t.Run(p.name, func(t *testing.T) {
			e := newEnvPorts(t, 16384, 1024, 65535)
			e.installPolicy(t, p.pol)
			const n = 10000
			count := map[uint32]int{}
			for i := range n {
				_, id := e.synFlow(t, i)
				count[id]++
			}
			t.Logf("%s over A:1, B:2, C:1: %v", p.name, count)
			for _, b := range policyBackends {
				want := n * int(b.weight) / 4
				lo, hi := want*90/100, want*110/100
				if p.name == "least-conn" {
					lo, hi = want-1, want+1 // it never lets them drift apart
				}
				if c := count[b.id]; c < lo || c > hi {
					t.Errorf("backend %s (weight %d) got %d of %d SYNs, want %d-%d", b.addr, b.weight, c, n, lo, hi)
				}
			}
			if p.name != "hash" {
				return
			}
			// The same flows again, from empty tables: the same backends.
			first := map[netip.AddrPort]uint32{}
			for i := range 200 {
				cl, id := e.synFlow(t, 100000+i)
				first[cl] = id
			}
			e.clearConntrack()
			for i := range 200 {
				cl, id := e.synFlow(t, 100000+i)
				if id != first[cl] {
					t.Fatalf("flow %s went to backend %d, then to %d", cl, first[cl], id)
				}
			}
		})
	}
}

// BenchmarkSelect is the cost of a SYN of a new flow with each built-in
// policy's table (random: 4 entries, hash: a 1021-entry Maglev table,
// least-conn: 3 candidates read with their active counts), beside the
// floor measured in the same loop.
func BenchmarkSelect(b *testing.B) {
	e, fl, cases := benchSetup(b)
	var syn benchCase
	for _, c := range cases {
		if c.name == "syn-new-flow" {
			syn = c
		}
	}
	for _, p := range builtinPolicies {
		b.Run(p.name, func(b *testing.B) {
			e.installPolicy(b, p.pol)
			benchCaseRun(b, e, fl, syn)
		})
	}
}

// TestHashSameOnTwoInstances: two load balancers with the same backends,
// listed in different orders and under different ids, send every flow to
// the same backend address with the hash policy.
func TestHashSameOnTwoInstances(t *testing.T) {
	type bk struct {
		id   uint32
		addr netip.AddrPort
	}
	install := func(e *env, order []bk) {
		req := plugins.Request{Service: vip}
		for _, b := range order {
			e.must(e.p.SetBackend(b.id, b.addr, 1))
			req.Backends = append(req.Backends, plugins.Backend{Address: b.addr, Weight: 1})
		}
		sel, err := hash.Policy{}.Select(context.Background(), req)
		e.must(err)
		ids := make([]uint32, len(sel.Table))
		for i, idx := range sel.Table {
			ids[i] = order[idx].id
		}
		e.must(e.p.SetSelection(1, Mode(sel.Mode), ids))
	}
	one := newEnvPorts(t, 4096, 1024, 65535)
	install(one, []bk{{idA, backendA}, {idB, backendB}, {idC, backendC}})
	two := newEnvPorts(t, 4096, 1024, 65535)
	install(two, []bk{{idC + 10, backendC}, {idA + 10, backendA}, {idB + 10, backendB}})
	seen := map[netip.AddrPort]int{}
	for i := range 1000 {
		cl, _ := one.synFlow(t, i)
		_, _ = two.synFlow(t, i)
		a, b := one.mustConn(cl, vip).Backend, two.mustConn(cl, vip).Backend
		if a != b {
			t.Fatalf("flow %s: %s on one instance, %s on the other", cl, a, b)
		}
		seen[a]++
	}
	if len(seen) != 3 {
		t.Fatalf("flows spread over %v, want all three backends", seen)
	}
}
