package dispatcher

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"unsafe"
)

// connHead is the head struct xlb_conn and struct xlb_conn6 share, at the
// start of both (XLB_CONN_HEAD in programs/include/xlb_structs.h), and
// rconnHead the one struct xlb_rconn and struct xlb_rconn6 share;
// TestTableHeads checks that the generated types lie over all four.
type (
	connHead  = xlbXlbConnHead
	rconnHead = xlbXlbRconnHead
)

// layout is where a family's slots keep their addresses: offsets in a
// connection slot (the flow key's fields, the source address, the
// backend) and in a port way (backend, client, VIP).
type layout struct {
	connSize, portSize uintptr
	alen               uintptr // 4 or 16
	kSaddr, kDaddr     uintptr
	kSport, kDport     uintptr
	kProto             uintptr
	cLaddr, cBaddr     uintptr
	rBaddr, rCaddr     uintptr
	rVaddr             uintptr
}

var (
	layout4 = layout{
		connSize: unsafe.Sizeof(xlbXlbConn{}), portSize: unsafe.Sizeof(xlbXlbRconn{}), alen: 4,
		kSaddr: unsafe.Offsetof(xlbXlbConn{}.Key) + unsafe.Offsetof(xlbXlbFlow{}.Saddr),
		kDaddr: unsafe.Offsetof(xlbXlbConn{}.Key) + unsafe.Offsetof(xlbXlbFlow{}.Daddr),
		kSport: unsafe.Offsetof(xlbXlbConn{}.Key) + unsafe.Offsetof(xlbXlbFlow{}.Sport),
		kDport: unsafe.Offsetof(xlbXlbConn{}.Key) + unsafe.Offsetof(xlbXlbFlow{}.Dport),
		kProto: unsafe.Offsetof(xlbXlbConn{}.Key) + unsafe.Offsetof(xlbXlbFlow{}.Proto),
		cLaddr: unsafe.Offsetof(xlbXlbConn{}.Laddr), cBaddr: unsafe.Offsetof(xlbXlbConn{}.Baddr),
		rBaddr: unsafe.Offsetof(xlbXlbRconn{}.Baddr), rCaddr: unsafe.Offsetof(xlbXlbRconn{}.Caddr),
		rVaddr: unsafe.Offsetof(xlbXlbRconn{}.Vaddr),
	}
	layout6 = layout{
		connSize: unsafe.Sizeof(xlbXlbConn6{}), portSize: unsafe.Sizeof(xlbXlbRconn6{}), alen: 16,
		kSaddr: unsafe.Offsetof(xlbXlbConn6{}.Key) + unsafe.Offsetof(xlbXlbFlow6{}.Saddr),
		kDaddr: unsafe.Offsetof(xlbXlbConn6{}.Key) + unsafe.Offsetof(xlbXlbFlow6{}.Daddr),
		kSport: unsafe.Offsetof(xlbXlbConn6{}.Key) + unsafe.Offsetof(xlbXlbFlow6{}.Sport),
		kDport: unsafe.Offsetof(xlbXlbConn6{}.Key) + unsafe.Offsetof(xlbXlbFlow6{}.Dport),
		kProto: unsafe.Offsetof(xlbXlbConn6{}.Key) + unsafe.Offsetof(xlbXlbFlow6{}.Proto),
		cLaddr: unsafe.Offsetof(xlbXlbConn6{}.Laddr), cBaddr: unsafe.Offsetof(xlbXlbConn6{}.Baddr),
		rBaddr: unsafe.Offsetof(xlbXlbRconn6{}.Baddr), rCaddr: unsafe.Offsetof(xlbXlbRconn6{}.Caddr),
		rVaddr: unsafe.Offsetof(xlbXlbRconn6{}.Vaddr),
	}
)

// maxConnSize is the larger family's slot, the size of a slot's copy.
const maxConnSize = 128

// table is one address family's connection table and source-port ways,
// mapped from the kernel, with the layout of their slots.
type table struct {
	*layout
	conns, ports     []byte
	ctBusy, portBusy []byte
	ctMask           uint32
	nsrc             uint32 // source addresses the port ways are sized for
	nports           uint32 // ports in the range
	portLo           uint16
}

func (t *table) head(i uint32) *connHead {
	return (*connHead)(unsafe.Pointer(&t.conns[uintptr(i)*t.connSize]))
}

func (t *table) slot(i uint32) []byte {
	off := uintptr(i) * t.connSize
	return t.conns[off : off+t.connSize]
}

func (t *table) portAt(i uint32) *rconnHead {
	return (*rconnHead)(unsafe.Pointer(&t.ports[uintptr(i)*t.portSize]))
}

// portAddr is an address of way i, at offset off.
func (t *table) portAddr(i uint32, off uintptr) []byte {
	base := uintptr(i)*t.portSize + off
	return t.ports[base : base+t.alen]
}

func (t *table) numPorts() uint32 { return t.nsrc * t.nports * uint32(PortWays) }

// portIndex is the index of port offset off of source address src for a
// backend's way, as port_entry() computes it.
func (t *table) portIndex(src, way, off uint32) uint32 {
	return (src*uint32(PortWays)+way)*t.nports + off
}

// portEntry returns the index of the way of source port lport (network
// order) of source address src that backend baddr:bport (network order)
// uses, and false outside the range.
func (t *table) portEntry(src uint32, lport uint16, baddr []byte, bport uint16) (uint32, bool) {
	host := portBE(lport)
	if src >= t.nsrc || host < t.portLo || uint32(host-t.portLo) >= t.nports {
		return 0, false
	}
	return t.portIndex(src, portWayOf(baddr, bport), uint32(host-t.portLo)), true
}

// word is the i-th 32-bit word of an address as the data path loads it.
func word(a []byte, i int) uint32 { return binary.LittleEndian.Uint32(a[4*i:]) }

// portWayOf mirrors port_way() and port_way6() in
// programs/include/xlb_ports.h: an IPv6 address is folded by XOR.
func portWayOf(baddr []byte, bport uint16) uint32 {
	a := word(baddr, 0)
	if len(baddr) == 16 {
		a ^= word(baddr, 1) ^ word(baddr, 2) ^ word(baddr, 3)
	}
	return portWay(a, bport)
}

// mix3 mirrors mix3() in programs/include/xlb_hash.h (Jenkins' final mix).
func mix3(a, b, c uint32) uint32 {
	a += 0xdeadbeef
	b += 0x9e3779b9
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}

// hashWord is an address as one word, as the data path keys tables by
// it: an IPv4 address as it is, an IPv6 one through addr6_fold().
func hashWord(a []byte) uint32 {
	if len(a) == 4 {
		return word(a, 0)
	}
	return mix3(mix3(word(a, 0), word(a, 1), word(a, 2)), word(a, 3), 0x6a09e667)
}

// flowKey is a connection table key: client, VIP (network-order bytes,
// 4 or 16 of them), their ports (network order) and the protocol.
type flowKey struct {
	saddr, daddr []byte
	sport, dport uint16
	proto        uint8
}

// hash mirrors flow_hash() and flow_hash6().
func (k *flowKey) hash() uint32 {
	last := (uint32(k.sport)<<16 | uint32(k.dport)) ^ uint32(k.proto)
	if len(k.saddr) == 4 {
		return mix3(word(k.saddr, 0), word(k.daddr, 0), last)
	}
	h := mix3(word(k.saddr, 0), word(k.saddr, 1), word(k.saddr, 2))
	h = mix3(h^word(k.saddr, 3), word(k.daddr, 0), word(k.daddr, 1))
	return mix3(h^word(k.daddr, 2), word(k.daddr, 3), last)
}

// key is the flow key of a slot's copy.
func (t *table) key(b []byte) flowKey {
	return flowKey{
		saddr: b[t.kSaddr : t.kSaddr+t.alen],
		daddr: b[t.kDaddr : t.kDaddr+t.alen],
		sport: *(*uint16)(unsafe.Pointer(&b[t.kSport])),
		dport: *(*uint16)(unsafe.Pointer(&b[t.kDport])),
		proto: b[t.kProto],
	}
}

func (k *flowKey) equal(o *flowKey) bool {
	return k.sport == o.sport && k.dport == o.dport && k.proto == o.proto &&
		string(k.saddr) == string(o.saddr) && string(k.daddr) == string(o.daddr)
}

// addrOf converts an address's network-order bytes.
func addrOf(b []byte) netip.Addr {
	if len(b) == 4 {
		return netip.AddrFrom4([4]byte(b))
	}
	return netip.AddrFrom16([16]byte(b))
}

// addrPortOf converts an address's bytes and a network-order port.
func addrPortOf(b []byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(addrOf(b), portBE(port))
}
