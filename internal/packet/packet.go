// Package packet builds Ethernet/IPv4 and Ethernet/IPv6 test packets for BPF_PROG_TEST_RUN
// tests and checks their checksums independently of the code under test.
//
// The builders use gopacket to lay out headers and compute checksums. Verify
// and Decode parse by hand and carry their own RFC 1071 sum, so a packet
// rewritten by the data path is judged by code that shares nothing with it
// (or with gopacket's checksum routines).
//
// Like gopacket, the builders pad frames shorter than 60 bytes with zeros to
// the Ethernet minimum; the IPv4 total length excludes the padding.
//
// A builder makes an IPv6 packet when its addresses are IPv6: a fixed
// header with no extension headers, the hop limit from TTL; the options
// that only IPv4 has (IPOptions, fragments, DontFragment, ID) are refused.
package packet

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// DefaultTTL is the IPv4 TTL the builders use when the options leave it zero.
const DefaultTTL = 64

// DefaultWindow is the TCP window TCP uses when TCPOpts.Window is zero.
const DefaultWindow = 65535

// Default MAC addresses, used when a builder's options leave them empty.
var (
	DefaultSrcMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	DefaultDstMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
	BroadcastMAC  = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

// tcpFlagOrder is the order in which Decode spells TCP flags. It makes the
// usual combinations ("S", "SA", "A", "PA", "FA", "R", "RA") round-trip.
const tcpFlagOrder = "FSRPAUEC"

// TCPOpts describes an Ethernet+IPv4+TCP packet. Zero values get sensible
// defaults (TTL 64, window 65535, DefaultSrcMAC/DefaultDstMAC, no flags).
type TCPOpts struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.AddrPort // both IPv4 or both IPv6
	// Flags is a string of TCP flag letters: F S R P A U E C, for example
	// "S", "SA", "A", "PA", "FA", "R".
	Flags    string
	Seq, Ack uint32
	Window   uint16 // 0 means DefaultWindow
	Payload  []byte
	TTL      uint8  // 0 means DefaultTTL
	ID       uint16 // IPv4 identification
	// IPOptions are raw IPv4 option bytes, padded with zeros (EOL) to a
	// multiple of 4; they raise the IHL. They must be well-formed
	// type-length-value options (EOL and NOP are one byte).
	IPOptions []byte
	// FragOffset (in 8-byte units) and MoreFragments mark the packet as a
	// fragment. The TCP header and its checksum are still written as if the
	// packet were whole.
	FragOffset    uint16
	MoreFragments bool
	// DontFragment sets the IPv4 DF flag.
	DontFragment bool
	// ZeroWindow sends a window of 0 instead of Window's default.
	ZeroWindow bool
	// Options are raw TCP option bytes (kind, length, data; EOL and NOP
	// are one byte), padded with zeros (EOL) to a multiple of 4; they
	// raise the data offset. They must be well-formed.
	Options []byte
	// DataOffsetOverride, when non-zero, is written as the TCP data offset
	// (in 32-bit words) instead of the correct 5; the checksums still match
	// the bytes, so the bogus offset is the only defect.
	DataOffsetOverride uint8
}

// TCP builds an Ethernet+IPv4+TCP packet with correct checksums. It panics on
// options it cannot encode (a non-IPv4 address, an unknown flag letter,
// malformed IPOptions): these are mistakes in the test, not in the code under
// test.
func TCP(o TCPOpts) []byte {
	if o.Src.Addr().Is6() {
		if len(o.IPOptions) > 0 || o.FragOffset != 0 || o.MoreFragments || o.DontFragment || o.ID != 0 {
			panic("packet: IPv4 options for an IPv6 packet")
		}
	}
	ip, eth := netLayer(o.Src.Addr(), o.Dst.Addr(), layers.IPProtocolTCP, o.TTL, o.ID)
	if ip4, ok := ip.(*layers.IPv4); ok {
		ip4.FragOffset = o.FragOffset
		if o.MoreFragments {
			ip4.Flags |= layers.IPv4MoreFragments
		}
		opts, err := ipv4Options(o.IPOptions)
		if err != nil {
			panic(fmt.Sprintf("packet: %v", err))
		}
		ip4.Options = opts
		if o.DontFragment {
			ip4.Flags |= layers.IPv4DontFragment
		}
	}

	tcp := &layers.TCP{
		SrcPort:    layers.TCPPort(o.Src.Port()),
		DstPort:    layers.TCPPort(o.Dst.Port()),
		Seq:        o.Seq,
		Ack:        o.Ack,
		Window:     o.Window,
		DataOffset: 5,
	}
	if tcp.Window == 0 && !o.ZeroWindow {
		tcp.Window = DefaultWindow
	}
	topts, pad, err := tcpOptions(o.Options)
	if err != nil {
		panic(fmt.Sprintf("packet: %v", err))
	}
	tcp.Options, tcp.Padding = topts, pad
	tcp.DataOffset = uint8(5 + (len(o.Options)+len(pad))/4)
	if o.DataOffsetOverride != 0 {
		tcp.DataOffset = o.DataOffsetOverride
	}
	if err := setTCPFlags(tcp, o.Flags); err != nil {
		panic(fmt.Sprintf("packet: %v", err))
	}
	if err := tcp.SetNetworkLayerForChecksum(ip.(gopacket.NetworkLayer)); err != nil {
		panic(fmt.Sprintf("packet: set network layer: %v", err))
	}

	// The TCP layer is serialized without FixLengths so that a bogus data
	// offset survives; everything else is fixed up as usual.
	buf := gopacket.NewSerializeBuffer()
	fix := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	keep := gopacket.SerializeOptions{FixLengths: false, ComputeChecksums: true}
	steps := []struct {
		l    gopacket.SerializableLayer
		opts gopacket.SerializeOptions
	}{
		{gopacket.Payload(o.Payload), fix},
		{tcp, keep},
		{ip, fix},
		{ethLayer(o.SrcMAC, o.DstMAC, eth), fix},
	}
	for _, s := range steps {
		if err := s.l.SerializeTo(buf, s.opts); err != nil {
			panic(fmt.Sprintf("packet: serialize %v: %v", s.l.LayerType(), err))
		}
	}
	return clone(buf.Bytes())
}

// tcpOptions splits raw TCP option bytes into gopacket's options and the
// zero padding that makes them a multiple of 4 bytes.
func tcpOptions(raw []byte) ([]layers.TCPOption, []byte, error) {
	var out []layers.TCPOption
	for i := 0; i < len(raw); {
		kind := layers.TCPOptionKind(raw[i])
		if kind == layers.TCPOptionKindEndList || kind == layers.TCPOptionKindNop {
			out = append(out, layers.TCPOption{OptionType: kind, OptionLength: 1})
			i++
			continue
		}
		if i+1 >= len(raw) || raw[i+1] < 2 || i+int(raw[i+1]) > len(raw) {
			return nil, nil, fmt.Errorf("tcp options %x: malformed at byte %d", raw, i)
		}
		n := int(raw[i+1])
		out = append(out, layers.TCPOption{OptionType: kind, OptionLength: uint8(n), OptionData: raw[i+2 : i+n]})
		i += n
	}
	if len(raw) > 40 {
		return nil, nil, fmt.Errorf("tcp options: %d bytes, at most 40", len(raw))
	}
	return out, make([]byte, (4-len(raw)%4)%4), nil
}

// UDPOpts describes an Ethernet+IPv4+UDP or Ethernet+IPv6+UDP packet.
type UDPOpts struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.AddrPort // both IPv4 or both IPv6
	Payload        []byte
	TTL            uint8 // 0 means DefaultTTL
}

// UDP builds an Ethernet+IP+UDP packet with correct checksums.
func UDP(o UDPOpts) []byte {
	ip, eth := netLayer(o.Src.Addr(), o.Dst.Addr(), layers.IPProtocolUDP, o.TTL, 0)
	udp := &layers.UDP{
		SrcPort: layers.UDPPort(o.Src.Port()),
		DstPort: layers.UDPPort(o.Dst.Port()),
	}
	if err := udp.SetNetworkLayerForChecksum(ip.(gopacket.NetworkLayer)); err != nil {
		panic(fmt.Sprintf("packet: set network layer: %v", err))
	}
	return serialize(ethLayer(o.SrcMAC, o.DstMAC, eth), ip, udp, gopacket.Payload(o.Payload))
}

// ICMPOpts describes an Ethernet+IPv4+ICMP echo request or reply.
type ICMPOpts struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.Addr // IPv4 only
	ID, Seq        uint16
	Reply          bool // echo reply instead of echo request
	Payload        []byte
	TTL            uint8 // 0 means DefaultTTL
}

// ICMPEcho builds an Ethernet+IPv4+ICMP echo packet with correct checksums.
func ICMPEcho(o ICMPOpts) []byte {
	ip := ipv4Layer(o.Src, o.Dst, layers.IPProtocolICMPv4, o.TTL, 0)
	typ := uint8(layers.ICMPv4TypeEchoRequest)
	if o.Reply {
		typ = layers.ICMPv4TypeEchoReply
	}
	icmp := &layers.ICMPv4{
		TypeCode: layers.CreateICMPv4TypeCode(typ, 0),
		Id:       o.ID,
		Seq:      o.Seq,
	}
	return serialize(ethLayer(o.SrcMAC, o.DstMAC, layers.EthernetTypeIPv4), ip, icmp, gopacket.Payload(o.Payload))
}

// ICMPErrorOpts describes an Ethernet+IPv4+ICMP or Ethernet+IPv6+ICMPv6
// error message (by the family of Src and Dst): its type
// and code, the 4 bytes after the checksum (for "fragmentation needed"
// the next hop's MTU in the low 16 bits) and the quoted packet (from its
// IPv4 header on).
type ICMPErrorOpts struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.Addr // both IPv4 or both IPv6
	Type, Code     uint8
	Rest           uint32
	Quote          []byte
	TTL            uint8 // 0 means DefaultTTL
	ID             uint16
}

// ICMPError builds an ICMP error message with correct checksums.
func ICMPError(o ICMPErrorOpts) []byte {
	if o.Src.Is6() {
		ip, eth := netLayer(o.Src, o.Dst, layers.IPProtocolICMPv6, o.TTL, 0)
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(o.Type, o.Code)}
		if err := icmp.SetNetworkLayerForChecksum(ip.(gopacket.NetworkLayer)); err != nil {
			panic(fmt.Sprintf("packet: set network layer: %v", err))
		}
		rest := []byte{byte(o.Rest >> 24), byte(o.Rest >> 16), byte(o.Rest >> 8), byte(o.Rest)}
		return serialize(ethLayer(o.SrcMAC, o.DstMAC, eth), ip, icmp, gopacket.Payload(append(rest, o.Quote...)))
	}
	ip := ipv4Layer(o.Src, o.Dst, layers.IPProtocolICMPv4, o.TTL, o.ID)
	icmp := &layers.ICMPv4{
		TypeCode: layers.CreateICMPv4TypeCode(o.Type, o.Code),
		Id:       uint16(o.Rest >> 16),
		Seq:      uint16(o.Rest),
	}
	return serialize(ethLayer(o.SrcMAC, o.DstMAC, layers.EthernetTypeIPv4), ip, icmp, gopacket.Payload(o.Quote))
}

// ARPOpts describes an Ethernet ARP packet. DstMAC defaults to broadcast and
// SrcMAC to DefaultSrcMAC; the sender hardware address is SrcMAC.
type ARPOpts struct {
	SrcMAC, DstMAC     net.HardwareAddr
	Reply              bool // ARP reply instead of request
	SenderIP, TargetIP netip.Addr
	TargetMAC          net.HardwareAddr // zero for a request when empty
}

// ARP builds an Ethernet ARP request or reply.
func ARP(o ARPOpts) []byte {
	src := orDefault(o.SrcMAC, DefaultSrcMAC)
	dst := orDefault(o.DstMAC, BroadcastMAC)
	target := orDefault(o.TargetMAC, net.HardwareAddr{0, 0, 0, 0, 0, 0})
	op := uint16(layers.ARPRequest)
	if o.Reply {
		op = layers.ARPReply
	}
	arp := &layers.ARP{
		AddrType:          layers.LinkTypeEthernet,
		Protocol:          layers.EthernetTypeIPv4,
		HwAddressSize:     6,
		ProtAddressSize:   4,
		Operation:         op,
		SourceHwAddress:   src,
		SourceProtAddress: ip4(o.SenderIP),
		DstHwAddress:      target,
		DstProtAddress:    ip4(o.TargetIP),
	}
	return serialize(ethLayer(src, dst, layers.EthernetTypeARP), arp)
}

// Truncate returns a copy of the first n bytes of b (all of b if it is
// shorter), for tests of truncated packets.
func Truncate(b []byte, n int) []byte {
	n = max(0, min(n, len(b)))
	return clone(b[:n])
}

func serialize(ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
		panic(fmt.Sprintf("packet: serialize: %v", err))
	}
	return clone(buf.Bytes())
}

func ethLayer(src, dst net.HardwareAddr, typ layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{
		SrcMAC:       orDefault(src, DefaultSrcMAC),
		DstMAC:       orDefault(dst, DefaultDstMAC),
		EthernetType: typ,
	}
}

// netLayer is the IPv4 or IPv6 header for src and dst, and the EtherType.
func netLayer(src, dst netip.Addr, proto layers.IPProtocol, ttl uint8, id uint16) (gopacket.SerializableLayer, layers.EthernetType) {
	if !src.Is6() {
		return ipv4Layer(src, dst, proto, ttl, id), layers.EthernetTypeIPv4
	}
	if !dst.Is6() {
		panic(fmt.Sprintf("packet: %v and %v are not both IPv6", src, dst))
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	return &layers.IPv6{
		Version:    6,
		NextHeader: proto,
		HopLimit:   ttl,
		SrcIP:      net.IP(src.AsSlice()),
		DstIP:      net.IP(dst.AsSlice()),
	}, layers.EthernetTypeIPv6
}

func ipv4Layer(src, dst netip.Addr, proto layers.IPProtocol, ttl uint8, id uint16) *layers.IPv4 {
	if ttl == 0 {
		ttl = DefaultTTL
	}
	return &layers.IPv4{
		Version:  4,
		IHL:      5,
		TTL:      ttl,
		Id:       id,
		Protocol: proto,
		SrcIP:    ip4(src),
		DstIP:    ip4(dst),
	}
}

// ipv4Options turns raw option bytes into gopacket options, padded with EOL
// bytes to a multiple of 4.
func ipv4Options(raw []byte) ([]layers.IPv4Option, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	padded := append(clone(raw), make([]byte, (4-len(raw)%4)%4)...)
	if len(padded) > 40 {
		return nil, fmt.Errorf("encode ip options: %d bytes, at most 40 fit", len(padded))
	}
	var opts []layers.IPv4Option
	for i := 0; i < len(padded); {
		typ := padded[i]
		if typ == 0 || typ == 1 { // EOL, NOP
			opts = append(opts, layers.IPv4Option{OptionType: typ, OptionLength: 1})
			i++
			continue
		}
		if i+1 >= len(padded) || padded[i+1] < 2 || i+int(padded[i+1]) > len(padded) {
			return nil, fmt.Errorf("encode ip options: malformed option %#x at byte %d", typ, i)
		}
		l := int(padded[i+1])
		opts = append(opts, layers.IPv4Option{OptionType: typ, OptionLength: uint8(l), OptionData: clone(padded[i+2 : i+l])})
		i += l
	}
	return opts, nil
}

func setTCPFlags(t *layers.TCP, flags string) error {
	for _, c := range strings.ToUpper(flags) {
		switch c {
		case 'F':
			t.FIN = true
		case 'S':
			t.SYN = true
		case 'R':
			t.RST = true
		case 'P':
			t.PSH = true
		case 'A':
			t.ACK = true
		case 'U':
			t.URG = true
		case 'E':
			t.ECE = true
		case 'C':
			t.CWR = true
		default:
			return fmt.Errorf("parse tcp flags %q: unknown flag %q", flags, c)
		}
	}
	return nil
}

func ip4(a netip.Addr) net.IP {
	if !a.Is4() {
		panic(fmt.Sprintf("packet: %v is not an IPv4 address", a))
	}
	b := a.As4()
	return net.IP(b[:])
}

func orDefault(mac, def net.HardwareAddr) net.HardwareAddr {
	if len(mac) == 0 {
		return def
	}
	return mac
}

func clone(b []byte) []byte {
	return append([]byte(nil), b...)
}
