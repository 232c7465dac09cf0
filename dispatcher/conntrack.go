package dispatcher

import (
	"math/bits"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn is one tracked connection, as read from the forward table.
type Conn struct {
	Client, VIP     netip.AddrPort
	Backend, Source netip.AddrPort // Source: the load balancer's side
	BackendID       uint32
	State           string // syn, established, fin, closed
	Idle            time.Duration
}

func stateName(s uint32) string {
	switch s {
	case uint32(xlbXlbCtStateXLB_CT_SYN):
		return "syn"
	case uint32(xlbXlbCtStateXLB_CT_ESTABLISHED):
		return "established"
	case uint32(xlbXlbCtStateXLB_CT_FIN):
		return "fin"
	}
	return "closed"
}

// connState mirrors conn_state() in programs/include/xlb_common.h.
func connState(flags uint32) uint32 {
	const finBoth = uint32(xlbXlbConnFlagXLB_CF_FIN_C | xlbXlbConnFlagXLB_CF_FIN_B)
	switch {
	case flags&uint32(xlbXlbConnFlagXLB_CF_RST) != 0 || flags&finBoth == finBoth:
		return uint32(xlbXlbCtStateXLB_CT_CLOSED)
	case flags&finBoth != 0:
		return uint32(xlbXlbCtStateXLB_CT_FIN)
	case flags&uint32(xlbXlbConnFlagXLB_CF_ESTAB) != 0:
		return uint32(xlbXlbCtStateXLB_CT_ESTABLISHED)
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

func addrPort(a uint32, p uint16) netip.AddrPort {
	return netip.AddrPortFrom(addrFromBE(a), portBE(p))
}

// portWay mirrors port_way() in programs/include/xlb_common.h.
func portWay(baddr uint32, bport uint16) uint32 {
	return ((baddr ^ (uint32(bport)<<16 | uint32(bport))) * 0x9e3779b1) >> (32 - xlbPortWaysLog2)
}

// portEntry returns the way of source port lport (network order) that a
// backend uses, in the mapped return table, or nil outside the range.
func (p *Pipeline) portEntry(lport uint16, baddr uint32, bport uint16) *xlbXlbRconn {
	host := portBE(lport)
	if host < p.portLo || uint32(host-p.portLo) >= p.nports {
		return nil
	}
	return p.portAt(portWay(baddr, bport)*p.nports + uint32(host-p.portLo))
}

func (p *Pipeline) portAt(idx uint32) *xlbXlbRconn {
	off := uintptr(idx) * unsafe.Sizeof(xlbXlbRconn{})
	return (*xlbXlbRconn)(unsafe.Pointer(&p.ports[off]))
}

const (
	portFree   = uint32(xlbXlbPortStateXLB_PS_FREE)
	portUsed   = uint32(xlbXlbPortStateXLB_PS_USED)
	portTWHold = uint32(xlbXlbPortStateXLB_PS_TW_HOLD)
)

// PortsInUse counts source-port ways taken by connections and by holds
// for backends' TIME_WAIT.
func (p *Pipeline) PortsInUse() (used, held int) {
	for i := uint32(0); i < p.nports*PortWays; i++ {
		switch atomic.LoadUint32(&p.portAt(i).State) {
		case portUsed:
			used++
		case portTWHold:
			held++
		}
	}
	return used, held
}

func (p *Pipeline) connAt(i uint32) *xlbXlbConn {
	off := uintptr(i) * unsafe.Sizeof(xlbXlbConn{})
	return (*xlbXlbConn)(unsafe.Pointer(&p.conns[off]))
}

// flowHash mirrors flow_hash() in programs/include/xlb_common.h (Jenkins'
// final mix): it places a flow in the connection table.
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

const (
	ctWays = 8 // XLB_CT_WAYS
	ctDead = uint32(xlbXlbConnFlagXLB_CF_DEAD)
)

// snapshot is a stable copy of a slot and the sequence it was read at.
type snapshot struct {
	idx uint32
	seq uint32
	c   xlbXlbConn
}

// read copies slot i if it holds a connection and is not being written.
func (p *Pipeline) read(i uint32) (snapshot, bool) {
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
			return snapshot{}, false
		}
		return snapshot{idx: i, seq: seq, c: c}, true
	}
	return snapshot{}, false
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
	for i := uint32(0); i <= p.ctMask; i++ {
		s, ok := p.read(i)
		if !ok {
			continue
		}
		c := &s.c
		out = append(out, Conn{
			Client:    addrPort(c.Key.Saddr, c.Key.Sport),
			VIP:       addrPort(c.Key.Daddr, c.Key.Dport),
			Backend:   addrPort(c.Baddr, c.Bport),
			Source:    addrPort(p.snat, c.Lport),
			BackendID: c.BackendId,
			State:     stateName(connState(c.Flags)),
			Idle:      p.idle(now, c.LastSeenJ),
		})
	}
	return out, nil
}

// GCResult says what a sweep did.
type GCResult struct {
	Scanned  int // forward entries looked at
	Expired  int // connections removed for idleness
	Orphans  int // source ports freed whose connection was gone
	Released int // source ports freed after their TIME_WAIT hold
}

// GC removes connections idle for longer than their state's timeout and
// uncounts them from their backend if the data path had not already (on
// FIN/RST). Their source-port way is freed too, unless the backend
// closed first: then it is held (XLB_PS_TW_HOLD) until Timeouts.TimeWait
// has passed, so the port is not given to another client while the
// backend's TIME_WAIT would refuse it. Ways whose forward entry is gone
// are freed after Closed.
func (p *Pipeline) GC(t Timeouts) (GCResult, error) {
	var res GCResult
	now, err := p.now()
	if err != nil {
		return res, err
	}
	for i := uint32(0); i <= p.ctMask; i++ {
		s, ok := p.read(i)
		if !ok {
			continue
		}
		res.Scanned++
		c := &s.c
		timeout := t.byState(connState(c.Flags))
		if p.idle(now, c.LastSeenJ) <= timeout {
			continue
		}
		r := p.portEntry(c.Lport, c.Baddr, c.Bport)
		mine := r != nil && r.Baddr == c.Baddr && r.Bport == c.Bport && r.Caddr == c.Key.Saddr && r.Cport == c.Key.Sport
		if mine && atomic.LoadUint32(&r.State) == portUsed && p.idle(now, atomic.LoadUint64(&r.LastSeenJ)) <= timeout {
			continue // the backend side is still talking
		}
		if !p.take(s) {
			continue // changed since it was read
		}
		slot := p.connAt(i)
		// Flags and last_seen change in place: look again now that the
		// slot is ours.
		flags := atomic.LoadUint32(&slot.Flags)
		if atomic.LoadUint64(&slot.LastSeenJ) != c.LastSeenJ || connState(flags) != connState(c.Flags) {
			p.release(i)
			continue
		}
		if mine {
			// A backend that closed first may hold TIME_WAIT: keep
			// the port from reuse until Timeouts.TimeWait.
			next := portFree
			if flags&uint32(xlbXlbConnFlagXLB_CF_TW) != 0 {
				next = portTWHold
			}
			atomic.CompareAndSwapUint32(&r.State, portUsed, next)
		}
		if connState(flags) != uint32(xlbXlbCtStateXLB_CT_CLOSED) {
			p.uncount(c.BackendId)
		}
		atomic.StoreUint32(&slot.Flags, ctDead)
		p.release(i)
		res.Expired++
	}

	// Ways whose connection is gone: holds past TimeWait, and ways left
	// by an LRU eviction (or a sweep race) of their forward entry.
	for i := uint32(0); i < p.nports*PortWays; i++ {
		r := p.portAt(i)
		state := atomic.LoadUint32(&r.State)
		if state == portFree {
			continue
		}
		age := p.idle(now, atomic.LoadUint64(&r.LastSeenJ))
		if state == portTWHold {
			if age > t.timeWait() && atomic.CompareAndSwapUint32(&r.State, portTWHold, portFree) {
				res.Released++
			}
			continue
		}
		if age <= t.Closed {
			continue
		}
		fk := xlbXlbFlow{Saddr: r.Caddr, Daddr: r.Vaddr, Sport: r.Cport, Dport: r.Vport, Proto: unix.IPPROTO_TCP}
		lport := portBE(p.portLo + uint16(i%p.nports))
		if s, ok := p.find(&fk); ok && s.c.Lport == lport && s.c.Baddr == r.Baddr && s.c.Bport == r.Bport {
			continue
		}
		if atomic.CompareAndSwapUint32(&r.State, portUsed, portFree) {
			res.Orphans++
		}
	}
	return res, nil
}
