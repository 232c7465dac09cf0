package dispatcher

import (
	"net/netip"
	"testing"

	"github.com/xlb-project/xlb/internal/packet"
)

// ipPart is a frame's IPv4 packet without the Ethernet header or padding.
func ipPart(b []byte) []byte {
	n := int(b[14+2])<<8 | int(b[14+3])
	return b[14 : 14+n]
}

// TestICMPErrorTranslation covers ICMP errors about packets xlb sent to a
// backend, as a router between them sends them (here the gateway): each
// reaches the client from the VIP, quoting the packet the client sent
// exactly as the client sent it (so every quoted checksum and the TCP
// sequence number are back as they were), with a correct ICMP checksum.
// Errors about other packets, and echo requests, go to the host.
func TestICMPErrorTranslation(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	e.must(e.p.SetService(3, vipDNS, UDP, []int{0}))
	e.must(e.p.SetSelection(3, ModeRandom, []uint32{idA}))
	gw := neighbours[gateway]
	cl := netip.AddrPortFrom(client1, 48000)
	e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 7}))
	c := e.mustConn(cl, vip)
	data := seg{flags: "PA", seq: 8, ack: 3, payload: make([]byte, 1400)}
	// A "fragmentation needed" error (type 3 code 4, next hop MTU 1280).
	frag := func(quote []byte) []byte {
		return packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: gw, DstMAC: lbMAC, Src: gateway, Dst: lbAddr,
			Type: 3, Code: 4, Rest: 1280, Quote: quote, TTL: 61, ID: 99})
	}
	toClient := func(quote []byte) []byte {
		return packet.ICMPError(packet.ICMPErrorOpts{SrcMAC: lbMAC, DstMAC: clientMAC(client1), Src: vipAddr, Dst: client1,
			Type: 3, Code: 4, Rest: 1280, Quote: quote, TTL: 61, ID: 99})
	}
	sent := ipPart(toBackend(c, data))            // what xlb sent to the backend
	original := ipPart(fromClient(cl, vip, data)) // what the client sent
	t.Run("tcp, quoted whole", func(t *testing.T) {
		e.expect(t, e.p.Entry(), frag(sent[:576]), xdpTX, toClient(original[:576]), map[string]uint64{"icmp_error": 1})
	})
	t.Run("tcp, 8 bytes of tcp quoted", func(t *testing.T) {
		e.expect(t, e.p.Entry(), frag(sent[:28]), xdpTX, toClient(original[:28]), map[string]uint64{"icmp_error": 1})
	})

	u := netip.AddrPortFrom(client1, 48001)
	q := []byte("a query")
	e.run(e.p.Entry(), udpFrom(u, vipDNS, clientMAC(client1), q))
	uc := e.mustConn(u, vipDNS)
	usent := ipPart(packet.UDP(packet.UDPOpts{SrcMAC: lbMAC, DstMAC: neighbours[backendA.Addr()], Src: uc.Source, Dst: uc.Backend, Payload: q}))
	uoriginal := ipPart(udpFrom(u, vipDNS, clientMAC(client1), q))
	t.Run("udp", func(t *testing.T) {
		e.expect(t, e.p.Entry(), frag(usent), xdpTX, toClient(uoriginal), map[string]uint64{"icmp_error": 1})
	})

	t.Run("not about xlb's packets", func(t *testing.T) {
		other := ipPart(fromClient(netip.AddrPortFrom(lbAddr, 40000), netip.AddrPortFrom(backendA.Addr(), 22), seg{flags: "S"}))
		e.expect(t, e.p.Entry(), frag(other), xdpPass, nil, map[string]uint64{"pass_not_tcp": 1})
		echo := packet.ICMPEcho(packet.ICMPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: client1, Dst: vipAddr, ID: 1, Seq: 1})
		e.expect(t, e.p.Entry(), echo, xdpPass, nil, map[string]uint64{"pass_not_tcp": 1})
	})
}
