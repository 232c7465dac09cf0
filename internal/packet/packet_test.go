package packet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
)

var (
	client = netip.MustParseAddrPort("10.0.0.1:40000")
	vip    = netip.MustParseAddrPort("10.0.0.100:80")
)

func sampleTCP() TCPOpts {
	return TCPOpts{
		SrcMAC:  net.HardwareAddr{0x02, 1, 2, 3, 4, 5},
		DstMAC:  net.HardwareAddr{0x02, 6, 7, 8, 9, 10},
		Src:     client,
		Dst:     vip,
		Flags:   "PA",
		Seq:     1000,
		Ack:     2000,
		Payload: []byte("GET / HTTP/1.1\r\n\r\n"),
		TTL:     61,
		ID:      0x1234,
	}
}

func TestVerifyAcceptsBuilt(t *testing.T) {
	tests := []struct {
		name string
		pkt  []byte
	}{
		{"tcp", TCP(sampleTCP())},
		{"tcp syn no payload", TCP(TCPOpts{Src: client, Dst: vip, Flags: "S"})},
		{"tcp odd payload", TCP(TCPOpts{Src: client, Dst: vip, Flags: "A", Payload: []byte("abc")})},
		{"tcp ip options", TCP(TCPOpts{Src: client, Dst: vip, Flags: "S", IPOptions: []byte{0x94, 0x04, 0, 0, 0x01}})},
		{"tcp bogus data offset", TCP(TCPOpts{Src: client, Dst: vip, Flags: "S", DataOffsetOverride: 15})},
		{"tcp first fragment", TCP(TCPOpts{Src: client, Dst: vip, Flags: "A", MoreFragments: true, Payload: []byte("x")})},
		{"tcp later fragment", TCP(TCPOpts{Src: client, Dst: vip, Flags: "A", FragOffset: 10})},
		{"udp", UDP(UDPOpts{Src: client, Dst: netip.MustParseAddrPort("10.0.0.100:53"), Payload: []byte("query")})},
		{"icmp echo", ICMPEcho(ICMPOpts{Src: client.Addr(), Dst: vip.Addr(), ID: 7, Seq: 1, Payload: []byte("ping")})},
		{"icmp echo reply", ICMPEcho(ICMPOpts{Src: vip.Addr(), Dst: client.Addr(), ID: 7, Seq: 1, Reply: true})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := Verify(tt.pkt); err != nil {
				t.Fatalf("Verify: %v", err)
			}
			// Ethernet padding after the IP total length is ignored.
			if err := Verify(append(bytes.Clone(tt.pkt), 0, 0, 0, 0)); err != nil {
				t.Fatalf("Verify with trailing padding: %v", err)
			}
		})
	}
}

func TestTCPMalformationKnobs(t *testing.T) {
	p := TCP(TCPOpts{Src: client, Dst: vip, Flags: "S", IPOptions: []byte{0x94, 0x04, 0, 0, 0x01}})
	if ihl := p[14] & 0x0f; ihl != 7 {
		t.Errorf("IHL with 5 option bytes = %d, want 7", ihl)
	}
	if got := p[14+20 : 14+28]; !bytes.Equal(got, []byte{0x94, 0x04, 0, 0, 0x01, 0, 0, 0}) {
		t.Errorf("option bytes = %x", got)
	}
	if len(p) != 14+28+20 {
		t.Errorf("len = %d, want %d", len(p), 14+28+20)
	}

	p = TCP(TCPOpts{Src: client, Dst: vip, Flags: "S", DataOffsetOverride: 3})
	if off := p[14+20+12] >> 4; off != 3 {
		t.Errorf("data offset = %d, want 3", off)
	}
	if _, err := Decode(p); !errors.Is(err, ErrMalformed) {
		t.Errorf("Decode with data offset 3: %v, want ErrMalformed", err)
	}

	p = TCP(TCPOpts{Src: client, Dst: vip, Flags: "A", FragOffset: 100, MoreFragments: true})
	if ff := binary.BigEndian.Uint16(p[14+6:]); ff != 0x2000|100 {
		t.Errorf("flags/fragment offset = %#x, want %#x", ff, 0x2000|100)
	}
}

// flipEveryBit flips each bit of pkt[from:to] in turn and wants Verify to
// reject every result.
func flipEveryBit(t *testing.T, pkt []byte, from, to int) {
	t.Helper()
	if end := ipEnd(pkt); to > end {
		t.Fatalf("flip range ends at %d, past the IPv4 datagram (%d)", to, end)
	}
	for i := from; i < to; i++ {
		for bit := range 8 {
			b := bytes.Clone(pkt)
			b[i] ^= 1 << bit
			if err := Verify(b); err == nil {
				t.Errorf("Verify accepted packet with byte %d bit %d flipped", i, bit)
			}
		}
	}
}

// ipEnd is the end of the IPv4 datagram in pkt; gopacket pads short frames
// to the Ethernet minimum of 60 bytes, and Verify ignores that padding.
func ipEnd(pkt []byte) int {
	return 14 + int(binary.BigEndian.Uint16(pkt[14+2:]))
}

func TestVerifyRejectsEveryBitFlip(t *testing.T) {
	const eth, ip, tcp = 14, 20, 20
	t.Run("tcp", func(t *testing.T) {
		pkt := TCP(sampleTCP())
		t.Run("ip header", func(t *testing.T) { flipEveryBit(t, pkt, eth, eth+ip) })
		t.Run("tcp header", func(t *testing.T) { flipEveryBit(t, pkt, eth+ip, eth+ip+tcp) })
		t.Run("payload", func(t *testing.T) { flipEveryBit(t, pkt, eth+ip+tcp, ipEnd(pkt)) })
	})
	t.Run("tcp with ip options", func(t *testing.T) {
		o := sampleTCP()
		o.IPOptions = []byte{0x94, 0x04, 0, 0}
		pkt := TCP(o)
		flipEveryBit(t, pkt, eth, ipEnd(pkt))
	})
	t.Run("udp", func(t *testing.T) {
		pkt := UDP(UDPOpts{Src: client, Dst: vip, Payload: []byte("hello")})
		flipEveryBit(t, pkt, eth, ipEnd(pkt))
	})
	t.Run("icmp", func(t *testing.T) {
		pkt := ICMPEcho(ICMPOpts{Src: client.Addr(), Dst: vip.Addr(), ID: 1, Seq: 2, Payload: []byte("ping")})
		flipEveryBit(t, pkt, eth, ipEnd(pkt))
	})
}

func TestVerifyNamesTheChecksum(t *testing.T) {
	pkt := TCP(sampleTCP())
	b := bytes.Clone(pkt)
	b[14+20+16] ^= 0xff // TCP checksum
	err := Verify(b)
	var ce *ChecksumError
	if !errors.As(err, &ce) || ce.Layer != "tcp" || !errors.Is(err, ErrChecksum) {
		t.Fatalf("Verify = %v, want a tcp ChecksumError", err)
	}
	if want := binary.BigEndian.Uint16(pkt[14+20+16:]); ce.Want != want || ce.Got != want^0xff00 {
		t.Errorf("ChecksumError = %+v, want Want %#04x Got %#04x", ce, want, want^0xff00)
	}
	if !strings.Contains(err.Error(), "tcp checksum") {
		t.Errorf("error %q does not name the tcp checksum", err)
	}

	b = bytes.Clone(pkt)
	b[14+8]-- // TTL, as a forwarder that forgets the checksum would
	if err := Verify(b); !errors.As(err, &ce) || ce.Layer != "ipv4" {
		t.Fatalf("Verify = %v, want an ipv4 ChecksumError", err)
	}
}

// TestIPv4ChecksumNegativeZero builds a header whose correct checksum is
// 0x0000 and checks that 0xffff (the same value in one's complement, as an
// RFC 1141 incremental update yields) is rejected.
func TestIPv4ChecksumNegativeZero(t *testing.T) {
	o := sampleTCP()
	o.ID = 0
	pkt := TCP(o)
	c := uint32(binary.BigEndian.Uint16(pkt[14+10:]))
	// Adding the checksum to the ID makes the other words sum to 0xffff.
	o.ID = uint16(fold(c))
	pkt = TCP(o)
	if got := binary.BigEndian.Uint16(pkt[14+10:]); got != 0x0000 {
		t.Fatalf("builder checksum = %#04x, want 0x0000 for this header", got)
	}
	if err := Verify(pkt); err != nil {
		t.Fatalf("Verify with checksum 0x0000: %v", err)
	}
	b := bytes.Clone(pkt)
	binary.BigEndian.PutUint16(b[14+10:], 0xffff)
	var ce *ChecksumError
	if err := Verify(b); !errors.As(err, &ce) || ce.Layer != "ipv4" || ce.Want != 0 || ce.Got != 0xffff {
		t.Fatalf("Verify with checksum 0xffff = %v, want ipv4 want 0x0000 got 0xffff", err)
	}
}

func TestVerifyUDPZeroChecksum(t *testing.T) {
	pkt := UDP(UDPOpts{Src: client, Dst: vip, Payload: []byte("x")})
	binary.BigEndian.PutUint16(pkt[14+20+6:], 0)
	if err := Verify(pkt); err != nil {
		t.Fatalf("Verify with no UDP checksum: %v", err)
	}
}

func TestVerifyRejectsOthers(t *testing.T) {
	pkt := TCP(sampleTCP())
	tests := []struct {
		name string
		pkt  []byte
		want error
	}{
		{"arp", ARP(ARPOpts{SenderIP: client.Addr(), TargetIP: vip.Addr()}), ErrUnsupported},
		{"short ethernet", Truncate(pkt, 13), ErrTruncated},
		{"short ip", Truncate(pkt, 30), ErrTruncated},
		{"short payload", Truncate(pkt, len(pkt)-1), ErrTruncated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := Verify(tt.pkt); !errors.Is(err, tt.want) {
				t.Errorf("Verify = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestDecodeRoundTrip(t *testing.T) {
	for _, flags := range []string{"S", "SA", "A", "PA", "FA", "R", "RA", "FSRPAUEC"} {
		t.Run(flags, func(t *testing.T) {
			o := sampleTCP()
			o.Flags = flags
			d, err := Decode(TCP(o))
			if err != nil {
				t.Fatal(err)
			}
			want := Decoded{
				SrcMAC: o.SrcMAC, DstMAC: o.DstMAC, Src: o.Src, Dst: o.Dst,
				Proto: ProtoTCP, TTL: o.TTL, ID: o.ID, Flags: flags,
				Seq: o.Seq, Ack: o.Ack, Window: DefaultWindow, Payload: o.Payload,
			}
			assertDecoded(t, d, want)
		})
	}
	t.Run("udp", func(t *testing.T) {
		o := UDPOpts{Src: client, Dst: vip, Payload: []byte("dns")}
		d, err := Decode(UDP(o))
		if err != nil {
			t.Fatal(err)
		}
		assertDecoded(t, d, Decoded{
			SrcMAC: DefaultSrcMAC, DstMAC: DefaultDstMAC, Src: o.Src, Dst: o.Dst,
			Proto: ProtoUDP, TTL: DefaultTTL, Payload: o.Payload,
		})
	})
	t.Run("icmp", func(t *testing.T) {
		o := ICMPOpts{Src: client.Addr(), Dst: vip.Addr(), ID: 3, Seq: 4, Payload: []byte("ping")}
		d, err := Decode(ICMPEcho(o))
		if err != nil {
			t.Fatal(err)
		}
		assertDecoded(t, d, Decoded{
			SrcMAC: DefaultSrcMAC, DstMAC: DefaultDstMAC,
			Src: netip.AddrPortFrom(o.Src, 0), Dst: netip.AddrPortFrom(o.Dst, 0),
			Proto: ProtoICMP, TTL: DefaultTTL, ICMPType: 8, Payload: o.Payload,
		})
	})
}

func assertDecoded(t *testing.T, got, want Decoded) {
	t.Helper()
	if !bytes.Equal(got.SrcMAC, want.SrcMAC) || !bytes.Equal(got.DstMAC, want.DstMAC) {
		t.Errorf("MACs = %v -> %v, want %v -> %v", got.SrcMAC, got.DstMAC, want.SrcMAC, want.DstMAC)
	}
	if !bytes.Equal(got.Payload, want.Payload) {
		t.Errorf("payload = %q, want %q", got.Payload, want.Payload)
	}
	got.SrcMAC, got.DstMAC, got.Payload = nil, nil, nil
	want.SrcMAC, want.DstMAC, want.Payload = nil, nil, nil
	if got.Flags != want.Flags || got.Src != want.Src || got.Dst != want.Dst ||
		got.Proto != want.Proto || got.TTL != want.TTL || got.ID != want.ID ||
		got.Seq != want.Seq || got.Ack != want.Ack || got.Window != want.Window ||
		got.ICMPType != want.ICMPType || got.ICMPCode != want.ICMPCode {
		t.Errorf("Decode = %+v, want %+v", got, want)
	}
}

func TestTruncate(t *testing.T) {
	b := []byte{1, 2, 3}
	c := Truncate(b, 2)
	c[0] = 9
	if b[0] != 1 || len(c) != 2 {
		t.Errorf("Truncate shares memory or has wrong length: %v %v", b, c)
	}
	if got := Truncate(b, 10); len(got) != 3 {
		t.Errorf("Truncate past the end = %v", got)
	}
}

// TestIPv6 builds IPv6 TCP, UDP and ICMPv6 packets with gopacket and
// checks Verify and Decode on them: good checksums pass, a flipped bit
// in the pseudo-header's addresses or in the payload fails, a UDP
// checksum of zero fails (it is mandatory in IPv6).
func TestIPv6(t *testing.T) {
	src := netip.MustParseAddrPort("[2001:db8::1]:40000")
	dst := netip.MustParseAddrPort("[2001:db8:1::10]:80")
	tcp := TCP(TCPOpts{Src: src, Dst: dst, Flags: "PA", Seq: 7, Ack: 9, Payload: []byte("hello"), TTL: 33})
	udp := UDP(UDPOpts{Src: src, Dst: dst, Payload: []byte("dns?")})
	icmp := ICMPError(ICMPErrorOpts{Src: netip.MustParseAddr("2001:db8::fe"), Dst: src.Addr(), Type: 2, Rest: 1280, Quote: tcp[14:]})
	for name, b := range map[string][]byte{"tcp": tcp, "udp": udp, "icmpv6": icmp} {
		if err := Verify(b); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		for _, off := range []int{14 + 8 + 15, len(b) - 1} { // the source address's last byte, the last byte
			bad := clone(b)
			bad[off] ^= 0x10
			if err := Verify(bad); !errors.Is(err, ErrChecksum) {
				t.Errorf("%s with byte %d flipped: %v, want a checksum error", name, off, err)
			}
		}
	}
	zero := clone(udp)
	zero[14+40+6], zero[14+40+7] = 0, 0
	if err := Verify(zero); !errors.Is(err, ErrChecksum) {
		t.Errorf("udp over ipv6 without checksum: %v, want a checksum error", err)
	}
	d, err := Decode(tcp)
	if err != nil || d.Src != src || d.Dst != dst || d.Flags != "PA" || d.Seq != 7 || d.Ack != 9 || d.TTL != 33 || string(d.Payload) != "hello" {
		t.Errorf("decode tcp: %+v, %v", d, err)
	}
	d, err = Decode(icmp)
	if err != nil || d.Proto != ProtoICMPv6 || d.ICMPType != 2 || len(d.Payload) != len(tcp)-14 {
		t.Errorf("decode icmpv6: %+v, %v", d, err)
	}
	ext := clone(tcp)
	ext[14+6] = 0 // hop-by-hop options
	if err := Verify(ext); !errors.Is(err, ErrUnsupported) {
		t.Errorf("ipv6 with an extension header: %v, want unsupported", err)
	}
}
