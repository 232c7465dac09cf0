package neigh

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ICMPv6 neighbour discovery (RFC 4861).
const (
	icmp6NS       = 135 // neighbour solicitation
	icmp6NA       = 136 // neighbour advertisement
	optSourceLLA  = 1   // source link-layer address option
	optTargetLLA  = 2   // target link-layer address option
	ndpHopLimit   = 255 // NDP messages must arrive with it (and are ignored otherwise)
	nsLen         = 40 + 32
	protoICMPv6   = 58
	ipv6HeaderLen = 40
)

// ndpFilter passes only ICMPv6 neighbour solicitations and advertisements
// sent without extension headers, from the IPv6 header on (the packet
// socket is SOCK_DGRAM): next header at 6, ICMPv6 type at 40.
var ndpFilter = unix.SockFprog{Len: 7, Filter: &[]unix.SockFilter{
	{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 6},
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 4, K: protoICMPv6},
	{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: ipv6HeaderLen},
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 1, Jf: 0, K: icmp6NS},
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: icmp6NA},
	{Code: unix.BPF_RET | unix.BPF_K, K: 256},
	{Code: unix.BPF_RET | unix.BPF_K, K: 0},
}[0]}

// linkLocal is the interface's IPv6 link-local address, the usual source
// of neighbour solicitations; invalid when it has none.
func (k *Keeper) linkLocal(l netlink.Link) netip.Addr {
	addrs, err := k.nl.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		return netip.Addr{}
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
			return ip
		}
	}
	return netip.Addr{}
}

// solicitedNode is the solicited-node multicast address of a (ff02::1:ffXX:XXXX)
// and its Ethernet address (33:33:ff:XX:XX:XX).
func solicitedNode(a netip.Addr) (netip.Addr, net.HardwareAddr) {
	t := a.As16()
	ip := [16]byte{0xff, 0x02, 10: 0, 11: 0x01, 12: 0xff, 13: t[13], 14: t[14], 15: t[15]}
	return netip.AddrFrom16(ip), net.HardwareAddr{0x33, 0x33, 0xff, t[13], t[14], t[15]}
}

// sendNS sends probe p, an IPv6 next hop's, as a neighbour solicitation:
// to the next hop's own address and MAC when the probe names one, to its
// solicited-node address otherwise.
func sendNS(s *linkSocket, p probe) error {
	src := s.ll
	if !src.IsValid() {
		src = p.src
	}
	if !src.Is6() || src.Is4In6() {
		return errors.New("no IPv6 source address towards " + p.key.ip.String())
	}
	dstIP, dstMAC := solicitedNode(p.key.ip)
	if p.dst != nil {
		dstIP, dstMAC = p.key.ip, p.dst
	}
	var b [nsLen]byte
	binary.BigEndian.PutUint32(b[0:], 6<<28)
	binary.BigEndian.PutUint16(b[4:], nsLen-ipv6HeaderLen)
	b[6], b[7] = protoICMPv6, ndpHopLimit
	s16, d16, t16 := src.As16(), dstIP.As16(), p.key.ip.As16()
	copy(b[8:24], s16[:])
	copy(b[24:40], d16[:])
	m := b[ipv6HeaderLen:]
	m[0] = icmp6NS
	copy(m[8:24], t16[:])
	m[24], m[25] = optSourceLLA, 1
	copy(m[26:32], s.mac)
	binary.BigEndian.PutUint16(m[2:], icmp6Checksum(b[8:24], b[24:40], m))
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IPV6), Ifindex: s.ifindex, Halen: 6}
	copy(to.Addr[:], dstMAC)
	return s.sendto(b[:], to)
}

// icmp6Checksum is the checksum of ICMPv6 message m (its checksum field
// zero) from src to dst: RFC 1071 over the pseudo-header and m.
func icmp6Checksum(src, dst, m []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src)
	add(dst)
	sum += uint32(len(m)) + protoICMPv6
	add(m)
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// readNDP takes the neighbour solicitations and advertisements the socket
// receives until it is closed, and records those of next hops: an
// advertisement speaks for its target address, a solicitation for its
// sender; the MAC is the message's link-layer address option, or the
// frame's source.
func (k *Keeper) readNDP(ctx context.Context, s *linkSocket) {
	s.receive(ctx, 256, func(b []byte, from *unix.SockaddrLinklayer) {
		if len(b) < ipv6HeaderLen+24 || b[0]>>4 != 6 || b[6] != protoICMPv6 || b[7] != ndpHopLimit {
			return
		}
		m := b[ipv6HeaderLen:]
		var who netip.Addr
		var opt byte
		switch m[0] {
		case icmp6NA:
			who, opt = netip.AddrFrom16([16]byte(m[8:24])), optTargetLLA
		case icmp6NS:
			who, opt = netip.AddrFrom16([16]byte(b[8:24])), optSourceLLA
		default:
			return
		}
		if who.IsUnspecified() {
			return // duplicate address detection
		}
		mac := net.HardwareAddr(from.Addr[:6])
		for o := m[24:]; len(o) >= 8 && o[1] > 0 && int(o[1])*8 <= len(o); o = o[int(o[1])*8:] {
			if o[0] == opt {
				mac = net.HardwareAddr(o[2:8])
				break
			}
		}
		k.answered(s.ifindex, who, mac)
	})
}
