package dispatcher

import (
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Conn is one tracked connection, as read from the forward table.
type Conn struct {
	Client, VIP     netip.AddrPort
	Backend, Source netip.AddrPort // Source: the load balancer's side
	BackendID       uint32
	Service         uint32
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
	return p.portAt(uint32(host-p.portLo)*PortWays + portWay(baddr, bport))
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

const batchSize = 4096

// walk calls fn for every entry of a conntrack table, in batches.
func walk[K, V any](m *ebpf.Map, fn func(k *K, v *V)) error {
	keys := make([]K, batchSize)
	vals := make([]V, batchSize)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			fn(&keys[i], &vals[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("walk %s: %w", m, err)
		}
	}
}

// Conns lists the tracked connections.
func (p *Pipeline) Conns() ([]Conn, error) {
	now, err := p.now()
	if err != nil {
		return nil, err
	}
	var out []Conn
	err = walk(p.objs.XlbFwd, func(k *xlbXlbFlow, c *xlbXlbConn) {
		out = append(out, Conn{
			Client:    addrPort(k.Saddr, k.Sport),
			VIP:       addrPort(k.Daddr, k.Dport),
			Backend:   addrPort(c.Baddr, c.Bport),
			Source:    addrPort(c.Laddr, c.Lport),
			BackendID: c.BackendId,
			Service:   c.SvcId,
			State:     stateName(connState(c.Flags)),
			Idle:      p.idle(now, c.LastSeenJ),
		})
	})
	return out, err
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
	type victim struct {
		k xlbXlbFlow
		c xlbXlbConn
	}
	var victims []victim
	err = walk(p.objs.XlbFwd, func(k *xlbXlbFlow, c *xlbXlbConn) {
		res.Scanned++
		if p.idle(now, c.LastSeenJ) > t.byState(connState(c.Flags)) {
			victims = append(victims, victim{*k, *c})
		}
	})
	if err != nil {
		return res, err
	}
	for _, v := range victims {
		r := p.portEntry(v.c.Lport, v.c.Baddr, v.c.Bport)
		mine := r != nil && r.Baddr == v.c.Baddr && r.Bport == v.c.Bport && r.Caddr == v.k.Saddr && r.Cport == v.k.Sport
		if mine && atomic.LoadUint32(&r.State) == portUsed &&
			p.idle(now, atomic.LoadUint64(&r.LastSeenJ)) <= t.byState(connState(v.c.Flags)) {
			continue // the backend side is still talking
		}
		// Re-read: the data path may have closed it since the walk.
		var cur xlbXlbConn
		if err := p.objs.XlbFwd.Lookup(&v.k, &cur); err != nil {
			continue
		}
		if cur.Lport != v.c.Lport || cur.Baddr != v.c.Baddr || cur.LastSeenJ != v.c.LastSeenJ {
			continue
		}
		if err := p.objs.XlbFwd.Delete(&v.k); err != nil {
			continue
		}
		if mine {
			// A backend that closed first may hold TIME_WAIT: keep
			// the port from reuse until Timeouts.TimeWait.
			next := portFree
			if cur.Flags&uint32(xlbXlbConnFlagXLB_CF_TW) != 0 {
				next = portTWHold
			}
			atomic.CompareAndSwapUint32(&r.State, portUsed, next)
		}
		if connState(cur.Flags) != uint32(xlbXlbCtStateXLB_CT_CLOSED) {
			p.uncount(cur.BackendId)
		}
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
		lport := portBE(p.portLo + uint16(i/PortWays))
		var c xlbXlbConn
		if err := p.objs.XlbFwd.Lookup(&fk, &c); err == nil && c.Lport == lport && c.Baddr == r.Baddr && c.Bport == r.Bport {
			continue
		}
		if atomic.CompareAndSwapUint32(&r.State, portUsed, portFree) {
			res.Orphans++
		}
	}
	return res, nil
}
