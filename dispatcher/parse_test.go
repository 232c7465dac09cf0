package dispatcher

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"

	"github.com/xlb-project/xlb/internal/packet"
)

// mutate returns a copy of b changed by fn, with the IPv4 header checksum
// recomputed so the change is the packet's only defect.
func mutate(b []byte, fn func(b []byte) []byte) []byte {
	b = fn(slices.Clone(b))
	if len(b) >= 34 && b[14]>>4 == 4 {
		ihl := int(b[14]&0x0f) * 4
		if ihl >= 20 && 14+ihl <= len(b) {
			hdr := b[14 : 14+ihl]
			hdr[10], hdr[11] = 0, 0
			var s uint32
			for i := 0; i < len(hdr); i += 2 {
				s += uint32(binary.BigEndian.Uint16(hdr[i:]))
			}
			for s > 0xffff {
				s = s&0xffff + s>>16
			}
			binary.BigEndian.PutUint16(hdr[10:], ^uint16(s))
		}
	}
	return b
}

func setTotLen(n int) func([]byte) []byte {
	return func(b []byte) []byte { binary.BigEndian.PutUint16(b[16:], uint16(n)); return b }
}

// fromOpts is a SYN from src to dst changed by mod.
func fromOpts(src, dst netip.AddrPort, mod func(o *packet.TCPOpts)) []byte {
	o := packet.TCPOpts{SrcMAC: clientMAC(src.Addr()), DstMAC: lbMAC, Src: src, Dst: dst, Flags: "S", Seq: 1}
	if mac, ok := neighbours[src.Addr()]; ok {
		o.SrcMAC = mac
	}
	mod(&o)
	return packet.TCP(o)
}

// refusal is the RST the load balancer must answer a refused SYN from cl
// to dst with: back through the SYN's own MACs, acknowledging the SYN and
// its data, headers only.
// The data path sends it without the Ethernet padding the builder adds.
func refusal(cl, dst netip.AddrPort, s seg) []byte {
	return packet.Truncate(packet.TCP(packet.TCPOpts{
		SrcMAC: lbMAC, DstMAC: clientMAC(cl.Addr()), Src: dst, Dst: cl, Flags: "RA",
		Seq: 0, Ack: s.seq + 1 + uint32(len(s.payload)), ZeroWindow: true, DontFragment: cl.Addr().Is4(),
	}), replyLen(cl.Addr()))
}

// replyLen is the length of a bare TCP reply: Ethernet, IP, TCP headers.
func replyLen(a netip.Addr) int {
	if a.Is6() {
		return 14 + 40 + 20
	}
	return 14 + 20 + 20
}

// reset is the RST xlb sends client cl from dst for a segment of no
// connection.
func reset(cl, dst netip.AddrPort, flags string, seq, ack uint32) []byte {
	return packet.Truncate(packet.TCP(packet.TCPOpts{
		SrcMAC: lbMAC, DstMAC: clientMAC(cl.Addr()), Src: dst, Dst: cl, Flags: flags,
		Seq: seq, Ack: ack, ZeroWindow: true, DontFragment: cl.Addr().Is4(),
	}), replyLen(cl.Addr()))
}

// TestStraySegmentsReset: a segment for a VIP that belongs to no
// connection (not a SYN, not a RST) is answered with a RST built as RFC
// 9293 3.10.7.1 says a closed port answers: with the segment's ACK as its
// sequence number, or, without an ACK, acknowledging the segment. The
// expected RSTs are built by internal/packet, not by the code under test.
func TestStraySegmentsReset(t *testing.T) {
	e := newEnv(t, 4096)
	cl := netip.AddrPortFrom(client1, 40000)
	rst := func(flags string, seq, ack uint32) []byte { return reset(cl, vip, flags, seq, ack) }
	tests := []struct {
		name string
		in   seg
		want []byte
	}{
		{"ack", seg{flags: "A", seq: 2, ack: 3}, rst("R", 3, 0)},
		{"data", seg{flags: "PA", seq: 2, ack: 7000, payload: []byte("hello")}, rst("R", 7000, 0)},
		{"fin-ack", seg{flags: "FA", seq: 2, ack: 0xfffffff0}, rst("R", 0xfffffff0, 0)},
		{"syn-ack", seg{flags: "SA", seq: 2, ack: 99}, rst("R", 99, 0)},
		{"fin without ack", seg{flags: "F", seq: 2}, rst("RA", 0, 3)},
		{"data without ack", seg{flags: "P", seq: 0xffffffff, payload: []byte("hi")}, rst("RA", 0, 1)},
		{"fin and data without ack", seg{flags: "PF", seq: 10, payload: []byte("abc")}, rst("RA", 0, 14)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.expect(t, e.p.Entry(), fromClient(cl, vip, tt.in), xdpTX, tt.want, map[string]uint64{"reset_no_conn": 1})
			if _, ok := e.conn(cl, vip); ok {
				t.Errorf("a stray segment created a connection")
			}
		})
	}
}

// TestPipelineStateless covers packets whose fate does not depend on
// earlier packets: passed, dropped or malformed. None may be rewritten,
// and none may create a connection.
func TestPipelineStateless(t *testing.T) {
	e := newEnv(t, 4096)
	cl := netip.AddrPortFrom(client1, 40000)
	syn := fromClient(cl, vip, seg{flags: "S", seq: 1})
	synOpts := func(mod func(o *packet.TCPOpts)) []byte {
		o := packet.TCPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: cl, Dst: vip, Flags: "S", Seq: 1}
		mod(&o)
		return packet.TCP(o)
	}
	vlan := slices.Concat(syn[:12], []byte{0x81, 0x00, 0x00, 0x05}, syn[12:])

	tests := []struct {
		name         string
		in           []byte
		wantVerdict  uint32
		wantCounters map[string]uint64
	}{
		// Pass-through: not for xlb.
		{"arp", packet.ARP(packet.ARPOpts{SrcMAC: clientMAC(client1), SenderIP: client1, TargetIP: vipAddr}), xdpPass, map[string]uint64{"pass_not_ipv4": 1}},
		{"vlan tagged", vlan, xdpPass, map[string]uint64{"pass_not_ipv4": 1}},
		{"udp to a vip port with no udp service", packet.UDP(packet.UDPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: cl, Dst: vip, Payload: []byte("q")}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"icmp to vip", packet.ICMPEcho(packet.ICMPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: client1, Dst: vipAddr, ID: 1, Seq: 1}), xdpPass, map[string]uint64{"pass_not_tcp": 1}},
		{"tcp to vip on another port", fromClient(cl, netip.AddrPortFrom(vipAddr, 22), seg{flags: "S"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"tcp to vip port on another address", fromClient(cl, netip.AddrPortFrom(netip.MustParseAddr("10.50.100.2"), 80), seg{flags: "S"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"tcp to host below the port range", fromClient(cl, netip.AddrPortFrom(lbAddr, portLo-1), seg{flags: "S"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"tcp to host above the port range", fromClient(cl, netip.AddrPortFrom(lbAddr, portHi+1), seg{flags: "A"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"tcp to host ssh", fromClient(cl, netip.AddrPortFrom(lbAddr, 22), seg{flags: "PA", payload: []byte("x")}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"reply in range without entry", fromBackend(backendA, portLo+5, seg{flags: "SA", ack: 1}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"reply at port_lo without entry", fromBackend(backendA, portLo, seg{flags: "A"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"reply at port_hi without entry", fromBackend(backendA, portHi, seg{flags: "A"}), xdpPass, map[string]uint64{"pass_not_ours": 1}},
		{"ip options, not for xlb", fromOpts(cl, netip.AddrPortFrom(lbAddr, 22), func(o *packet.TCPOpts) { o.IPOptions = []byte{1, 1, 1, 1} }), xdpPass, map[string]uint64{"pass_ip_options": 1}},
		{"first fragment, not for xlb", fromOpts(cl, netip.AddrPortFrom(lbAddr, 22), func(o *packet.TCPOpts) { o.MoreFragments = true }), xdpPass, map[string]uint64{"pass_fragment": 1}},
		{"later fragment", synOpts(func(o *packet.TCPOpts) { o.FragOffset = 185 }), xdpPass, map[string]uint64{"pass_fragment": 1}},

		// Dropped: xlb's own traffic the host's stack must never see (it
		// would reset a flow it does not know).
		{"ip options to a vip", synOpts(func(o *packet.TCPOpts) { o.IPOptions = []byte{1, 1, 1, 1} }), xdpDrop, map[string]uint64{"drop_ip_options": 1}},
		{"first fragment to a vip", synOpts(func(o *packet.TCPOpts) { o.MoreFragments = true }), xdpDrop, map[string]uint64{"drop_fragment": 1}},
		{"ip options in a reply", fromOpts(backendA, netip.AddrPortFrom(lbAddr, portLo+5), func(o *packet.TCPOpts) { o.IPOptions = []byte{1, 1, 1, 1} }), xdpDrop, map[string]uint64{"drop_ip_options": 1}},
		{"first fragment of a reply", fromOpts(backendA, netip.AddrPortFrom(lbAddr, portLo+5), func(o *packet.TCPOpts) { o.MoreFragments = true }), xdpDrop, map[string]uint64{"drop_fragment": 1}},

		// Dropped: SYNs that must never take a connection slot or a port.
		{"syn from 0.0.0.0", fromClient(netip.AddrPortFrom(netip.IPv4Unspecified(), 40000), vip, seg{flags: "S"}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"syn from broadcast", fromClient(netip.AddrPortFrom(netip.MustParseAddr("255.255.255.255"), 40000), vip, seg{flags: "S"}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"syn from multicast", fromClient(netip.AddrPortFrom(netip.MustParseAddr("224.0.0.5"), 40000), vip, seg{flags: "S"}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"syn from loopback", fromClient(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 40000), vip, seg{flags: "S"}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"syn from the vip itself", fromClient(netip.AddrPortFrom(vipAddr, 40000), vip, seg{flags: "S"}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"syn with a bad tcp checksum", mutate(syn, func(b []byte) []byte { b[14+20+16] ^= 0x01; return b }), xdpDrop, map[string]uint64{"drop_bad_csum": 1}},
		{"syn with a bad ip checksum", func() []byte { b := slices.Clone(syn); b[14+10] ^= 0x01; return b }(), xdpDrop, map[string]uint64{"drop_bad_csum": 1}},

		// Dropped: a RST for a VIP without a connection (never answered;
		// TestStraySegmentsReset covers the segments that are).
		{"rst without entry", fromClient(cl, vip, seg{flags: "R", seq: 2}), xdpDrop, map[string]uint64{"drop_no_conn": 1}},
		{"syn-rst to vip", fromClient(cl, vip, seg{flags: "SR", seq: 2}), xdpDrop, map[string]uint64{"drop_no_conn": 1}},
		{"ack without entry from broadcast", fromClient(netip.AddrPortFrom(netip.MustParseAddr("255.255.255.255"), 40000), vip, seg{flags: "A", seq: 2, ack: 3}), xdpDrop, map[string]uint64{"drop_bad_source": 1}},
		{"ack without entry, bad checksum", mutate(fromClient(cl, vip, seg{flags: "A", seq: 2, ack: 3}), func(b []byte) []byte { b[14+20+16] ^= 0x01; return b }), xdpDrop, map[string]uint64{"drop_bad_csum": 1}},

		// Malformed.
		{"ethernet header only", packet.Truncate(syn, 14), xdpDrop, map[string]uint64{"drop_eth_trunc": 1}},
		{"truncated ip header", packet.Truncate(syn, 14+19), xdpDrop, map[string]uint64{"drop_eth_trunc": 1}},
		{"ip version 6", mutate(syn, func(b []byte) []byte { b[14] = 0x65; return b }), xdpDrop, map[string]uint64{"drop_ip_hdr": 1}},
		{"ihl 4", mutate(syn, func(b []byte) []byte { b[14] = 0x44; return b }), xdpDrop, map[string]uint64{"drop_ip_hdr": 1}},
		{"ihl 0", mutate(syn, func(b []byte) []byte { b[14] = 0x40; return b }), xdpDrop, map[string]uint64{"drop_ip_hdr": 1}},
		{"tot_len beyond the frame", mutate(syn, setTotLen(len(syn)-14+1)), xdpDrop, map[string]uint64{"drop_ip_len": 1}},
		{"truncated tcp (tot_len beyond the frame)", packet.Truncate(syn, 14+20+10), xdpDrop, map[string]uint64{"drop_ip_len": 1}},
		{"tot_len below the ip header", mutate(syn, setTotLen(19)), xdpDrop, map[string]uint64{"drop_ip_len": 1}},
		{"udp with tot_len beyond the frame", mutate(packet.UDP(packet.UDPOpts{Src: cl, Dst: vip}), setTotLen(100)), xdpDrop, map[string]uint64{"drop_ip_len": 1}},
		{"truncated tcp header", mutate(packet.Truncate(syn, 14+20+10), setTotLen(30)), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
		{"tot_len cuts the tcp header", mutate(syn, setTotLen(39)), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
		{"tcp data offset 4", synOpts(func(o *packet.TCPOpts) { o.DataOffsetOverride = 4 }), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
		{"tcp data offset 0", synOpts(func(o *packet.TCPOpts) { o.DataOffsetOverride = 0x10 }), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
		{"tcp data offset beyond the packet", synOpts(func(o *packet.TCPOpts) { o.DataOffsetOverride = 15 }), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
		{"tcp data offset beyond tot_len, in the padding", mutate(slices.Concat(syn, make([]byte, 40)), func(b []byte) []byte { b[14+20+12] = 8 << 4; return b }), xdpDrop, map[string]uint64{"drop_tcp_hdr": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.expect(t, e.p.Entry(), tt.in, tt.wantVerdict, nil, tt.wantCounters)
		})
	}
	// Refused: a SYN to a service without backends gets a RST.
	t.Run("syn to a service without backends", func(t *testing.T) {
		s := seg{flags: "S", seq: 1000, payload: []byte("tfo")}
		e.expect(t, e.p.Entry(), fromClient(cl, vip2, s), xdpTX, refusal(cl, vip2, s), map[string]uint64{"rst_no_backend": 1})
	})
	conns, err := e.p.Conns()
	if err != nil {
		t.Fatal(err)
	}
	if len(conns) != 0 || e.retEntries() != 0 {
		t.Errorf("stateless packets left %d connections and %d return entries: %v", len(conns), e.retEntries(), conns)
	}
}

// TestPipelineNewConnections covers how a SYN's connection is made: the
// next hop on another interface, a missing neighbour, weight 0, padding,
// and running out of source ports.
func TestPipelineNewConnections(t *testing.T) {
	cl := netip.AddrPortFrom(client1, 41000)
	s := seg{flags: "S", seq: 77}

	t.Run("backend behind another interface", func(t *testing.T) {
		e := newEnv(t, 1024)
		e.must(e.p.SetSelection(1, ModeRandom, []uint32{idL1}))
		before := e.stats()
		verdict, out := e.run(e.p.Entry(), fromClient(cl, vip, s))
		checkDelta(t, before, e.stats(), map[string]uint64{"fwd": 1, "new_conn": 1, "redirect": 1})
		if verdict != xdpRedirect {
			t.Errorf("verdict %s, want XDP_REDIRECT", verdictName(verdict))
		}
		c := e.mustConn(cl, vip)
		want := packet.TCP(packet.TCPOpts{SrcMAC: lb1MAC, DstMAC: neighbours[backendL1.Addr()], Src: c.Source, Dst: backendL1, Flags: "S", Seq: 77 + c.SeqDelta})
		if !slices.Equal(out, want) {
			t.Errorf("output differs:\n got % x\nwant % x", out, want)
		}
		// The reply arrives on lb1 and leaves through lb0 towards the client.
		before = e.stats()
		verdict, out = e.runOn(e.p.Entry(), fromBackend(backendL1, c.Source.Port(), seg{flags: "SA", ack: 78 + c.SeqDelta}), e.lb1)
		checkDelta(t, before, e.stats(), map[string]uint64{"ret": 1, "redirect": 1})
		if w := toClient(c, seg{flags: "SA", ack: 78 + c.SeqDelta}); verdict != xdpRedirect || !slices.Equal(out, w) {
			t.Errorf("reply: verdict %s, output % x, want % x", verdictName(verdict), out, w)
		}
		// fromBackend uses lbMAC as destination; only the MACs differ
		// from a reply that really came in on lb1, so that is fine.
	})
	t.Run("backend without neighbour", func(t *testing.T) {
		e := newEnv(t, 1024)
		e.must(e.p.SetSelection(1, ModeRandom, []uint32{idNoN}))
		e.expect(t, e.p.Entry(), fromClient(cl, vip, s), xdpDrop, nil, map[string]uint64{"drop_fib": 1})
		if e.retEntries() != 0 {
			t.Errorf("a return entry was left behind")
		}
	})
	t.Run("weight 0", func(t *testing.T) {
		e := newEnv(t, 1024)
		e.must(e.p.SetBackend(idA, backendA, 0))
		e.must(e.p.SetSelection(1, ModeLeastConn, []uint32{idA}))
		e.expect(t, e.p.Entry(), fromClient(cl, vip, s), xdpTX, refusal(cl, vip, s), map[string]uint64{"rst_no_backend": 1})
		e.must(e.p.SetSelection(1, ModeRoundRobin, []uint32{idA}))
		e.expect(t, e.p.Entry(), fromClient(cl, vip, s), xdpTX, refusal(cl, vip, s), map[string]uint64{"rst_no_backend": 1})
	})
	t.Run("ethernet padding", func(t *testing.T) {
		e := newEnv(t, 1024)
		pad := []byte{0xde, 0xad, 0xbe, 0xef, 0x00, 0x01}
		before := e.stats()
		verdict, out := e.run(e.p.Entry(), slices.Concat(fromClient(cl, vip, s), pad))
		checkDelta(t, before, e.stats(), map[string]uint64{"fwd": 1, "new_conn": 1})
		c := e.mustConn(cl, vip)
		if want := slices.Concat(toBackend(c, s), pad); verdict != xdpTX || !slices.Equal(out, want) {
			t.Errorf("verdict %s, output differs:\n got % x\nwant % x", verdictName(verdict), out, want)
		}
		if err := packet.Verify(out); err != nil {
			t.Errorf("output: %v", err)
		}
		r := seg{flags: "PA", seq: 3, ack: 78 + c.SeqDelta, payload: []byte("odd")}
		e.expect(t, e.p.Entry(), slices.Concat(fromBackend(c.Backend, c.Source.Port(), r), pad[:3]), xdpTX, slices.Concat(toClient(c, r), pad[:3]),
			map[string]uint64{"ret": 1})
	})
	t.Run("source ports run out", func(t *testing.T) {
		e := newEnvPorts(t, 1024, portLo, portLo+1)
		e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
		seen := map[uint16]bool{}
		for i := range 2 {
			c := netip.AddrPortFrom(client1, uint16(42000+i))
			e.expectFn(t, e.p.Entry(), fromClient(c, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(c, vip), s) }, map[string]uint64{"fwd": 1, "new_conn": 1})
			seen[e.mustConn(c, vip).Source.Port()] = true
		}
		if len(seen) != 2 {
			t.Errorf("two connections to one backend share source port %v", seen)
		}
		// With fewer ports than XLB_PORT_TRIES the probes must wrap
		// inside the range, never leave it.
		third := netip.AddrPortFrom(client1, 42002)
		e.expect(t, e.p.Entry(), fromClient(third, vip, s), xdpTX, refusal(third, vip, s), map[string]uint64{"rst_no_port": 1})
		if st := e.backendStats(idA); st.NoPort != 1 || st.Active != 2 || st.HalfOpen != 2 {
			t.Errorf("backend A after a refusal: %+v, want 1 refused, 2 active, 2 half-open", st)
		}
		conns, err := e.p.Conns()
		e.must(err)
		for _, c := range conns {
			e.checkLport(t, c)
		}
		// Another backend has its own ports.
		e.must(e.p.SetSelection(1, ModeRandom, []uint32{idB}))
		c := netip.AddrPortFrom(client1, 42003)
		e.expectFn(t, e.p.Entry(), fromClient(c, vip, s), xdpTX, func() []byte { return toBackend(e.mustConn(c, vip), s) }, map[string]uint64{"fwd": 1, "new_conn": 1})
	})
}
