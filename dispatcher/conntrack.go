package dispatcher

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

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

func retKey(c *xlbXlbConn) xlbXlbFlow {
	return xlbXlbFlow{Saddr: c.Baddr, Daddr: c.Laddr, Sport: c.Bport, Dport: c.Lport, Proto: unix.IPPROTO_TCP}
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
	Scanned, Expired, Orphans int
}

// GC removes connections idle for longer than their state's timeout and
// uncounts them from their backend if the data path had not already (on
// FIN/RST). The return entry goes too, freeing the source port, unless
// the backend closed first: then it is kept, marked as a hold, until
// Timeouts.TimeWait has passed, so the port is not given to another
// client while the backend's TIME_WAIT would refuse it. Return entries
// whose forward entry is gone are removed after Closed (or TimeWait for
// holds).
func (p *Pipeline) GC(t Timeouts) (GCResult, error) {
	var res GCResult
	now, err := p.now()
	if err != nil {
		return res, err
	}
	type victim struct {
		fk xlbXlbFlow
		c  xlbXlbConn
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
		rk := retKey(&v.c)
		var r xlbXlbRconn
		if err := p.objs.XlbRet.Lookup(&rk, &r); err == nil {
			if p.idle(now, r.LastSeenJ) <= t.byState(connState(v.c.Flags)) {
				continue // the backend side is still talking
			}
		}
		// Re-read: the data path may have closed it since the walk.
		var cur xlbXlbConn
		if err := p.objs.XlbFwd.Lookup(&v.fk, &cur); err != nil {
			continue
		}
		if cur.Lport != v.c.Lport || cur.Baddr != v.c.Baddr || cur.LastSeenJ != v.c.LastSeenJ {
			continue
		}
		if err := p.objs.XlbFwd.Delete(&v.fk); err != nil {
			continue
		}
		if cur.Flags&uint32(xlbXlbConnFlagXLB_CF_TW) != 0 {
			if err := p.objs.XlbRet.Lookup(&rk, &r); err == nil {
				r.Flags |= uint32(xlbXlbRconnFlagXLB_RF_TW_HOLD)
				_ = p.objs.XlbRet.Update(&rk, &r, ebpf.UpdateExist)
			}
		} else {
			_ = p.objs.XlbRet.Delete(&rk)
		}
		if connState(cur.Flags) != uint32(xlbXlbCtStateXLB_CT_CLOSED) {
			p.uncount(cur.BackendId)
		}
		res.Expired++
	}

	// Return entries left behind by an LRU eviction of their forward entry.
	var orphans []xlbXlbFlow
	err = walk(p.objs.XlbRet, func(k *xlbXlbFlow, r *xlbXlbRconn) {
		keep := t.Closed
		if r.Flags&uint32(xlbXlbRconnFlagXLB_RF_TW_HOLD) != 0 {
			keep = t.timeWait()
		}
		if p.idle(now, r.LastSeenJ) <= keep {
			return
		}
		fk := xlbXlbFlow{Saddr: r.Caddr, Daddr: r.Vaddr, Sport: r.Cport, Dport: r.Vport, Proto: unix.IPPROTO_TCP}
		var c xlbXlbConn
		if err := p.objs.XlbFwd.Lookup(&fk, &c); err == nil && c.Lport == k.Dport && c.Baddr == k.Saddr {
			return
		}
		orphans = append(orphans, *k)
	})
	if err != nil {
		return res, err
	}
	for i := range orphans {
		if p.objs.XlbRet.Delete(&orphans[i]) == nil {
			res.Orphans++
		}
	}
	return res, nil
}
