package dispatcher

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/packet"
)

func macFor(a netip.Addr) net.HardwareAddr {
	if mac, ok := neighbours[a]; ok {
		return mac
	}
	return neighbours[gateway] // the default route
}

func tcpCsum(b []byte) uint16 { return binary.BigEndian.Uint16(b[14+20+16:]) }
func ipCsum(b []byte) uint16  { return binary.BigEndian.Uint16(b[14+10:]) }

// TestChecksumProperty sends random flows through SYN, reply and data
// packets and checks every output byte against an independently built
// packet, with its checksums verified. Some packets are shaped so that a
// checksum in the input or the output is 0x0000, where an incremental
// update that yields 0xffff is wrong.
func TestChecksumProperty(t *testing.T) {
	e := newEnvPorts(t, 8192, 1, 65535)
	rng := rand.New(rand.NewPCG(1, 2))
	randAddr := func(first byte) netip.Addr {
		return netip.AddrFrom4([4]byte{first, byte(rng.UintN(256)), byte(rng.UintN(256)), byte(1 + rng.UintN(254))})
	}
	randPort := func() uint16 { return uint16(1 + rng.UintN(65535)) }
	const services = 16
	vips := make([]netip.AddrPort, services)
	for i := range vips {
		vips[i] = netip.AddrPortFrom(randAddr(100), randPort())
		backends := []uint32{uint32(100 + 2*i), uint32(101 + 2*i)}
		for _, id := range backends {
			e.must(e.p.SetBackend(id, netip.AddrPortFrom(randAddr(172), randPort()), 1))
		}
		e.must(e.p.SetService(uint32(10+i), vips[i], TCP, []int{0}))
		e.must(e.p.SetSelection(uint32(10+i), ModeRandom, backends))
	}

	payload := func() []byte {
		b := make([]byte, rng.UintN(300))
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return b
	}
	// run sends in, compares with want and verifies.
	check := func(t *testing.T, what string, in, want []byte) {
		t.Helper()
		verdict, out := e.run(e.p.Entry(), in)
		if verdict != xdpTX {
			t.Fatalf("%s: verdict %s", what, verdictName(verdict))
		}
		if err := packet.Verify(out); err != nil {
			t.Errorf("%s: %v\n in % x\nout % x", what, err, in, out)
		}
		if want != nil && !bytes.Equal(out, want) {
			t.Errorf("%s: output differs:\n got % x\nwant % x", what, out, want)
		}
	}
	// zeroed returns opts with the payload's first word and the IP ID
	// chosen so that the checksums of build(opts) are 0x0000.
	zeroed := func(o packet.TCPOpts, build func(packet.TCPOpts) []byte) packet.TCPOpts {
		o.Payload = append([]byte{0, 0}, o.Payload...)
		o.ID = 0
		b := build(o)
		binary.BigEndian.PutUint16(o.Payload, tcpCsum(b))
		o.ID = ipCsum(b)
		return o
	}

	var zeroOut, zeroIn int
	for i := range 500 {
		cl := netip.AddrPortFrom(randAddr(byte(11+rng.UintN(80))), randPort())
		to := vips[rng.UintN(services)]
		syn := packet.TCPOpts{
			SrcMAC: macFor(cl.Addr()), DstMAC: lbMAC, Src: cl, Dst: to, Flags: "S",
			Seq: rng.Uint32(), Window: uint16(rng.UintN(65536)), TTL: uint8(1 + rng.UintN(255)), ID: uint16(rng.UintN(65536)),
		}
		// The wanted forward packet: the same segment from LB:lport to the
		// backend, read back from the connection after the SYN.
		var c Conn
		fwd := func(o packet.TCPOpts) packet.TCPOpts {
			o.SrcMAC, o.DstMAC, o.Src, o.Dst = lbMAC, macFor(c.Backend.Addr()), c.Source, c.Backend
			o.Seq += c.SeqDelta
			return o
		}
		ret := func(o packet.TCPOpts) packet.TCPOpts {
			o.SrcMAC, o.DstMAC, o.Src, o.Dst = lbMAC, macFor(cl.Addr()), to, cl
			if strings.Contains(o.Flags, "A") {
				o.Ack -= c.SeqDelta
			}
			return o
		}
		before := e.stats()
		verdict, out := e.run(e.p.Entry(), packet.TCP(syn))
		if verdict != xdpTX {
			u, h := e.p.PortsInUse()
			t.Fatalf("flow %d syn %s -> %s: verdict %s, counters %v used %d held %d max %d", i, cl, to, verdictName(verdict), statsDelta(before, e.stats()), u, h, e.p.objs.XlbPorts.MaxEntries())
		}
		c = e.mustConn(cl, to)
		if want := packet.TCP(fwd(syn)); !bytes.Equal(out, want) {
			t.Errorf("flow %d syn: output differs:\n got % x\nwant % x", i, out, want)
		}
		if err := packet.Verify(out); err != nil {
			t.Errorf("flow %d syn: %v", i, err)
		}

		reply := packet.TCPOpts{
			SrcMAC: macFor(c.Backend.Addr()), DstMAC: lbMAC, Src: c.Backend, Dst: c.Source, Flags: "SA",
			Seq: rng.Uint32(), Ack: syn.Seq + 1 + c.SeqDelta, Window: uint16(rng.UintN(65536)), TTL: uint8(1 + rng.UintN(255)), ID: uint16(rng.UintN(65536)),
			Payload: payload(),
		}
		check(t, "reply", packet.TCP(reply), packet.TCP(ret(reply)))

		// Forward data whose output checksums must be 0x0000.
		data := syn
		data.Flags, data.Ack, data.Payload = "PA", reply.Seq+1, payload()
		data = zeroed(data, func(o packet.TCPOpts) []byte { return packet.TCP(fwd(o)) })
		want := packet.TCP(fwd(data))
		if tcpCsum(want) == 0 && ipCsum(want) == 0 {
			zeroOut++
		}
		check(t, "forward data, zero output checksums", packet.TCP(data), want)

		// A reply whose input checksums are 0x0000.
		r2 := reply
		r2.Flags, r2.Payload = "A", payload()
		r2 = zeroed(r2, packet.TCP)
		if in := packet.TCP(r2); tcpCsum(in) == 0 && ipCsum(in) == 0 {
			zeroIn++
		}
		check(t, "reply, zero input checksums", packet.TCP(r2), packet.TCP(ret(r2)))

		// And the reverse: a forward packet with zero input checksums, a
		// reply with zero output checksums.
		d2 := data
		d2.Payload = payload()
		d2 = zeroed(d2, packet.TCP)
		check(t, "forward data, zero input checksums", packet.TCP(d2), packet.TCP(fwd(d2)))
		r3 := reply
		r3.Flags, r3.Payload = "PA", payload()
		r3 = zeroed(r3, func(o packet.TCPOpts) []byte { return packet.TCP(ret(o)) })
		check(t, "reply, zero output checksums", packet.TCP(r3), packet.TCP(ret(r3)))
		if t.Failed() {
			t.Fatalf("stopping after flow %d: %s -> %s via %s -> %s", i, cl, to, c.Source, c.Backend)
		}
	}
	// The shaping itself must have worked, or the edge cases went untested.
	if zeroOut != 500 || zeroIn != 500 {
		t.Errorf("shaped packets with zero checksums: %d outputs, %d inputs, want 500 each", zeroOut, zeroIn)
	}
}
