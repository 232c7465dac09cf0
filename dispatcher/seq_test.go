package dispatcher

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/packet"
)

// tcpOpts returns the raw TCP options of a packet parse would accept.
func tcpOpts(b []byte) []byte {
	doff := int(b[14+20+12]>>4) * 4
	return b[14+20+20 : 14+20+doff]
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// withOpts returns a copy of a packet with its TCP options replaced by
// opts (of the same length) and its TCP checksum computed afresh (RFC 1071,
// here, independently of the data path).
func withOpts(b, opts []byte) []byte {
	b = slices.Clone(b)
	copy(tcpOpts(b), opts)
	ip := b[14:]
	tot := int(binary.BigEndian.Uint16(ip[2:]))
	seg := ip[20:tot]
	seg[16], seg[17] = 0, 0
	sum := uint32(6) + uint32(len(seg))
	for i := 12; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for i := 0; i+1 < len(seg); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(seg[i:]))
	}
	if len(seg)%2 == 1 {
		sum += uint32(seg[len(seg)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(seg[16:], ^uint16(sum))
	return b
}

// TestSequenceTranslation covers what the backend-side ISN brings: the
// SYN's timestamp option replaced by NOPs wherever it lies, the same ISN
// for a retransmitted SYN, SACK blocks shifted back on the return at
// either alignment, and sequence numbers that wrap. Every output is built
// independently and its checksums verified (expect).
func TestSequenceTranslation(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))

	t.Run("syn timestamps removed", func(t *testing.T) {
		ts := slices.Concat([]byte{8, 10}, be32(0x11223344), be32(0))
		cases := []struct {
			name     string
			in, want []byte
		}{
			// Linux's layout: MSS, SACK-permitted, TS, NOP, window scale.
			{"linux", slices.Concat([]byte{2, 4, 5, 0xb4, 4, 2}, ts, []byte{1, 3, 3, 7}),
				slices.Concat([]byte{2, 4, 5, 0xb4, 4, 2}, slices.Repeat([]byte{1}, 10), []byte{1, 3, 3, 7})},
			// At an odd offset.
			{"odd offset", slices.Concat([]byte{1}, ts, []byte{3, 3, 7, 0}),
				slices.Concat([]byte{1}, slices.Repeat([]byte{1}, 10), []byte{3, 3, 7, 0})},
			// None: nothing changes but the addresses.
			{"no timestamps", []byte{2, 4, 5, 0xb4, 1, 1, 4, 2}, []byte{2, 4, 5, 0xb4, 1, 1, 4, 2}},
			// Malformed options (a length of 1) are forwarded as they are.
			{"malformed", slices.Concat([]byte{2, 1}, ts[:10]), slices.Concat([]byte{2, 1}, ts[:10])},
		}
		for i, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				cl := netip.AddrPortFrom(client1, uint16(43000+i))
				// Built with NOPs, then given the options under test,
				// since the builder refuses malformed ones.
				s := seg{flags: "S", seq: 4242, opts: slices.Repeat([]byte{1}, len(tc.in))}
				in := withOpts(fromClient(cl, vip, s), tc.in)
				out := e.expectFn(t, e.p.Entry(), in, xdpTX, func() []byte {
					return withOpts(toBackend(e.mustConn(cl, vip), s), tc.want)
				}, map[string]uint64{"fwd": 1, "new_conn": 1})
				// A retransmission keeps the ISN: the same bytes again.
				e.expect(t, e.p.Entry(), in, xdpTX, out, map[string]uint64{"fwd": 1})
			})
		}
	})

	t.Run("sack blocks", func(t *testing.T) {
		cl := netip.AddrPortFrom(client1, 43100)
		e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 7}))
		c := e.mustConn(cl, vip)
		b := func(v uint32) uint32 { return v + c.SeqDelta }
		block := func(l, r uint32, back bool) []byte {
			if back {
				return slices.Concat(be32(l), be32(r))
			}
			return slices.Concat(be32(b(l)), be32(b(r)))
		}
		opts := func(back bool) [][]byte {
			return [][]byte{
				// NOP, NOP, SACK with one block: edges at even offsets.
				slices.Concat([]byte{1, 1, 5, 10}, block(2000, 3000, back)),
				// NOP, SACK with two blocks: edges at odd offsets.
				slices.Concat([]byte{1, 5, 18}, block(2000, 3000, back), block(4000, 5000, back), []byte{0}),
				// Four blocks, and blocks across the wrap.
				slices.Concat([]byte{1, 1, 5, 34}, block(0xfffffff0, 0x10, back), block(0x20, 0x30, back),
					block(0x40, 0x50, back), block(0x60, 0x70, back)),
			}
		}
		in, want := opts(false), opts(true)
		for i := range in {
			s := seg{flags: "A", seq: 900, ack: b(1000), opts: in[i]}
			w := seg{flags: "A", seq: 900, ack: b(1000), opts: want[i]}
			e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), s), xdpTX, toClient(c, w), map[string]uint64{"ret": 1})
		}
	})

	t.Run("wraparound", func(t *testing.T) {
		cl := netip.AddrPortFrom(client1, 43200)
		e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 1}))
		c := e.mustConn(cl, vip)
		// Client data whose sequence number, shifted, wraps inside the
		// segment; the backend's acknowledgement wraps back.
		at := uint32(0xfffffffe) - c.SeqDelta
		d := seg{flags: "PA", seq: at, ack: 1, payload: []byte("wrap")}
		e.expect(t, e.p.Entry(), fromClient(cl, vip, d), xdpTX, toBackend(c, d), map[string]uint64{"fwd": 1})
		if got := at + 4 + c.SeqDelta; got != 2 {
			t.Fatalf("test setup: the backend's acknowledgement is %#x, want a wrapped 2", got)
		}
		r := seg{flags: "A", seq: 1, ack: 2}
		e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), r), xdpTX, toClient(c, r), map[string]uint64{"ret": 1})
	})
}

// TestISNAfterTimeWait reuses one source port for the same backend: the
// second connection's ISN lies after the last sequence number the first
// one's FIN used, however far that was, so a backend still in TIME_WAIT
// for the four-tuple accepts the SYN.
func TestISNAfterTimeWait(t *testing.T) {
	e := newEnvPorts(t, 1024, portLo, portLo)
	e.opts.ConntrackTimeout.TimeWait = time.Millisecond
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	first := netip.AddrPortFrom(client1, 44000)
	e.run(e.p.Entry(), fromClient(first, vip, seg{flags: "S", seq: 100}))
	c := e.mustConn(first, vip)
	b := func(v uint32) uint32 { return v + c.SeqDelta }
	far := uint32(101 + 1<<30) // a gigabyte later
	steps := []struct {
		fromClient bool
		s          seg
	}{
		{false, seg{flags: "SA", seq: 5000, ack: b(101)}},
		{true, seg{flags: "A", seq: 101, ack: 5001}},
		{false, seg{flags: "A", seq: 5001, ack: b(far)}},
		{false, seg{flags: "FA", seq: 5001, ack: b(far)}},
		{true, seg{flags: "FA", seq: far, ack: 5002}}, // closes it
		{false, seg{flags: "A", seq: 5002, ack: b(far + 1)}},
	}
	for _, st := range steps {
		if st.fromClient {
			want := map[string]uint64{"fwd": 1}
			if st.s.flags == "FA" {
				want["closed"] = 1
			}
			e.expect(t, e.p.Entry(), fromClient(first, vip, st.s), xdpTX, toBackend(c, st.s), want)
		} else {
			before := e.stats()
			v, _ := e.run(e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), st.s))
			if d := statsDelta(before, e.stats()); v != xdpTX || d["ret"] != 1 || d["untrusted_rst_fin"] != 0 {
				t.Fatalf("backend %s: verdict %s, counters %v", st.s.flags, verdictName(v), d)
			}
		}
	}
	if got := e.mustConn(first, vip).State; got != "closed" {
		t.Fatalf("first connection %s, want closed", got)
	}
	time.Sleep(3 * e.p.tick)
	second := netip.AddrPortFrom(client1, 44001)
	v, out := e.run(e.p.Entry(), fromClient(second, vip, seg{flags: "S", seq: 100}))
	if v != xdpTX {
		t.Fatalf("second syn: %s", verdictName(v))
	}
	c2 := e.mustConn(second, vip)
	if c2.Source != c.Source || c2.Backend != c.Backend {
		t.Fatalf("second connection %s -> %s, want the first's %s -> %s", c2.Source, c2.Backend, c.Source, c.Backend)
	}
	if err := packet.Verify(out); err != nil {
		t.Fatal(err)
	}
	isn := binary.BigEndian.Uint32(out[14+20+4:])
	last := b(far) + 1 // the backend's rcv_nxt in TIME_WAIT
	if int32(isn-last) <= 0 {
		t.Errorf("second ISN %#x is not after the first connection's last sequence number %#x", isn, last)
	}
}

// TestSYNChallenge covers the SYN flood defence: a SYN from a source not
// validated recently is answered with a SYN-ACK whose acknowledgement is
// a cookie and takes no slot or port; the client's RST carrying the
// cookie validates its source, whose next SYN is served. In mode auto
// this starts only when the chosen backend has enough half-open
// connections.
func TestSYNChallenge(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	cl := netip.AddrPortFrom(client2, 45000)
	s := seg{flags: "S", seq: 31337}
	challenge := func(cl netip.AddrPort) uint32 {
		t.Helper()
		before, ports := e.stats(), e.retEntries()
		v, out := e.run(e.p.Entry(), fromClient(cl, vip, s))
		checkDelta(t, before, e.stats(), map[string]uint64{"syn_challenge": 1})
		if v != xdpTX {
			t.Fatalf("challenge: verdict %s", verdictName(v))
		}
		if err := packet.Verify(out); err != nil {
			t.Fatalf("challenge: %v", err)
		}
		d, err := packet.Decode(out)
		if err != nil {
			t.Fatal(err)
		}
		cookie := binary.BigEndian.Uint32(out[14+20+8:])
		want := packet.Truncate(packet.TCP(packet.TCPOpts{
			SrcMAC: lbMAC, DstMAC: clientMAC(cl.Addr()), Src: vip, Dst: cl, Flags: "SA",
			Seq: binary.BigEndian.Uint32(out[14+20+4:]), Ack: cookie, ZeroWindow: true, DontFragment: true,
		}), 54)
		if !slices.Equal(out, want) {
			t.Errorf("challenge %v:\n got % x\nwant % x", d, out, want)
		}
		if cookie == s.seq+1 {
			t.Errorf("the challenge acknowledges the SYN")
		}
		if _, ok := e.conn(cl, vip); ok || e.retEntries() != ports {
			t.Errorf("a challenged SYN took a slot or a port")
		}
		return cookie
	}

	e.opts.SYN = SYNDefence{Mode: SYNOn, TrustFor: time.Minute}
	e.must(e.p.SetSettings(e.opts))
	cookie := challenge(cl)
	// A wrong cookie validates nothing.
	e.expect(t, e.p.Entry(), fromClient(cl, vip, seg{flags: "R", seq: cookie + 1}), xdpDrop, nil, map[string]uint64{"drop_no_conn": 1})
	challenge(cl)
	// The client's answer, RFC 793's RST with the cookie as its sequence.
	e.expect(t, e.p.Entry(), fromClient(cl, vip, seg{flags: "R", seq: cookie}), xdpDrop, nil, map[string]uint64{"syn_validated": 1})
	e.expectFn(t, e.p.Entry(), fromClient(cl, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	// Another port of the same address is trusted too; another address is not.
	cl2 := netip.AddrPortFrom(client2, 45001)
	e.expectFn(t, e.p.Entry(), fromClient(cl2, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(cl2, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	challenge(netip.AddrPortFrom(client1, 45000))

	// Auto: with a threshold of 3 half-open connections (two exist),
	// a new source is served until the third, then challenged.
	e.opts.SYN = SYNDefence{Mode: SYNAuto, HalfOpen: 3, TrustFor: time.Minute}
	e.must(e.p.SetSettings(e.opts))
	fresh := netip.AddrPortFrom(client1, 46000)
	e.expectFn(t, e.p.Entry(), fromClient(fresh, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(fresh, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	challenge(netip.AddrPortFrom(client1, 46001))
	// Established connections do not count: complete one handshake and
	// the next new source is served again.
	c := e.mustConn(fresh, vip)
	sa := seg{flags: "SA", seq: 9, ack: c.SeqDelta + s.seq + 1}
	e.run(e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), sa))
	e.run(e.p.Entry(), fromClient(fresh, vip, seg{flags: "A", seq: s.seq + 1, ack: 10}))
	if st := e.backendStats(idA); st.HalfOpen != 2 {
		t.Fatalf("half-open %d after a handshake, want 2", st.HalfOpen)
	}
	served := netip.AddrPortFrom(client1, 46002)
	e.expectFn(t, e.p.Entry(), fromClient(served, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(served, vip), s) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
}

// TestSourceSpread gives a service three source addresses: new flows
// spread evenly over them (each within 15% of a third), and a second
// service restricted to one of them uses only that one.
func TestSourceSpread(t *testing.T) {
	e := newEnvOpts(t, Options{ConntrackSize: 16384, PortLo: portLo, PortHi: portHi, Sources: 3})
	srcs := []netip.Addr{lbAddr, netip.MustParseAddr("10.50.0.201"), netip.MustParseAddr("10.50.0.202")}
	e.opts.SourceAddresses = srcs
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetService(1, vip, TCP, []int{0, 1, 2}))
	e.must(e.p.SetService(2, vip2, TCP, []int{2}))
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	e.must(e.p.SetSelection(2, ModeRandom, []uint32{idB}))
	const n = 3000
	for i := range n {
		cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, 1, byte(i >> 8), byte(i)}), uint16(2000+i))
		if v, _ := e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 1})); v != xdpTX {
			t.Fatalf("syn %d: %s", i, verdictName(v))
		}
		if i < 100 {
			if v, _ := e.run(e.p.Entry(), fromClient(cl, vip2, seg{flags: "S", seq: 1})); v != xdpTX {
				t.Fatalf("syn %d to %s: %s", i, vip2, verdictName(v))
			}
		}
	}
	conns, err := e.p.Conns()
	e.must(err)
	count := map[netip.AddrPort]map[netip.Addr]int{vip: {}, vip2: {}}
	for _, c := range conns {
		count[c.VIP][c.Source.Addr()]++
	}
	t.Logf("by source address: %v", count)
	for _, a := range srcs {
		if got := count[vip][a]; got < n/3*85/100 || got > n/3*115/100 {
			t.Errorf("%d of %d connections to %s from %s, want about a third", got, n, vip, a)
		}
	}
	if len(count[vip2]) != 1 || count[vip2][srcs[2]] != 100 {
		t.Errorf("connections to %s by source %v, want all 100 from %s", vip2, count[vip2], srcs[2])
	}
}
