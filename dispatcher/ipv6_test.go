package dispatcher

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/packet"
)

// newEnv6 is newEnv with the IPv6 tables sized and the IPv6 services set:
// vip6 (service 3, TCP, backend 6A only) and vip6udp (service 4, UDP).
func newEnv6(t *testing.T) *env {
	t.Helper()
	e := newEnvOpts(t, Options{ConntrackSize: 4096, PortLo: portLo, PortHi: portHi, Sources6: 1})
	e.must(e.p.SetSelection(3, ModeRandom, []uint32{id6A}))
	return e
}

// sack is a SACK option with blocks (left, right edges), NOP-padded.
func sack(edges ...uint32) []byte {
	o := []byte{1, 1, 5, byte(2 + 4*len(edges))}
	for _, e := range edges {
		o = binary.BigEndian.AppendUint32(o, e)
	}
	return o
}

// TestIPv6Connection follows an IPv6 TCP connection through the pipeline,
// every packet checked against one built independently (internal/packet)
// and its checksums verified: the SYN to the backend from the IPv6 source
// address with the sequence number shifted, the SYN-ACK and the data back
// with the acknowledgement and the SACK blocks shifted back, the
// handshake's states, FINs that close it and hold its port, and the
// backend's packet and byte counts.
func TestIPv6Connection(t *testing.T) {
	e := newEnv6(t)
	cl := netip.AddrPortFrom(client6, 40000)
	syn := seg{flags: "S", seq: 1000, opts: []byte{2, 4, 0x05, 0xa0}} // MSS 1440
	e.expectFn(t, e.p.Entry(), fromClient(cl, vip6, syn), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip6), syn) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	c := e.mustConn(cl, vip6)
	if c.Backend != backend6A || c.Source.Addr() != lbAddr6 || c.Source.Port() < portLo || c.Source.Port() > portHi ||
		c.State != "syn" || c.Protocol != TCP || c.BackendID != id6A {
		t.Fatalf("connection %+v", c)
	}
	isnB := uint32(5000)
	synack := seg{flags: "SA", seq: isnB, ack: 1001 + c.SeqDelta}
	e.expect(t, e.p.Entry(), fromBackend(backend6A, c.Source.Port(), synack), xdpTX, toClient(c, synack), map[string]uint64{"ret": 1})
	if got := e.mustConn(cl, vip6).State; got != "syn-recv" {
		t.Errorf("state %s after the SYN-ACK, want syn-recv", got)
	}
	ack := seg{flags: "A", seq: 1001, ack: isnB + 1}
	e.expect(t, e.p.Entry(), fromClient(cl, vip6, ack), xdpTX, toBackend(c, ack), map[string]uint64{"fwd": 1})
	if got := e.mustConn(cl, vip6).State; got != "established" {
		t.Errorf("state %s after the client's ACK, want established", got)
	}
	data := seg{flags: "PA", seq: 1001, ack: isnB + 1, payload: []byte("GET / HTTP/1.1\r\n\r\n")}
	e.expect(t, e.p.Entry(), fromClient(cl, vip6, data), xdpTX, toBackend(c, data), map[string]uint64{"fwd": 1})
	// The backend acknowledges the first 5 bytes and SACKs 10-18, in
	// its own sequence space.
	base := 1001 + c.SeqDelta
	reply := seg{flags: "A", seq: isnB + 1, ack: base + 5, opts: sack(base+10, base+18)}
	want := seg{flags: "A", seq: isnB + 1, ack: base + 5, opts: sack(1011, 1019)}
	e.expect(t, e.p.Entry(), fromBackend(backend6A, c.Source.Port(), reply), xdpTX, toClient(c, want), map[string]uint64{"ret": 1})

	fin := seg{flags: "FA", seq: 1001 + uint32(len(data.payload)), ack: isnB + 1}
	e.expect(t, e.p.Entry(), fromClient(cl, vip6, fin), xdpTX, toBackend(c, fin), map[string]uint64{"fwd": 1})
	bfin := seg{flags: "FA", seq: isnB + 1, ack: base + uint32(len(data.payload)) + 1}
	e.expect(t, e.p.Entry(), fromBackend(backend6A, c.Source.Port(), bfin), xdpTX, toClient(c, bfin),
		map[string]uint64{"ret": 1, "closed": 1})
	if st := e.backendStats(id6A); st.Active != 0 || st.HalfOpen != 0 || st.NewConns != 1 {
		t.Errorf("backend stats after the close: %+v", st)
	}
	if _, held := e.p.PortsInUse(); held != 1 {
		t.Errorf("%d ports resting after the close, want 1", held)
	}

	tr, err := e.p.BackendTraffic()
	e.must(err)
	// Every IPv6 packet above carried 40 bytes of IPv6 header, 20 of TCP,
	// its options and its payload.
	in := []seg{syn, ack, data, fin}
	out := []seg{synack, reply, bfin}
	size := func(ss []seg) (n uint64) {
		for _, s := range ss {
			n += uint64(40 + 20 + (len(s.opts)+3)/4*4 + len(s.payload))
		}
		return n
	}
	if got := tr[id6A]; got.ToBackendPackets != 4 || got.FromBackendPackets != 3 || got.ToBackendBytes != size(in) || got.FromBackendBytes != size(out) {
		t.Errorf("traffic %+v, want 4 packets of %d bytes in, 3 of %d out", got, size(in), size(out))
	}
}

// fragment6 turns an IPv6 frame into a fragment of a packet: a fragment
// header (offset in bytes, more fragments) between the IPv6 header and
// the rest.
func fragment6(b []byte, offset int, more bool) []byte {
	hdr := []byte{b[14+6], 0, byte(offset >> 8), byte(offset) &^ 7, 0, 0, 0, 42}
	if more {
		hdr[3] |= 1
	}
	out := slices.Concat(b[:14+40], hdr, b[14+40:])
	out[14+6] = 44
	binary.BigEndian.PutUint16(out[14+4:], binary.BigEndian.Uint16(b[14+4:])+8)
	return out
}

// TestIPv6Refusals: what the IPv6 path drops, passes or answers.
func TestIPv6Refusals(t *testing.T) {
	e := newEnv6(t)
	cl := netip.AddrPortFrom(client6, 41000)
	syn := fromClient(cl, vip6, seg{flags: "S", seq: 1})
	mutate := func(b []byte, f func(b []byte)) []byte { b = slices.Clone(b); f(b); return b }
	tests := []struct {
		name     string
		in       []byte
		verdict  uint32
		out      []byte
		counters map[string]uint64
	}{
		{"ack without a connection", fromClient(cl, vip6, seg{flags: "A", seq: 5, ack: 77}), xdpTX, reset(cl, vip6, "R", 77, 0),
			map[string]uint64{"reset_no_conn": 1}},
		{"data without ack or connection", fromClient(cl, vip6, seg{flags: "P", seq: 5, payload: []byte("abc")}), xdpTX, reset(cl, vip6, "RA", 0, 8),
			map[string]uint64{"reset_no_conn": 1}},
		{"rst without a connection", fromClient(cl, vip6, seg{flags: "R", seq: 5}), xdpDrop, nil, map[string]uint64{"drop_no_conn": 1}},
		{"syn with a bad checksum", mutate(syn, func(b []byte) { b[14+40+16] ^= 1 }), xdpDrop, nil, map[string]uint64{"drop_bad_csum": 1}},
		{"syn from ::1", fromClient(netip.MustParseAddrPort("[::1]:40000"), vip6, seg{flags: "S"}), xdpDrop, nil, map[string]uint64{"drop_bad_source": 1}},
		{"syn from multicast", fromClient(netip.MustParseAddrPort("[ff02::1]:40000"), vip6, seg{flags: "S"}), xdpDrop, nil, map[string]uint64{"drop_bad_source": 1}},
		{"syn from the vip", fromClient(netip.AddrPortFrom(vipAddr6, 40000), vip6, seg{flags: "S"}), xdpDrop, nil, map[string]uint64{"drop_bad_source": 1}},
		{"syn from ipv4-mapped", fromClient(netip.MustParseAddrPort("[::ffff:10.0.0.1]:40000"), vip6, seg{flags: "S"}), xdpDrop, nil, map[string]uint64{"drop_bad_source": 1}},
		{"udp without checksum", mutate(udpFrom(cl, vip6udp, clientMAC(client6), []byte("q")), func(b []byte) { b[14+40+6], b[14+40+7] = 0, 0 }),
			xdpDrop, nil, map[string]uint64{"drop_bad_csum": 1}},
		{"hop-by-hop options", mutate(syn, func(b []byte) { b[14+6] = 0 }), xdpPass, nil, map[string]uint64{"pass_ipv6_ext": 1}},
		{"first fragment to the vip", fragment6(syn, 0, true), xdpDrop, nil, map[string]uint64{"drop_fragment": 1}},
		{"later fragment to the vip", fragment6(syn, 1480, false), xdpPass, nil, map[string]uint64{"pass_fragment": 1}},
		{"first fragment elsewhere", fragment6(fromClient(cl, netip.AddrPortFrom(vipAddr6, 81), seg{flags: "S"}), 0, true), xdpPass, nil,
			map[string]uint64{"pass_fragment": 1}},
		{"first fragment of a reply", fragment6(fromBackend(backend6A, portLo+5, seg{flags: "A"}), 0, true), xdpDrop, nil,
			map[string]uint64{"drop_fragment": 1}},
		{"routing header", mutate(syn, func(b []byte) { b[14+6] = 43 }), xdpPass, nil, map[string]uint64{"pass_ipv6_ext": 1}},
		{"another address", fromClient(cl, netip.MustParseAddrPort("[fd00:50::1]:80"), seg{flags: "S"}), xdpPass, nil, map[string]uint64{"pass_not_ours": 1}},
		{"another port", fromClient(cl, netip.AddrPortFrom(vipAddr6, 81), seg{flags: "S"}), xdpPass, nil, map[string]uint64{"pass_not_ours": 1}},
		{"truncated header", packet.Truncate(syn, 14+39), xdpDrop, nil, map[string]uint64{"drop_eth_trunc": 1}},
		{"payload length beyond the frame", mutate(syn, func(b []byte) { binary.BigEndian.PutUint16(b[14+4:], 200) }), xdpDrop, nil, map[string]uint64{"drop_ip_len": 1}},
		{"version 4 in an ipv6 frame", mutate(syn, func(b []byte) { b[14] = 0x46 }), xdpDrop, nil, map[string]uint64{"drop_ip_hdr": 1}},
		{"tcp data offset beyond the payload", mutate(syn, func(b []byte) { b[14+40+12] = 0xf0 }), xdpDrop, nil, map[string]uint64{"drop_tcp_hdr": 1}},
		{"neighbour solicitation", packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: clientMAC(client6), DstMAC: lbMAC, Src: client6, Dst: lbAddr6, Type: 135, Quote: make([]byte, 40)}),
			xdpPass, nil, map[string]uint64{"pass_not_tcp": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.expect(t, e.p.Entry(), tt.in, tt.verdict, tt.out, tt.counters)
		})
	}
	if cs, err := e.p.Conns(); err != nil || len(cs) != 0 {
		t.Errorf("connections after refusals: %v, %v", cs, err)
	}
	// No backend: the SYN is refused with a RST, as in IPv4.
	e.must(e.p.ClearSelection(3))
	s := seg{flags: "S", seq: 9}
	e.expect(t, e.p.Entry(), fromClient(cl, vip6, s), xdpTX, refusal(cl, vip6, s), map[string]uint64{"rst_no_backend": 1})
}

// TestIPv6UDPAndICMP: a UDP flow over IPv6 both ways, and a "packet too
// big" error about a packet xlb sent to the backend, which reaches the
// client from the VIP quoting the client's own packet, with the ICMPv6
// checksum (over the new pseudo-header) right.
func TestIPv6UDPAndICMP(t *testing.T) {
	e := newEnv6(t)
	u := netip.AddrPortFrom(client6, 42000)
	q := []byte("a query")
	e.expectFn(t, e.p.Entry(), udpFrom(u, vip6udp, clientMAC(client6), q), xdpTX, func() []byte {
		c := e.mustConn(u, vip6udp)
		return udpTo(c.Source, c.Backend, neighbours[backend6A.Addr()], q)
	}, map[string]uint64{"fwd": 1, "new_conn": 1})
	uc := e.mustConn(u, vip6udp)
	if uc.State != "udp" || uc.Protocol != UDP {
		t.Fatalf("udp flow %+v", uc)
	}
	answer := []byte("an answer")
	e.expect(t, e.p.Entry(), packet.UDP(packet.UDPOpts{SrcMAC: neighbours[backend6A.Addr()], DstMAC: lbMAC, Src: backend6A, Dst: uc.Source, Payload: answer}),
		xdpTX, udpTo(vip6udp, u, clientMAC(client6), answer), map[string]uint64{"ret": 1})

	cl := netip.AddrPortFrom(client6, 42001)
	e.run(e.p.Entry(), fromClient(cl, vip6, seg{flags: "S", seq: 7}))
	c := e.mustConn(cl, vip6)
	data := seg{flags: "PA", seq: 8, ack: 3, payload: make([]byte, 1400)}
	ip6Part := func(b []byte) []byte { return b[14 : 14+40+int(binary.BigEndian.Uint16(b[14+4:]))] }
	sent := ip6Part(toBackend(c, data))
	original := ip6Part(fromClient(cl, vip6, data))
	ptb := func(from netip.Addr, quote []byte) []byte {
		return packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: neighbours[gateway6], DstMAC: lbMAC, Src: from, Dst: lbAddr6,
			Type: 2, Rest: 1280, Quote: quote, TTL: 61})
	}
	toClient := func(quote []byte) []byte {
		return packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: lbMAC, DstMAC: clientMAC(client6), Src: vipAddr6, Dst: client6,
			Type: 2, Rest: 1280, Quote: quote, TTL: 61})
	}
	t.Run("tcp, quoted to 1232 bytes", func(t *testing.T) {
		e.expect(t, e.p.Entry(), ptb(gateway6, sent[:1232]), xdpTX, toClient(original[:1232]), map[string]uint64{"icmp_error": 1})
	})
	t.Run("tcp, 8 bytes of tcp quoted", func(t *testing.T) {
		e.expect(t, e.p.Entry(), ptb(gateway6, sent[:48]), xdpTX, toClient(original[:48]), map[string]uint64{"icmp_error": 1})
	})
	t.Run("udp", func(t *testing.T) {
		usent := ip6Part(udpTo(uc.Source, uc.Backend, neighbours[backend6A.Addr()], q))
		e.expect(t, e.p.Entry(), ptb(gateway6, usent), xdpTX, packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: lbMAC, DstMAC: clientMAC(client6),
			Src: vipAddr6, Dst: client6, Type: 2, Rest: 1280, Quote: ip6Part(udpFrom(u, vip6udp, clientMAC(client6), q)), TTL: 61}),
			map[string]uint64{"icmp_error": 1})
	})
	t.Run("not about xlb's packets", func(t *testing.T) {
		other := ip6Part(fromClient(netip.AddrPortFrom(lbAddr6, 40000), netip.AddrPortFrom(backend6A.Addr(), 22), seg{flags: "S"}))
		e.expect(t, e.p.Entry(), ptb(gateway6, other), xdpPass, nil, map[string]uint64{"pass_not_tcp": 1})
	})
}

// TestIPv6Tables: the daemon's side of the IPv6 tables. Expiry, orphaned
// ports (found through the Go mirror of flow_hash6) and ending a backend's
// connections work on IPv6 connections as on IPv4 ones, side by side.
func TestIPv6Tables(t *testing.T) {
	e := newEnv6(t)
	e.must(e.p.SetSelection(3, ModeRandom, []uint32{id6A, id6B}))
	syn := seg{flags: "S", seq: 1}
	var v6 []netip.AddrPort
	for i := range 40 {
		cl := netip.AddrPortFrom(client6, uint16(43000+i))
		e.run(e.p.Entry(), fromClient(cl, vip6, syn))
		v6 = append(v6, cl)
		e.run(e.p.Entry(), fromClient(netip.AddrPortFrom(client1, uint16(43000+i)), vip, syn))
	}
	cs, err := e.p.Conns()
	e.must(err)
	byBackend := map[uint32]int{}
	for _, c := range cs {
		byBackend[c.BackendID]++
	}
	if len(cs) != 80 || byBackend[id6A]+byBackend[id6B] != 40 || byBackend[id6A] == 0 || byBackend[id6B] == 0 {
		t.Fatalf("%d connections, by backend %v; want 40 IPv6 ones over both IPv6 backends and 40 IPv4 ones", len(cs), byBackend)
	}
	used, _ := e.p.PortsInUse()
	if used != 80 {
		t.Errorf("%d ports in use, want 80", used)
	}
	pu := e.p.PortUse()
	if pu[backend6A].Used != byBackend[id6A] || pu[backend6B].Used != byBackend[id6B] {
		t.Errorf("port use %v, want %v", pu, byBackend)
	}

	n, err := e.p.EndBackendConns(id6A)
	if err != nil || n != byBackend[id6A] {
		t.Errorf("EndBackendConns(6A) = %d, %v; want %d", n, err, byBackend[id6A])
	}
	if st := e.backendStats(id6A); st.Active != 0 {
		t.Errorf("backend 6A active %d after its connections ended", st.Active)
	}

	// An orphan: a port way whose connection slot is gone.
	victim := v6[0]
	if c, ok := e.conn(victim, vip6); !ok || c.BackendID != id6B {
		// Take one of 6B's, still live.
		for _, cl := range v6 {
			if c, ok := e.conn(cl, vip6); ok && c.BackendID == id6B {
				victim = cl
				break
			}
		}
	}
	e.orphan(victim, vip6)

	short := Timeouts{SYN: time.Second, Established: time.Second, FIN: time.Second, Closed: time.Second, UDP: time.Second, TimeWait: time.Second}
	time.Sleep(2200 * time.Millisecond)
	res, err := e.p.GC(short)
	e.must(err)
	// 6B's live connections (but the victim) and the 40 IPv4 ones expire;
	// the victim's port is an orphan; 6A's ports, resting since
	// EndBackendConns, are released.
	if wantExpired := 40 + byBackend[id6B] - 1; res.Expired != wantExpired || res.Orphans != 1 || res.Released != byBackend[id6A] {
		t.Errorf("sweep %+v, want %d expired, 1 orphan, %d released", res, wantExpired, byBackend[id6A])
	}
	if cs, _ := e.p.Conns(); len(cs) != 0 {
		t.Errorf("%d connections left after the sweep", len(cs))
	}
}

// TestIPv6SYNChallenge: the SYN flood defence on an IPv6 flow. A SYN is
// answered with a SYN-ACK whose acknowledgement is a cookie; the RST that
// returns it validates the source, whose next SYN is served.
func TestIPv6SYNChallenge(t *testing.T) {
	e := newEnv6(t)
	e.opts.SYN = SYNDefence{Mode: SYNOn, TrustFor: time.Minute}
	e.must(e.p.SetSettings(e.opts))
	cl := netip.AddrPortFrom(client6, 44000)
	syn := seg{flags: "S", seq: 100}
	_, out := e.run(e.p.Entry(), fromClient(cl, vip6, syn))
	if err := packet.Verify(out); err != nil {
		t.Fatalf("challenge: %v", err)
	}
	d, err := packet.Decode(out)
	if err != nil || d.Flags != "SA" || d.Src != vip6 || d.Dst != cl || d.Ack == syn.seq+1 {
		t.Fatalf("challenge %+v, %v: want a SYN-ACK from the VIP with a cookie", d, err)
	}
	e.expect(t, e.p.Entry(), fromClient(cl, vip6, seg{flags: "R", seq: d.Ack}), xdpDrop, nil, map[string]uint64{"syn_validated": 1})
	e.expectFn(t, e.p.Entry(), fromClient(cl, vip6, syn), xdpTX, func() []byte { return toBackend(e.mustConn(cl, vip6), syn) },
		map[string]uint64{"fwd": 1, "new_conn": 1})
	// Another source in the same /64 is not trusted.
	other := netip.AddrPortFrom(client6b, 44000)
	if v, _ := e.run(e.p.Entry(), fromClient(other, vip6, syn)); v != xdpTX {
		t.Errorf("verdict %s for another source's SYN", verdictName(v))
	}
	if _, ok := e.conn(other, vip6); ok {
		t.Errorf("an unvalidated source got a connection")
	}
}

// TestIPv6Redirect: an IPv6 backend behind another interface is reached
// through bpf_redirect, with that interface's MACs.
func TestIPv6Redirect(t *testing.T) {
	e := newEnv6(t)
	e.must(e.p.SetSelection(3, ModeRandom, []uint32{id6L1}))
	cl := netip.AddrPortFrom(client6, 45000)
	syn := seg{flags: "S", seq: 1}
	v, out := e.run(e.p.Entry(), fromClient(cl, vip6, syn))
	c := e.mustConn(cl, vip6)
	want := packet.TCP(packet.TCPOpts{SrcMAC: lb1MAC, DstMAC: neighbours[backend6L1.Addr()], Src: c.Source, Dst: c.Backend,
		Flags: "S", Seq: 1 + c.SeqDelta})
	if v != xdpRedirect || string(out) != string(want) {
		t.Errorf("verdict %s, packet\n% x\nwant\n% x", verdictName(v), out, want)
	}
}
