package dispatcher

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/packet"
)

// vipDNS is a UDP service of the test network (service 3, backends A and
// B, hash), beside the TCP ones on the same address.
var vipDNS = netip.AddrPortFrom(vipAddr, 53)

func udpFrom(src, dst netip.AddrPort, srcMAC []byte, payload []byte) []byte {
	return packet.UDP(packet.UDPOpts{SrcMAC: srcMAC, DstMAC: lbMAC, Src: src, Dst: dst, Payload: payload})
}

func udpTo(src, dst netip.AddrPort, dstMAC []byte, payload []byte) []byte {
	return packet.UDP(packet.UDPOpts{SrcMAC: lbMAC, DstMAC: dstMAC, Src: src, Dst: dst, Payload: payload})
}

// noCsum clears a UDP datagram's checksum: none, as IPv4 allows.
func noCsum(b []byte) []byte {
	b = bytes.Clone(b)
	binary.BigEndian.PutUint16(b[14+20+6:], 0)
	return b
}

// TestUDP covers UDP services: a datagram of a new flow creates it, the
// flow's datagrams keep its backend and source port, replies come back
// translated, a checksum of 0 stays 0, a TCP packet does not match a UDP
// flow's port, a datagram for a VIP port with no UDP service passes, and
// a flow ends after its idle timeout.
func TestUDP(t *testing.T) {
	e := newEnv(t, 4096)
	e.opts.ConntrackTimeout.UDP = time.Second
	e.must(e.p.SetSettings(e.opts))
	e.must(e.p.SetService(3, vipDNS, UDP, []int{0}))
	e.must(e.p.SetSelection(3, ModeHash, []uint32{idA, idB}))
	cl := netip.AddrPortFrom(client1, 5353)
	q := []byte("a dns query")
	var c Conn
	toBackend := func(payload []byte) []byte {
		return packet.UDP(packet.UDPOpts{SrcMAC: lbMAC, DstMAC: neighbours[c.Backend.Addr()], Src: c.Source, Dst: c.Backend, Payload: payload})
	}
	e.expectFn(t, e.p.Entry(), udpFrom(cl, vipDNS, clientMAC(client1), q), xdpTX, func() []byte {
		c = e.mustConn(cl, vipDNS)
		return toBackend(q)
	}, map[string]uint64{"fwd": 1, "new_conn": 1})
	if c.Protocol != UDP || c.State != "udp" || c.SeqDelta != 0 {
		t.Errorf("flow %+v, want a UDP flow", c)
	}
	if st := e.backendStats(c.BackendID); st.Active != 1 || st.HalfOpen != 0 {
		t.Errorf("backend: %+v, want 1 active, none half-open", st)
	}
	// The same flow: the same backend and port; no checksum stays none.
	e.expect(t, e.p.Entry(), noCsum(udpFrom(cl, vipDNS, clientMAC(client1), q)), xdpTX, noCsum(toBackend(q)), map[string]uint64{"fwd": 1})
	// The reply.
	a := []byte("an answer")
	e.expect(t, e.p.Entry(), packet.UDP(packet.UDPOpts{SrcMAC: neighbours[c.Backend.Addr()], DstMAC: lbMAC, Src: c.Backend, Dst: c.Source, Payload: a}),
		xdpTX, udpTo(vipDNS, cl, clientMAC(client1), a), map[string]uint64{"ret": 1})
	// A TCP packet to the flow's port is not the flow's.
	e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), seg{flags: "A", seq: 1}), xdpPass, nil, map[string]uint64{"pass_not_ours": 1})
	// A datagram to a VIP port without a UDP service passes.
	e.expect(t, e.p.Entry(), udpFrom(cl, vip, clientMAC(client1), q), xdpPass, nil, map[string]uint64{"pass_not_ours": 1})
	// A datagram with a bad checksum makes no flow.
	bad := udpFrom(netip.AddrPortFrom(client1, 5354), vipDNS, clientMAC(client1), q)
	bad[14+20+8] ^= 0xff // the payload's first byte (the frame is padded)
	e.expect(t, e.p.Entry(), bad, xdpDrop, nil, map[string]uint64{"drop_bad_csum": 1})

	// Idle past the UDP timeout, the flow is swept and its port rests.
	time.Sleep(1200 * time.Millisecond)
	res, err := e.p.GC(e.opts.ConntrackTimeout)
	e.must(err)
	if res.Expired != 1 {
		t.Errorf("sweep %+v, want the UDP flow expired", res)
	}
	if _, ok := e.conn(cl, vipDNS); ok {
		t.Errorf("the idle UDP flow is still tracked")
	}
	if st := e.backendStats(c.BackendID); st.Active != 0 {
		t.Errorf("backend: %+v, want nothing active", st)
	}
}

// TestUDPHashKeepsFlows sends datagrams of 200 flows twice, through the
// hash policy: each flow's second datagram goes where its first went, and
// both backends are used.
func TestUDPHashKeepsFlows(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetService(3, vipDNS, UDP, []int{0}))
	e.must(e.p.SetSelection(3, ModeHash, []uint32{idA, idB}))
	first := map[netip.AddrPort]netip.AddrPort{}
	for round := range 2 {
		for i := range 200 {
			cl := netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, 2, 0, byte(i)}), uint16(10000+i))
			v, out := e.run(e.p.Entry(), udpFrom(cl, vipDNS, client2MAC, []byte{byte(i)}))
			if v != xdpTX {
				t.Fatalf("flow %d: %s", i, verdictName(v))
			}
			if err := packet.Verify(out); err != nil {
				t.Fatalf("flow %d: %v", i, err)
			}
			d, err := packet.Decode(out)
			e.must(err)
			if round == 0 {
				first[cl] = d.Dst
			} else if first[cl] != d.Dst {
				t.Errorf("flow %s went to %s, then %s", cl, first[cl], d.Dst)
			}
		}
	}
	seen := map[netip.AddrPort]int{}
	for _, b := range first {
		seen[b]++
	}
	if len(seen) != 2 {
		t.Errorf("backends used: %v, want both", seen)
	}
}
