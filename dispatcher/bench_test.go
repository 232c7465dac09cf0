package dispatcher

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/packet"
)

// Datapath cost is measured the way katran_tester's perf mode does it:
// one BPF_PROG_TEST_RUN per packet (repeat 1), so a rewritten packet is
// never fed back in, each run on fresh copies of the case's own packet
// bytes. The time is the kernel's duration of each run as reported by
// BPF_PROG_TEST_RUN itself (see testRun): the kernel's own clock around the
// program, without the syscall or Go overhead. ebpf.EnableStats with
// Info().Runtime() deltas would need a second syscall per packet to get
// per-run figures and slows every BPF program on the machine while enabled.
// The floor (xlb_floor, returning XDP_TX) runs interleaved in the same loop,
// one floor run per case run, so the harness's fixed cost (timer reads,
// bottom-half toggling) can be subtracted.

// costBaseline is each IPv4 case's median kernel ns above the floor on
// the development machines (2-core VM, AMD EPYC with SRSO "Safe RET"),
// measured with TestDatapathCostTargets on a quiet machine at the commit
// that wrote it: the reference TestDatapathCostTargets guards against
// gross regressions from. It is not a goal: the README gives the figures
// and their ratio to Katran. IPv6 cases are held to their IPv4 ones.
var costBaseline = map[string]float64{
	"established-forward": 140,
	"return":              130,
	"syn-new-flow":        450,
	"pass-through":        60,
	"udp-forward":         140,
}

type benchCase struct {
	name        string
	pkts        [][]byte // cycled through
	wantVerdict uint32
	// reset is called, outside the measurement, before pkts[0] is used
	// again (syn-new-flow empties the conntrack tables there).
	reset func()
}

// benchSetup builds the environment and the cases; the floor is returned
// separately.
func benchSetup(tb testing.TB) (*env, *testRun, []benchCase) {
	return benchSetupOpts(tb, Options{})
}

// benchSetupOpts is benchSetup with the pipeline loaded with opts (its
// table size and port range are the benchmark's own).
func benchSetupOpts(tb testing.TB, opts Options) (*env, *testRun, []benchCase) {
	// A wide source-port range for a stream of new flows.
	opts.ConntrackSize, opts.PortLo, opts.PortHi, opts.Sources6 = 65536, 1024, 65535, 1
	e := newEnvOpts(tb, opts)
	e.must(e.p.SetService(5, vipDNS, UDP, []int{0}))
	e.must(e.p.SetSelection(5, ModeRandom, []uint32{idA}))

	var floor floorObjects
	if err := loadFloorObjects(&floor, nil); err != nil {
		tb.Fatalf("load floor: %v", err)
	}
	tb.Cleanup(func() { floor.Close() })

	// Distinct SYNs; the tables are emptied each time they were all used
	// (20000 connections: far from the table size and the port range).
	const synFlows = 20000
	syns := make([][]byte, synFlows)
	syns6 := make([][]byte, synFlows)
	for i := range syns {
		a := netip.AddrFrom4([4]byte{11, byte(i >> 16), byte(i >> 8), byte(i)})
		syns[i] = fromClient(netip.AddrPortFrom(a, uint16(1024+i%50000)), vip, seg{flags: "S", seq: uint32(i)})
		a6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)})
		syns6[i] = fromClient(netip.AddrPortFrom(a6, uint16(1024+i%50000)), vip6, seg{flags: "S", seq: uint32(i)})
	}
	// One connection of each family, kept across resets, for the forward
	// and return cases (a SYN of a known flow lands on the same backend
	// only by chance, so the return cases run before syn-new-flow
	// resets), and a UDP flow of each.
	cl, cl6 := netip.AddrPortFrom(client1, 40000), netip.AddrPortFrom(client6, 40000)
	payload := []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	query := packet.UDP(packet.UDPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: cl, Dst: vipDNS, Payload: payload})
	query6 := packet.UDP(packet.UDPOpts{SrcMAC: clientMAC(client6), DstMAC: lbMAC, Src: cl6, Dst: vip6udp, Payload: payload})
	keep := func() {
		e.clearConntrack()
		for _, p := range [][]byte{fromClient(cl, vip, seg{flags: "S", seq: 1}), fromClient(cl6, vip6, seg{flags: "S", seq: 1}), query, query6} {
			if v, _ := e.run(e.p.Entry(), p); v != xdpTX {
				tb.Fatalf("first packet of a kept flow: %s", verdictName(v))
			}
		}
	}
	keep()
	conn := func(cl, to netip.AddrPort) ([]byte, []byte) {
		c := e.mustConn(cl, to)
		if v, _ := e.run(e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), seg{flags: "SA", seq: 9, ack: 2})); v != xdpTX {
			tb.Fatalf("syn-ack: %s", verdictName(v))
		}
		return fromClient(cl, to, seg{flags: "PA", seq: 2, ack: 10, payload: payload}),
			fromBackend(c.Backend, c.Source.Port(), seg{flags: "PA", seq: 10, ack: 2 + uint32(len(payload)), payload: payload})
	}
	fwd, ret := conn(cl, vip)
	fwd6, ret6 := conn(cl6, vip6)

	cases := []benchCase{
		{name: "established-forward", pkts: [][]byte{fwd}, wantVerdict: xdpTX},
		{name: "return", pkts: [][]byte{ret}, wantVerdict: xdpTX},
		{name: "udp-forward", pkts: [][]byte{query}, wantVerdict: xdpTX},
		{name: "established-forward-v6", pkts: [][]byte{fwd6}, wantVerdict: xdpTX},
		{name: "return-v6", pkts: [][]byte{ret6}, wantVerdict: xdpTX},
		{name: "udp-forward-v6", pkts: [][]byte{query6}, wantVerdict: xdpTX},
		{name: "syn-new-flow", pkts: syns, wantVerdict: xdpTX, reset: keep},
		{name: "syn-new-flow-v6", pkts: syns6, wantVerdict: xdpTX, reset: keep},
		{name: "pass-through", pkts: [][]byte{fromClient(cl, netip.AddrPortFrom(lbAddr, 22), seg{flags: "PA", seq: 5, payload: payload})}, wantVerdict: xdpPass},
	}
	fl := newTestRun(floor.XlbFloor, e.lb0, 2048)
	tb.Cleanup(fl.close)
	return e, fl, cases
}

// measure runs n packets of a case, each followed by one floor run, on
// the namespace's thread, and returns the per-run kernel durations.
func measure(e *env, fl *testRun, bc benchCase, n int, pause, resume func()) (caseNs, floorNs []uint32, err error) {
	prog := e.p.Entry()
	floorPkt := bc.pkts[0]
	if bc.name == "floor" {
		prog = nil
	}
	caseNs = make([]uint32, 0, n)
	floorNs = make([]uint32, 0, n)
	var tr *testRun
	if prog != nil {
		tr = newTestRun(prog, e.lb0, 2048)
		defer tr.close()
	}
	// All runs in one go on the namespace's thread, or, for a case with a
	// reset, chunks of len(pkts) runs with the reset between them.
	for done := 0; done < n && err == nil; {
		if done > 0 && bc.reset != nil {
			pause()
			bc.reset()
			resume()
		}
		chunk := n - done
		if bc.reset != nil {
			chunk = min(chunk, len(bc.pkts))
		}
		e.ns.Do(func() {
			for j := 0; j < chunk; j++ {
				v, d, rerr := fl.run(floorPkt)
				if rerr != nil || v != xdpTX {
					err = fmt.Errorf("floor run %d: verdict %s, %v", done+j, verdictName(v), rerr)
					return
				}
				floorNs = append(floorNs, d)
				if tr == nil {
					caseNs = append(caseNs, d)
					continue
				}
				v, d, rerr = tr.run(bc.pkts[j%len(bc.pkts)])
				if rerr != nil || v != bc.wantVerdict {
					err = fmt.Errorf("%s run %d: verdict %s, want %s, %v", bc.name, done+j, verdictName(v), verdictName(bc.wantVerdict), rerr)
					return
				}
				caseNs = append(caseNs, d)
			}
		})
		done += chunk
	}
	return caseNs, floorNs, err
}

func mean(d []uint32) float64 {
	var s float64
	for _, v := range d {
		s += float64(v)
	}
	return s / float64(len(d))
}

func median(d []uint32) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[len(s)/2])
}

// BenchmarkDatapath reports the kernel's time per packet of each case
// (bpf_ns/pkt) and that time above the floor measured in the same loop.
func BenchmarkDatapath(b *testing.B) {
	e, fl, cases := benchSetup(b)
	all := append([]benchCase{{name: "floor", pkts: cases[0].pkts, wantVerdict: xdpTX}}, cases...)
	for _, bc := range all {
		b.Run(bc.name, func(b *testing.B) { benchCaseRun(b, e, fl, bc) })
	}
}

// benchCaseRun measures b.N packets of a case, each beside a floor run,
// and reports the kernel's mean time per packet and its excess over the
// floor.
func benchCaseRun(b *testing.B, e *env, fl *testRun, bc benchCase) {
	if bc.reset != nil {
		bc.reset()
	}
	b.ResetTimer()
	caseNs, floorNs, err := measure(e, fl, bc, b.N, b.StopTimer, b.StartTimer)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	c, f := mean(caseNs), mean(floorNs)
	b.ReportMetric(c, "bpf_ns/pkt")
	b.ReportMetric(c-f, "ns_above_floor/pkt")
}

// TestDatapathCostTargets fails when an IPv4 case costs more than three
// times its baseline (median kernel ns above the floor's median, 20000
// runs), which catches gross regressions without flaking on a noisy
// machine: the same build measures up to twice as slow on one machine of
// this kind as on another, and up to 1.7 times slower again while other
// work shares its two cores. An IPv6 case is held to its IPv4 counterpart
// measured in the same run instead: at most 1.5 times it (the target is
// 1.2; the margin is for noise between the two measurements), a SYN at
// most twice (a new IPv6 flow hashes and writes 40-byte keys into 128-byte
// slots: measured 1.2 to 1.5 times the IPv4 SYN on a quiet machine). The
// two are measured one after the other, so other work can load one and
// not the other: a pair over its bound is measured again, both cases, up
// to twice, and fails only when every measurement is over (one run under
// load measured 2.18 times, then 1.3 and 1.5).
func TestDatapathCostTargets(t *testing.T) {
	if testing.Short() {
		t.Skip("cost measurement skipped in -short mode")
	}
	e, fl, cases := benchSetup(t)
	const runs = 20000
	byName := map[string]benchCase{}
	above := map[string]float64{}
	measureAbove := func(bc benchCase) (c, f float64) {
		if bc.reset != nil {
			bc.reset()
		}
		caseNs, floorNs, err := measure(e, fl, bc, runs, func() {}, func() {})
		if err != nil {
			t.Fatal(err)
		}
		return median(caseNs), median(floorNs)
	}
	for _, bc := range cases {
		byName[bc.name] = bc
		c, f := measureAbove(bc)
		base := costBaseline[bc.name]
		v4, isV6 := strings.CutSuffix(bc.name, "-v6")
		if isV6 && above[v4] == 0 {
			t.Errorf("%s: measured before its IPv4 counterpart %s", bc.name, v4)
			continue
		}
		for try := 0; isV6 && c-f > v6Bound(bc.name)*above[v4] && try < 2; try++ {
			t.Logf("%-22s %.2f times %s: measuring both again", bc.name, (c-f)/above[v4], v4)
			c4, f4 := measureAbove(byName[v4])
			above[v4] = c4 - f4
			c, f = measureAbove(bc)
		}
		above[bc.name] = c - f
		ref := fmt.Sprintf("baseline %3.0f", base)
		if isV6 {
			ref = fmt.Sprintf("%.2f times %s", (c-f)/above[v4], v4)
		}
		t.Logf("%-22s median %5.0f ns, floor %3.0f ns, above floor %5.0f ns (%s)", bc.name, c, f, c-f, ref)
		switch {
		case isV6 && c-f > v6Bound(bc.name)*above[v4]:
			t.Errorf("%s: %.0f ns above floor, more than %.1f times the %.0f ns of %s in the same run", bc.name, c-f, v6Bound(bc.name), above[v4], v4)
		case !isV6 && base == 0:
			t.Errorf("%s: no baseline", bc.name)
		case !isV6 && c-f > 3*base:
			t.Errorf("%s: %.0f ns above floor, more than three times the %.0f ns baseline", bc.name, c-f, base)
		}
	}
}

// v6Bound is how many times its IPv4 counterpart an IPv6 case may cost in
// TestDatapathCostTargets.
func v6Bound(name string) float64 {
	if strings.HasPrefix(name, "syn-") {
		return 2
	}
	return 1.5
}

// BenchmarkTrafficCounters measures what counting each backend's packets
// and bytes (xlb_bk_ctr, per CPU) costs an established flow's packet: the
// established-forward case through a pipeline that counts and one loaded
// with counting off, in alternating rounds, each beside the floor.
func BenchmarkTrafficCounters(b *testing.B) {
	on, flOn, casesOn := benchSetup(b)
	off, flOff, casesOff := benchSetupOpts(b, Options{noTraffic: true})
	const rounds = 10
	var sumOn, sumOff float64
	for range rounds {
		for _, r := range []struct {
			e   *env
			fl  *testRun
			bc  benchCase
			sum *float64
		}{{on, flOn, casesOn[0], &sumOn}, {off, flOff, casesOff[0], &sumOff}} {
			c, f, err := measure(r.e, r.fl, r.bc, max(b.N/rounds, 1000), func() {}, func() {})
			if err != nil {
				b.Fatal(err)
			}
			*r.sum += mean(c) - mean(f)
		}
	}
	b.ReportMetric(sumOn/rounds, "counted_ns_above_floor/pkt")
	b.ReportMetric(sumOff/rounds, "uncounted_ns_above_floor/pkt")
	b.ReportMetric((sumOn-sumOff)/rounds, "counting_ns/pkt")
}
