package dispatcher

import (
	"fmt"
	"math/bits"
	"net/netip"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"
)

// Conn is one tracked connection, as read from the forward table.
type Conn struct {
	Client, VIP     netip.AddrPort
	Backend, Source netip.AddrPort // Source: the load balancer's side
	Protocol        uint8          // TCP or UDP
	BackendID       uint32
	State           string // syn, syn-recv, established, fin, closed, udp
	Idle            time.Duration
	// SeqDelta is the backend-side ISN minus the client's: the data path
	// adds it to the client's sequence numbers and takes it from the
	// backend's acknowledgements.
	SeqDelta uint32
}

func stateName(s uint32) string {
	switch s {
	case uint32(xlbXlbCtStateXLB_CT_SYN):
		return "syn"
	case uint32(xlbXlbCtStateXLB_CT_SYN_RECV):
		return "syn-recv"
	case uint32(xlbXlbCtStateXLB_CT_ESTABLISHED):
		return "established"
	case uint32(xlbXlbCtStateXLB_CT_FIN):
		return "fin"
	case uint32(xlbXlbCtStateXLB_CT_UDP):
		return "udp"
	}
	return "closed"
}

const (
	cfSynAck = uint32(xlbXlbConnFlagXLB_CF_SYNACK)
	cfEstab  = uint32(xlbXlbConnFlagXLB_CF_ESTAB)
	cfFinC   = uint32(xlbXlbConnFlagXLB_CF_FIN_C)
	cfFinB   = uint32(xlbXlbConnFlagXLB_CF_FIN_B)
	cfRST    = uint32(xlbXlbConnFlagXLB_CF_RST)
	cfUDP    = uint32(xlbXlbConnFlagXLB_CF_UDP)
)

// connClosed mirrors conn_closed() in programs/include/xlb_conn.h
// (TestMirrorsAgree checks the two agree).
func connClosed(flags uint32) bool {
	return flags&cfRST != 0 || flags&(cfFinC|cfFinB) == cfFinC|cfFinB
}

// connHalfOpen mirrors conn_half_open() (TestMirrorsAgree).
func connHalfOpen(flags uint32) bool { return flags&(cfEstab|cfUDP) == 0 && !connClosed(flags) }

// connState mirrors conn_state() (TestMirrorsAgree).
func connState(flags uint32) uint32 {
	switch {
	case flags&cfUDP != 0:
		return uint32(xlbXlbCtStateXLB_CT_UDP)
	case connClosed(flags):
		return uint32(xlbXlbCtStateXLB_CT_CLOSED)
	case flags&(cfFinC|cfFinB) != 0:
		return uint32(xlbXlbCtStateXLB_CT_FIN)
	case flags&cfEstab != 0:
		return uint32(xlbXlbCtStateXLB_CT_ESTABLISHED)
	case flags&cfSynAck != 0:
		return uint32(xlbXlbCtStateXLB_CT_SYN_RECV)
	}
	return uint32(xlbXlbCtStateXLB_CT_SYN)
}

// idle converts a jiffies difference to a duration.
func (p *Pipeline) idle(now, last uint64) time.Duration {
	if last >= now {
		return 0
	}
	return time.Duration(now-last) * p.tick
}

// idle32 is idle for a time kept as the low 32 bits of the jiffies (a
// port way's), which wrap after 49 days at 1000 Hz: differences modulo
// 2^32 stay right far longer than any timeout.
func (p *Pipeline) idle32(now uint64, last uint32) time.Duration {
	return time.Duration(uint32(now)-last) * p.tick
}

func addrPort(a uint32, p uint16) netip.AddrPort {
	return netip.AddrPortFrom(addrFromBE(a), portBE(p))
}

// portWay mirrors port_way() in programs/include/xlb_ports.h
// (TestMirrorsAgree).
func portWay(baddr uint32, bport uint16) uint32 {
	return ((baddr ^ (uint32(bport)<<16 | uint32(bport))) * 0x9e3779b1) >> (32 - portWaysLog2)
}

// portIndex is the index in xlb_ports of port offset off of source address
// src for a backend's way, as port_entry() computes it.
func (p *Pipeline) portIndex(src, way, off uint32) uint32 {
	return (src*uint32(PortWays)+way)*p.nports + off
}

// portEntry returns the way of source port lport (network order) of
// source address src that a backend uses, in the mapped return table, or
// nil outside the range.
func (p *Pipeline) portEntry(src uint32, lport uint16, baddr uint32, bport uint16) *xlbXlbRconn {
	host := portBE(lport)
	if src >= p.nsrc || host < p.portLo || uint32(host-p.portLo) >= p.nports {
		return nil
	}
	return p.portAt(p.portIndex(src, portWay(baddr, bport), uint32(host-p.portLo)))
}

func (p *Pipeline) portAt(idx uint32) *xlbXlbRconn {
	off := uintptr(idx) * unsafe.Sizeof(xlbXlbRconn{})
	return (*xlbXlbRconn)(unsafe.Pointer(&p.ports[off]))
}

func (p *Pipeline) numPorts() uint32 { return p.nsrc * p.nports * uint32(PortWays) }

const (
	portFree = uint32(xlbXlbPortStateXLB_PS_FREE)
	portUsed = uint32(xlbXlbPortStateXLB_PS_USED)
	portHold = uint32(xlbXlbPortStateXLB_PS_HOLD)
)

// PortsInUse counts source-port ways taken by connections, and ways
// resting after their connection ended.
func (p *Pipeline) PortsInUse() (used, held int) {
	for i := range p.numPorts() {
		switch atomic.LoadUint32(&p.portAt(i).State) {
		case portUsed:
			used++
		case portHold:
			held++
		}
	}
	return used, held
}

// PortUse is how much of a backend's source-port pool is taken.
type PortUse struct {
	Used int // ways of live connections
	Held int // ways resting after their connection ended
	// Size is how many ports the backend's way offers over the source
	// addresses of its services; backends sharing a way share it.
	Size int
}

// PortUse counts every backend's taken source ports by its address.
func (p *Pipeline) PortUse() map[netip.AddrPort]PortUse {
	out := make(map[netip.AddrPort]PortUse)
	for i := range p.numPorts() {
		r := p.portAt(i)
		st := atomic.LoadUint32(&r.State)
		if st == portFree {
			continue
		}
		b := addrPort(r.Baddr, r.Bport)
		u := out[b]
		if st == portUsed {
			u.Used++
		} else {
			u.Held++
		}
		out[b] = u
	}
	return out
}

// PortPool is the number of ports per source address and backend way.
func (p *Pipeline) PortPool() int { return int(p.nports) }

func (p *Pipeline) connAt(i uint32) *xlbXlbConn {
	off := uintptr(i) * unsafe.Sizeof(xlbXlbConn{})
	return (*xlbXlbConn)(unsafe.Pointer(&p.conns[off]))
}

// flowHash mirrors flow_hash() in programs/include/xlb_hash.h (Jenkins'
// final mix): it places a flow in the connection table (TestMirrorsAgree).
func flowHash(k *xlbXlbFlow) uint32 {
	a, b := k.Saddr, k.Daddr
	c := (uint32(k.Sport)<<16 | uint32(k.Dport)) ^ uint32(k.Proto)
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

const ctDead = uint32(xlbXlbConnFlagXLB_CF_DEAD)

// snapshot is a stable copy of a slot and the sequence it was read at.
type snapshot struct {
	idx uint32
	seq uint32
	c   xlbXlbConn
}

// Slot states as a reader finds them.
const (
	slotFree = iota // never used, or a tombstone
	slotBusy        // being written (odd) on every try
	slotLive        // holds a connection
)

// readSlot copies slot i if it holds a connection and is not being
// written, and says what it found.
func (p *Pipeline) readSlot(i uint32) (snapshot, int) {
	slot := p.connAt(i)
	for try := 0; try < 3; try++ {
		seq := atomic.LoadUint32(&slot.Seq)
		if seq&1 != 0 {
			continue
		}
		c := *slot
		if atomic.LoadUint32(&slot.Seq) != seq {
			continue
		}
		if c.Flags == 0 || c.Flags&ctDead != 0 {
			return snapshot{}, slotFree
		}
		return snapshot{idx: i, seq: seq, c: c}, slotLive
	}
	return snapshot{}, slotBusy
}

// read copies slot i if it holds a connection and is not being written.
func (p *Pipeline) read(i uint32) (snapshot, bool) {
	s, st := p.readSlot(i)
	return s, st == slotLive
}

// find returns the connection of a flow.
func (p *Pipeline) find(k *xlbXlbFlow) (snapshot, bool) {
	h := flowHash(k)
	for i := uint32(0); i < ctWays; i++ {
		if s, ok := p.read((h + i) & p.ctMask); ok && s.c.Key == *k {
			return s, true
		}
	}
	return snapshot{}, false
}

// take makes a slot odd for the daemon to rewrite, if it is still what
// was read; release makes it stable again.
func (p *Pipeline) take(s snapshot) bool {
	return atomic.CompareAndSwapUint32(&p.connAt(s.idx).Seq, s.seq, s.seq+1)
}

func (p *Pipeline) release(idx uint32) { atomic.AddUint32(&p.connAt(idx).Seq, 1) }

// Conns lists the tracked connections.
func (p *Pipeline) Conns() ([]Conn, error) {
	now, err := p.now()
	if err != nil {
		return nil, err
	}
	var out []Conn
	bitmap(p.ctBusy).each(func(i uint32) {
		s, ok := p.read(i)
		if !ok || i > p.ctMask {
			return
		}
		c := &s.c
		out = append(out, Conn{
			Client:    addrPort(c.Key.Saddr, c.Key.Sport),
			VIP:       addrPort(c.Key.Daddr, c.Key.Dport),
			Backend:   addrPort(c.Baddr, c.Bport),
			Source:    addrPort(c.Laddr, c.Lport),
			Protocol:  c.Key.Proto,
			BackendID: c.BackendId,
			State:     stateName(connState(c.Flags)),
			Idle:      p.idle(now, c.LastSeenJ),
			SeqDelta:  c.SeqDelta,
		})
	})
	return out, nil
}

// GCResult says what a sweep did.
type GCResult struct {
	Scanned  int // forward entries looked at
	Expired  int // connections removed for idleness
	Orphans  int // source ports freed whose connection was gone
	Released int // source ports freed after their hold
}

// GC removes connections idle for longer than their state's timeout,
// uncounts them from their backend if the data path had not already (on
// FIN/RST), and starts their source port's hold. A half-open connection
// expires on the client's silence alone (a backend's SYN-ACK
// retransmissions to a spoofed client do not keep it); others live while
// either side talks. It frees ways whose hold has passed (the data path
// takes them anyway; this keeps the counts honest) and ways whose
// connection is gone. It visits only the slots and ways the occupancy
// bitmaps mark, so its cost follows what is in use, not the tables' size.
func (p *Pipeline) GC(t Timeouts) (GCResult, error) {
	var res GCResult
	now, err := p.now()
	if err != nil {
		return res, err
	}
	bitmap(p.ctBusy).sweep(func(i uint32) bool { return p.sweepConn(i, now, t, &res) }, func(i uint32) bool {
		_, st := p.readSlot(i)
		return st != slotFree
	})
	bitmap(p.portBusy).sweep(func(i uint32) bool { return p.sweepPort(i, now, t, &res) }, func(i uint32) bool {
		return atomic.LoadUint32(&p.portAt(i).State) != portFree
	})
	return res, nil
}

// sweepConn expires slot i's connection if it is idle past its timeout,
// and reports whether the slot is still in use.
func (p *Pipeline) sweepConn(i uint32, now uint64, t Timeouts, res *GCResult) bool {
	if i > p.ctMask {
		return false
	}
	s, st := p.readSlot(i)
	if st != slotLive {
		return st == slotBusy
	}
	res.Scanned++
	c := &s.c
	timeout := t.byState(connState(c.Flags))
	if p.idle(now, c.LastSeenJ) <= timeout {
		return true
	}
	r := p.portEntry(c.SrcIdx, c.Lport, c.Baddr, c.Bport)
	mine := r != nil && r.Baddr == c.Baddr && r.Bport == c.Bport && r.Caddr == c.Key.Saddr && r.Cport == c.Key.Sport
	if mine && !connHalfOpen(c.Flags) && atomic.LoadUint32(&r.State) == portUsed &&
		p.idle32(now, atomic.LoadUint32(&r.LastSeenJ)) <= timeout {
		return true // the backend side is still talking
	}
	if !p.end(i, s, now, true) {
		return true // changed since it was read
	}
	res.Expired++
	return false
}

// end ends slot i's connection, read as s: it uncounts it from its
// backend, starts its source port's hold and frees the slot. With
// unchanged, it gives up (and reports false) if the connection saw a
// packet or changed state since s was read.
func (p *Pipeline) end(i uint32, s snapshot, now uint64, unchanged bool) bool {
	c := &s.c
	if !p.take(s) {
		return false
	}
	slot := p.connAt(i)
	// Flags and last_seen change in place: look again now that the slot
	// is ours.
	flags := atomic.LoadUint32(&slot.Flags)
	if unchanged && (atomic.LoadUint64(&slot.LastSeenJ) != c.LastSeenJ || connState(flags) != connState(c.Flags)) {
		p.release(i)
		return false
	}
	r := p.portEntry(c.SrcIdx, c.Lport, c.Baddr, c.Bport)
	if r != nil && r.Baddr == c.Baddr && r.Bport == c.Bport && r.Caddr == c.Key.Saddr && r.Cport == c.Key.Sport {
		atomic.StoreUint32(&r.LastSeenJ, uint32(now)) // the hold starts now
		atomic.CompareAndSwapUint32(&r.State, portUsed, portHold)
	}
	p.uncount(c.BackendId, flags)
	atomic.StoreUint32(&slot.Flags, ctDead)
	p.release(i)
	return true
}

// EndBackendConns ends every connection to backend id at once, as expiry
// would: its source ports start their hold and its counts drop to zero.
// The data path answers each client's next segment with a RST (it belongs
// to no connection). The backend is not told: during the port's hold its
// packets of such a connection still reach the client, which resets its
// end. It returns how many connections it ended.
func (p *Pipeline) EndBackendConns(id uint32) (int, error) {
	if id >= uint32(MaxBackends) {
		return 0, fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	now, err := p.now()
	if err != nil {
		return 0, err
	}
	n := 0
	bitmap(p.ctBusy).each(func(i uint32) {
		if i > p.ctMask {
			return
		}
		// A slot being written is retried for a moment: it may be a
		// new connection to this backend.
		for try := 0; try < 100; try++ {
			s, st := p.readSlot(i)
			if st == slotBusy {
				runtime.Gosched()
				continue
			}
			if st != slotLive || s.c.BackendId != id {
				return
			}
			if p.end(i, s, now, false) {
				n++
				return
			}
		}
	})
	return n, nil
}

// sweepPort frees way i if its hold has passed or its connection is gone,
// and reports whether it is still in use.
func (p *Pipeline) sweepPort(i uint32, now uint64, t Timeouts, res *GCResult) bool {
	if i >= p.numPorts() {
		return false
	}
	r := p.portAt(i)
	state := atomic.LoadUint32(&r.State)
	if state == portFree {
		return false
	}
	age := p.idle32(now, atomic.LoadUint32(&r.LastSeenJ))
	if state == portHold {
		if age > t.hold() && atomic.CompareAndSwapUint32(&r.State, portHold, portFree) {
			res.Released++
			return false
		}
		return true
	}
	if age <= t.Closed {
		return true
	}
	proto := uint8(TCP)
	if uint32(r.Flags)&uint32(xlbXlbRconnFlagXLB_RF_UDP) != 0 {
		proto = UDP
	}
	fk := xlbXlbFlow{Saddr: r.Caddr, Daddr: r.Vaddr, Sport: r.Cport, Dport: r.Vport, Proto: proto}
	lport := portBE(p.portLo + uint16(i%p.nports))
	if s, ok := p.find(&fk); ok && s.c.Lport == lport && s.c.Baddr == r.Baddr && s.c.Bport == r.Bport {
		return true
	}
	if atomic.CompareAndSwapUint32(&r.State, portUsed, portFree) {
		res.Orphans++
		return false
	}
	return true
}

// bitmap is an occupancy bitmap the data path shares (mark_busy in
// programs/include/xlb_common.h): a bit per slot or way, set after the
// slot is filled.
type bitmap []byte

// each calls fn for every set bit's index.
func (b bitmap) each(fn func(i uint32)) {
	for w := 0; w < len(b)/8; w++ {
		v := atomic.LoadUint64((*uint64)(unsafe.Pointer(&b[8*w])))
		for v != 0 {
			bit := uint32(bits.TrailingZeros64(v))
			v &^= 1 << bit
			fn(uint32(w)*64 + bit)
		}
	}
}

// sweep calls visit for every set bit's index; visit does its work and
// reports whether the slot is still in use. The bit of one that is not is
// cleared, and set again if occupied says the slot was filled meanwhile:
// the data path sets the bit after it fills the slot, so a slot filled
// after the check has its bit set by the data path itself.
func (b bitmap) sweep(visit, occupied func(i uint32) bool) {
	b.each(func(i uint32) {
		if visit(i) {
			return
		}
		word := (*uint64)(unsafe.Pointer(&b[8*(i/64)]))
		atomic.AndUint64(word, ^(uint64(1) << (i % 64)))
		if occupied(i) {
			atomic.OrUint64(word, uint64(1)<<(i%64))
		}
	})
}
