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

// connHalfOpen mirrors conn_half_open().
func connHalfOpen(flags uint32) bool { return flags&(cfEstab|cfUDP) == 0 && !connClosed(flags) }

// connState mirrors conn_state().
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

// portWay mirrors port_way() in programs/include/xlb_ports.h
// (TestMirrorsAgree).
func portWay(baddr uint32, bport uint16) uint32 {
	return ((baddr ^ (uint32(bport)<<16 | uint32(bport))) * 0x9e3779b1) >> (32 - portWaysLog2)
}

const (
	portFree = uint32(xlbXlbPortStateXLB_PS_FREE)
	portUsed = uint32(xlbXlbPortStateXLB_PS_USED)
	portHold = uint32(xlbXlbPortStateXLB_PS_HOLD)
)

// tables are the pipeline's families' tables, IPv4 first.
func (p *Pipeline) tables() [2]*table { return [2]*table{&p.t4, &p.t6} }

// PortsInUse counts source-port ways taken by connections, and ways
// resting after their connection ended, of both families.
func (p *Pipeline) PortsInUse() (used, held int) {
	for _, t := range p.tables() {
		for i := range t.numPorts() {
			switch atomic.LoadUint32(&t.portAt(i).State) {
			case portUsed:
				used++
			case portHold:
				held++
			}
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
	for _, t := range p.tables() {
		for i := range t.numPorts() {
			r := t.portAt(i)
			st := atomic.LoadUint32(&r.State)
			if st == portFree {
				continue
			}
			b := addrPortOf(t.portAddr(i, t.rBaddr), r.Bport)
			u := out[b]
			if st == portUsed {
				u.Used++
			} else {
				u.Held++
			}
			out[b] = u
		}
	}
	return out
}

// PortPool is the number of ports per source address and backend way.
func (p *Pipeline) PortPool() int { return int(p.nports) }

// flowHash mirrors flow_hash() in programs/include/xlb_hash.h: it places
// an IPv4 flow in the connection table (TestMirrorsAgree).
func flowHash(k *xlbXlbFlow) uint32 {
	return mix3(k.Saddr, k.Daddr, (uint32(k.Sport)<<16|uint32(k.Dport))^uint32(k.Proto))
}

const ctDead = uint32(xlbXlbConnFlagXLB_CF_DEAD)

// snapshot is a stable copy of a slot and the sequence it was read at.
type snapshot struct {
	t   *table
	idx uint32
	seq uint32
	b   [maxConnSize]byte
}

func (s *snapshot) head() *connHead { return (*connHead)(unsafe.Pointer(&s.b[0])) }
func (s *snapshot) key() flowKey    { return s.t.key(s.b[:]) }
func (s *snapshot) laddr() []byte   { return s.b[s.t.cLaddr : s.t.cLaddr+s.t.alen] }
func (s *snapshot) baddr() []byte   { return s.b[s.t.cBaddr : s.t.cBaddr+s.t.alen] }

// Slot states as a reader finds them.
const (
	slotFree = iota // never used, or a tombstone
	slotBusy        // being written (odd) on every try
	slotLive        // holds a connection
)

// readSlot copies slot i into s if it holds a connection and is not being
// written, and says what it found.
func (t *table) readSlot(i uint32, s *snapshot) int {
	h := t.head(i)
	for try := 0; try < 3; try++ {
		seq := atomic.LoadUint32(&h.Seq)
		if seq&1 != 0 {
			continue
		}
		copy(s.b[:], t.slot(i))
		if atomic.LoadUint32(&h.Seq) != seq {
			continue
		}
		if f := s.head().Flags; f == 0 || f&ctDead != 0 {
			return slotFree
		}
		s.t, s.idx, s.seq = t, i, seq
		return slotLive
	}
	return slotBusy
}

// read copies slot i if it holds a connection and is not being written.
func (t *table) read(i uint32, s *snapshot) bool { return t.readSlot(i, s) == slotLive }

// find returns the connection of a flow.
func (t *table) find(k *flowKey) (snapshot, bool) {
	var s snapshot
	h := k.hash()
	for i := uint32(0); i < ctWays; i++ {
		if t.read((h+i)&t.ctMask, &s) {
			if sk := s.key(); sk.equal(k) {
				return s, true
			}
		}
	}
	return snapshot{}, false
}

// take makes a slot odd for the daemon to rewrite, if it is still what
// was read; release makes it stable again.
func (t *table) take(s *snapshot) bool {
	return atomic.CompareAndSwapUint32(&t.head(s.idx).Seq, s.seq, s.seq+1)
}

func (t *table) release(idx uint32) { atomic.AddUint32(&t.head(idx).Seq, 1) }

// Conns lists the tracked connections of both families.
func (p *Pipeline) Conns() ([]Conn, error) {
	now, err := p.now()
	if err != nil {
		return nil, err
	}
	var out []Conn
	var s snapshot
	for _, t := range p.tables() {
		bitmap(t.ctBusy).each(func(i uint32) {
			if i > t.ctMask || !t.read(i, &s) {
				return
			}
			h, k := s.head(), s.key()
			out = append(out, Conn{
				Client:    addrPortOf(k.saddr, k.sport),
				VIP:       addrPortOf(k.daddr, k.dport),
				Backend:   addrPortOf(s.baddr(), h.Bport),
				Source:    addrPortOf(s.laddr(), h.Lport),
				Protocol:  k.proto,
				BackendID: h.BackendId,
				State:     stateName(connState(h.Flags)),
				Idle:      p.idle(now, h.LastSeenJ),
				SeqDelta:  h.SeqDelta,
			})
		})
	}
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
func (p *Pipeline) GC(to Timeouts) (GCResult, error) {
	var res GCResult
	now, err := p.now()
	if err != nil {
		return res, err
	}
	var s snapshot
	for _, t := range p.tables() {
		bitmap(t.ctBusy).sweep(func(i uint32) bool { return p.sweepConn(t, i, now, to, &res) }, func(i uint32) bool {
			return t.readSlot(i, &s) != slotFree
		})
		bitmap(t.portBusy).sweep(func(i uint32) bool { return p.sweepPort(t, i, now, to, &res) }, func(i uint32) bool {
			return atomic.LoadUint32(&t.portAt(i).State) != portFree
		})
	}
	return res, nil
}

// connPort returns the index of the way a connection's snapshot names,
// and whether it is still the connection's: same backend and client.
func (t *table) connPort(s *snapshot) (uint32, bool) {
	h, k := s.head(), s.key()
	i, ok := t.portEntry(h.SrcIdx, h.Lport, s.baddr(), h.Bport)
	if !ok {
		return 0, false
	}
	r := t.portAt(i)
	return i, r.Bport == h.Bport && r.Cport == k.sport && string(t.portAddr(i, t.rBaddr)) == string(s.baddr()) &&
		string(t.portAddr(i, t.rCaddr)) == string(k.saddr)
}

// sweepConn expires slot i's connection if it is idle past its timeout,
// and reports whether the slot is still in use.
func (p *Pipeline) sweepConn(t *table, i uint32, now uint64, to Timeouts, res *GCResult) bool {
	if i > t.ctMask {
		return false
	}
	var s snapshot
	if st := t.readSlot(i, &s); st != slotLive {
		return st == slotBusy
	}
	res.Scanned++
	h := s.head()
	timeout := to.byState(connState(h.Flags))
	if p.idle(now, h.LastSeenJ) <= timeout {
		return true
	}
	if ri, mine := t.connPort(&s); mine && !connHalfOpen(h.Flags) {
		r := t.portAt(ri)
		if atomic.LoadUint32(&r.State) == portUsed && p.idle32(now, atomic.LoadUint32(&r.LastSeenJ)) <= timeout {
			return true // the backend side is still talking
		}
	}
	if !p.end(t, &s, now, true) {
		return true // changed since it was read
	}
	res.Expired++
	return false
}

// end ends the connection of snapshot s: it uncounts it from its
// backend, starts its source port's hold and frees the slot. With
// unchanged, it gives up (and reports false) if the connection saw a
// packet or changed state since s was read.
func (p *Pipeline) end(t *table, s *snapshot, now uint64, unchanged bool) bool {
	if !t.take(s) {
		return false
	}
	slot, h := t.head(s.idx), s.head()
	// Flags and last_seen change in place: look again now that the slot
	// is ours.
	flags := atomic.LoadUint32(&slot.Flags)
	if unchanged && (atomic.LoadUint64(&slot.LastSeenJ) != h.LastSeenJ || connState(flags) != connState(h.Flags)) {
		t.release(s.idx)
		return false
	}
	if ri, mine := t.connPort(s); mine {
		r := t.portAt(ri)
		atomic.StoreUint32(&r.LastSeenJ, uint32(now)) // the hold starts now
		atomic.CompareAndSwapUint32(&r.State, portUsed, portHold)
	}
	p.uncount(h.BackendId, flags)
	atomic.StoreUint32(&slot.Flags, ctDead)
	t.release(s.idx)
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
	var s snapshot
	for _, t := range p.tables() {
		bitmap(t.ctBusy).each(func(i uint32) {
			if i > t.ctMask {
				return
			}
			// A slot being written is retried for a moment: it may be
			// a new connection to this backend.
			for try := 0; try < 100; try++ {
				st := t.readSlot(i, &s)
				if st == slotBusy {
					runtime.Gosched()
					continue
				}
				if st != slotLive || s.head().BackendId != id {
					return
				}
				if p.end(t, &s, now, false) {
					n++
					return
				}
			}
		})
	}
	return n, nil
}

// sweepPort frees way i if its hold has passed or its connection is gone,
// and reports whether it is still in use.
func (p *Pipeline) sweepPort(t *table, i uint32, now uint64, to Timeouts, res *GCResult) bool {
	if i >= t.numPorts() {
		return false
	}
	r := t.portAt(i)
	state := atomic.LoadUint32(&r.State)
	if state == portFree {
		return false
	}
	age := p.idle32(now, atomic.LoadUint32(&r.LastSeenJ))
	if state == portHold {
		if age > to.hold() && atomic.CompareAndSwapUint32(&r.State, portHold, portFree) {
			res.Released++
			return false
		}
		return true
	}
	if age <= to.Closed {
		return true
	}
	proto := uint8(TCP)
	if uint32(r.Flags)&uint32(xlbXlbRconnFlagXLB_RF_UDP) != 0 {
		proto = UDP
	}
	fk := flowKey{saddr: t.portAddr(i, t.rCaddr), daddr: t.portAddr(i, t.rVaddr), sport: r.Cport, dport: r.Vport, proto: proto}
	lport := portBE(t.portLo + uint16(i%t.nports))
	if s, ok := t.find(&fk); ok {
		if h := s.head(); h.Lport == lport && h.Bport == r.Bport && string(s.baddr()) == string(t.portAddr(i, t.rBaddr)) {
			return true
		}
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
