package packet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// Errors returned by Verify and Decode, to be checked with errors.Is.
var (
	ErrTruncated   = errors.New("packet truncated")
	ErrMalformed   = errors.New("packet malformed")
	ErrUnsupported = errors.New("packet not supported")
	ErrChecksum    = errors.New("bad checksum")
)

// IP protocol numbers understood by Verify and Decode.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// ChecksumError reports a checksum that differs from the one a full
// computation over the packet gives. It matches ErrChecksum.
type ChecksumError struct {
	Layer     string // "ipv4", "tcp", "udp", "icmp" or "icmpv6"
	Want, Got uint16
}

func (e *ChecksumError) Error() string {
	return fmt.Sprintf("verify %s checksum: want %#04x, got %#04x", e.Layer, e.Want, e.Got)
}

// Is makes errors.Is(err, ErrChecksum) true.
func (e *ChecksumError) Is(target error) bool { return target == ErrChecksum }

// Verify parses an Ethernet/IPv4/(TCP|UDP|ICMP) packet by hand and checks the
// IPv4 header checksum and the L4 checksum (over the pseudo-header for TCP
// and UDP). It is strict: a checksum must equal what a full RFC 1071
// computation yields, so 0xffff (one's-complement negative zero) is rejected
// where 0x0000 is due, as an RFC 1141-style incremental update would produce
// it (RFC 1624, section 3). A UDP checksum of zero means "none" and is
// accepted. For a fragment only the IPv4 header checksum is checked, since the
// L4 checksum covers the whole datagram. Bytes after the IPv4 total length
// (Ethernet padding) are ignored.
//
// An IPv6 packet (Ethernet/IPv6/(TCP|UDP|ICMPv6), no extension headers) has
// no header checksum; its L4 checksum covers the IPv6 pseudo-header (RFC
// 8200), ICMPv6's too, and a UDP checksum of zero is an error.
func Verify(b []byte) error {
	p, err := parse(b)
	if err != nil {
		return err
	}
	if !p.v6 {
		if want, got := ipv4Checksum(p.ip), binary.BigEndian.Uint16(p.ip[10:]); want != got {
			return &ChecksumError{Layer: "ipv4", Want: want, Got: got}
		}
	}
	if p.fragment {
		return nil
	}
	var layer string
	var at, hlen int // offset of the checksum field in the L4 header, and the header's length
	var pseudo bool
	switch p.proto {
	case ProtoTCP:
		layer, at, hlen, pseudo = "tcp", 16, 20, true
	case ProtoUDP:
		layer, at, hlen, pseudo = "udp", 6, 8, true
	case ProtoICMP:
		layer, at, hlen = "icmp", 2, 4
	case ProtoICMPv6:
		layer, at, hlen, pseudo = "icmpv6", 2, 4, true
	default:
		return fmt.Errorf("verify ip protocol %d: %w", p.proto, ErrUnsupported)
	}
	if len(p.l4) < hlen {
		return fmt.Errorf("verify %s: %d bytes: %w", layer, len(p.l4), ErrTruncated)
	}
	if p.proto == ProtoUDP {
		if l := int(binary.BigEndian.Uint16(p.l4[4:])); l != len(p.l4) {
			return fmt.Errorf("verify udp: length %d, ip payload %d: %w", l, len(p.l4), ErrMalformed)
		}
	}

	var s uint32
	if pseudo && p.v6 {
		s = sum(s, p.ip[8:40]) // source and destination address
		s += uint32(p.proto) + uint32(len(p.l4))>>16 + uint32(len(p.l4))&0xffff
	} else if pseudo {
		s = sum(s, p.ip[12:20]) // source and destination address
		s += uint32(p.proto) + uint32(len(p.l4))
	}
	s = sum(s, p.l4[:at])
	s = sum(s, p.l4[at+2:])
	want := ^uint16(fold(s))
	got := binary.BigEndian.Uint16(p.l4[at:])
	if p.proto == ProtoUDP {
		if got == 0 && p.v6 {
			return &ChecksumError{Layer: layer, Want: want, Got: got} // mandatory in IPv6
		}
		if got == 0 {
			return nil // no checksum
		}
		if want == 0 {
			want = 0xffff // RFC 768: a computed zero is sent as all ones
		}
	}
	if want != got {
		return &ChecksumError{Layer: layer, Want: want, Got: got}
	}
	return nil
}

// Decoded is what Decode reads from a packet, for assertions.
type Decoded struct {
	SrcMAC, DstMAC net.HardwareAddr
	Src, Dst       netip.AddrPort // ports are zero for ICMP
	Proto          uint8          // IP protocol number
	TTL            uint8          // IPv4 TTL or IPv6 hop limit
	ID             uint16         // IPv4 identification (0 for IPv6)
	Flags          string         // TCP flags, spelled in the order "FSRPAUEC"
	Seq, Ack       uint32         // TCP only
	Window         uint16         // TCP only
	ICMPType       uint8          // ICMP and ICMPv6 only
	ICMPCode       uint8          // ICMP and ICMPv6 only
	Payload        []byte         // after the TCP, UDP or 8-byte ICMP header
}

// Decode parses an Ethernet/IPv4/(TCP|UDP|ICMP) or Ethernet/IPv6/(TCP|UDP|
// ICMPv6) packet by hand. It does not
// check checksums (see Verify) but does reject a TCP data offset that does
// not fit the segment. Fragments other than the first are not supported.
func Decode(b []byte) (Decoded, error) {
	p, err := parse(b)
	if err != nil {
		return Decoded{}, err
	}
	d := Decoded{
		DstMAC: net.HardwareAddr(clone(b[0:6])),
		SrcMAC: net.HardwareAddr(clone(b[6:12])),
		Proto:  p.proto,
	}
	var src, dst netip.Addr
	if p.v6 {
		src, _ = netip.AddrFromSlice(p.ip[8:24])
		dst, _ = netip.AddrFromSlice(p.ip[24:40])
		d.TTL = p.ip[7]
	} else {
		src, _ = netip.AddrFromSlice(p.ip[12:16])
		dst, _ = netip.AddrFromSlice(p.ip[16:20])
		d.TTL = p.ip[8]
		d.ID = binary.BigEndian.Uint16(p.ip[4:])
		if binary.BigEndian.Uint16(p.ip[6:])&0x1fff != 0 {
			return Decoded{}, fmt.Errorf("decode: non-first fragment: %w", ErrUnsupported)
		}
	}
	var sport, dport uint16
	switch p.proto {
	case ProtoTCP:
		if len(p.l4) < 20 {
			return Decoded{}, fmt.Errorf("decode tcp: %d bytes: %w", len(p.l4), ErrTruncated)
		}
		off := int(p.l4[12]>>4) * 4
		if off < 20 || off > len(p.l4) {
			return Decoded{}, fmt.Errorf("decode tcp: data offset %d in %d bytes: %w", off, len(p.l4), ErrMalformed)
		}
		sport, dport = binary.BigEndian.Uint16(p.l4[0:]), binary.BigEndian.Uint16(p.l4[2:])
		d.Seq = binary.BigEndian.Uint32(p.l4[4:])
		d.Ack = binary.BigEndian.Uint32(p.l4[8:])
		d.Window = binary.BigEndian.Uint16(p.l4[14:])
		d.Flags = tcpFlags(p.l4[13])
		d.Payload = clone(p.l4[off:])
	case ProtoUDP:
		if len(p.l4) < 8 {
			return Decoded{}, fmt.Errorf("decode udp: %d bytes: %w", len(p.l4), ErrTruncated)
		}
		sport, dport = binary.BigEndian.Uint16(p.l4[0:]), binary.BigEndian.Uint16(p.l4[2:])
		d.Payload = clone(p.l4[8:])
	case ProtoICMP, ProtoICMPv6:
		if len(p.l4) < 8 {
			return Decoded{}, fmt.Errorf("decode icmp: %d bytes: %w", len(p.l4), ErrTruncated)
		}
		d.ICMPType, d.ICMPCode = p.l4[0], p.l4[1]
		d.Payload = clone(p.l4[8:])
	default:
		return Decoded{}, fmt.Errorf("decode ip protocol %d: %w", p.proto, ErrUnsupported)
	}
	d.Src = netip.AddrPortFrom(src, sport)
	d.Dst = netip.AddrPortFrom(dst, dport)
	return d, nil
}

type parsed struct {
	ip       []byte // the IPv4 header, options included, or the IPv6 header
	l4       []byte // the IP payload, as long as the total or payload length says
	proto    uint8
	fragment bool
	v6       bool
}

func parse(b []byte) (parsed, error) {
	if len(b) < 14 {
		return parsed{}, fmt.Errorf("parse ethernet: %d bytes: %w", len(b), ErrTruncated)
	}
	et := binary.BigEndian.Uint16(b[12:])
	if et == 0x86dd {
		return parse6(b[14:])
	}
	if et != 0x0800 {
		return parsed{}, fmt.Errorf("parse ethernet: ethertype %#04x: %w", et, ErrUnsupported)
	}
	ip := b[14:]
	if len(ip) < 20 {
		return parsed{}, fmt.Errorf("parse ipv4: %d bytes: %w", len(ip), ErrTruncated)
	}
	if v := ip[0] >> 4; v != 4 {
		return parsed{}, fmt.Errorf("parse ipv4: version %d: %w", v, ErrMalformed)
	}
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 {
		return parsed{}, fmt.Errorf("parse ipv4: header length %d: %w", ihl, ErrMalformed)
	}
	if len(ip) < ihl {
		return parsed{}, fmt.Errorf("parse ipv4: header length %d in %d bytes: %w", ihl, len(ip), ErrTruncated)
	}
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if total < ihl {
		return parsed{}, fmt.Errorf("parse ipv4: total length %d below header length %d: %w", total, ihl, ErrMalformed)
	}
	if total > len(ip) {
		return parsed{}, fmt.Errorf("parse ipv4: total length %d in %d bytes: %w", total, len(ip), ErrTruncated)
	}
	frag := binary.BigEndian.Uint16(ip[6:])
	return parsed{
		ip:       ip[:ihl],
		l4:       ip[ihl:total],
		proto:    ip[9],
		fragment: frag&0x2000 != 0 || frag&0x1fff != 0,
	}, nil
}

// parse6 parses an IPv6 header without extension headers.
func parse6(ip []byte) (parsed, error) {
	if len(ip) < 40 {
		return parsed{}, fmt.Errorf("parse ipv6: %d bytes: %w", len(ip), ErrTruncated)
	}
	if v := ip[0] >> 4; v != 6 {
		return parsed{}, fmt.Errorf("parse ipv6: version %d: %w", v, ErrMalformed)
	}
	plen := int(binary.BigEndian.Uint16(ip[4:]))
	if 40+plen > len(ip) {
		return parsed{}, fmt.Errorf("parse ipv6: payload length %d in %d bytes: %w", plen, len(ip)-40, ErrTruncated)
	}
	switch ip[6] {
	case ProtoTCP, ProtoUDP, ProtoICMPv6:
	default:
		return parsed{}, fmt.Errorf("parse ipv6: next header %d: %w", ip[6], ErrUnsupported)
	}
	return parsed{ip: ip[:40], l4: ip[40 : 40+plen], proto: ip[6], v6: true}, nil
}

// ipv4Checksum computes the header checksum of hdr as if its checksum field
// were zero.
func ipv4Checksum(hdr []byte) uint16 {
	return ^uint16(fold(sum(sum(0, hdr[:10]), hdr[12:])))
}

// sum adds b, as big-endian 16-bit words (an odd last byte padded with a
// zero), to the running RFC 1071 one's-complement sum s.
func sum(s uint32, b []byte) uint32 {
	for len(b) >= 2 {
		s += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	return fold(s)
}

// fold folds the carries of a 32-bit sum into 16 bits.
func fold(s uint32) uint32 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return s
}

func tcpFlags(f byte) string {
	var sb strings.Builder
	for i, c := range tcpFlagOrder {
		if f&tcpFlagBits[i] != 0 {
			sb.WriteRune(c)
		}
	}
	return sb.String()
}

// tcpFlagBits holds the bit of each letter of tcpFlagOrder.
var tcpFlagBits = [8]byte{0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80}
