package dispatcher

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/internal/packet"
)

// seg describes a TCP segment for the builders below.
type seg struct {
	flags    string
	seq, ack uint32
	payload  []byte
	opts     []byte // raw TCP options
}

func clientMAC(a netip.Addr) net.HardwareAddr {
	if mac, ok := neighbours[a]; ok {
		return mac
	}
	return client2MAC
}

// fromClient is a packet from a client to a VIP as it arrives on lb0.
func fromClient(c, to netip.AddrPort, s seg) []byte {
	return packet.TCP(packet.TCPOpts{
		SrcMAC: clientMAC(c.Addr()), DstMAC: lbMAC, Src: c, Dst: to,
		Flags: s.flags, Seq: s.seq, Ack: s.ack, Payload: s.payload, Options: s.opts,
	})
}

// lbAddrOf is the load balancer's source address in a's family.
func lbAddrOf(a netip.Addr) netip.Addr {
	if a.Is6() {
		return lbAddr6
	}
	return lbAddr
}

// fromBackend is a reply from a backend to the load balancer's port.
func fromBackend(b netip.AddrPort, lport uint16, s seg) []byte {
	return packet.TCP(packet.TCPOpts{
		SrcMAC: neighbours[b.Addr()], DstMAC: lbMAC, Src: b, Dst: netip.AddrPortFrom(lbAddrOf(b.Addr()), lport),
		Flags: s.flags, Seq: s.seq, Ack: s.ack, Payload: s.payload, Options: s.opts,
	})
}

// toBackend is the packet the load balancer must send for fromClient,
// built independently of the data path: the connection's addresses, its
// sequence numbers shifted into the backend's space.
func toBackend(c Conn, s seg) []byte {
	return packet.TCP(packet.TCPOpts{
		SrcMAC: lbMAC, DstMAC: neighbours[c.Backend.Addr()], Src: c.Source, Dst: c.Backend,
		Flags: s.flags, Seq: s.seq + c.SeqDelta, Ack: s.ack, Payload: s.payload, Options: s.opts,
	})
}

// toClient is the packet the load balancer must send for fromBackend: its
// acknowledgement shifted back into the client's space.
func toClient(c Conn, s seg) []byte {
	ack := s.ack
	if strings.Contains(s.flags, "A") {
		ack -= c.SeqDelta
	}
	return packet.TCP(packet.TCPOpts{
		SrcMAC: lbMAC, DstMAC: clientMAC(c.Client.Addr()), Src: c.VIP, Dst: c.Client,
		Flags: s.flags, Seq: s.seq, Ack: ack, Payload: s.payload, Options: s.opts,
	})
}

// expect runs prog on in and checks the verdict, the output (nil: the
// input unchanged), the output's checksums when it was rewritten, and the
// counter changes.
func (e *env) expect(t *testing.T, prog *ebpf.Program, in []byte, wantVerdict uint32, wantOut []byte, wantCounters map[string]uint64) []byte {
	t.Helper()
	return e.expectFn(t, prog, in, wantVerdict, func() []byte { return wantOut }, wantCounters)
}

// expectFn is expect with the wanted output built after the run, for a
// packet that creates the connection the output depends on.
func (e *env) expectFn(t *testing.T, prog *ebpf.Program, in []byte, wantVerdict uint32, wantOutFn func() []byte, wantCounters map[string]uint64) []byte {
	t.Helper()
	before := e.stats()
	verdict, out := e.run(prog, in)
	after := e.stats()
	wantOut := wantOutFn()
	if verdict != wantVerdict {
		t.Errorf("verdict %s, want %s", verdictName(verdict), verdictName(wantVerdict))
	}
	if wantOut == nil {
		if !bytes.Equal(out, in) {
			t.Errorf("packet changed:\n got % x\nwant % x", out, in)
		}
	} else {
		if !bytes.Equal(out, wantOut) {
			t.Errorf("output differs:\n got % x\nwant % x", out, wantOut)
		}
		if err := packet.Verify(out); err != nil {
			t.Errorf("output: %v", err)
		}
	}
	checkDelta(t, before, after, wantCounters)
	return out
}

func (e *env) checkLport(t *testing.T, c Conn) {
	t.Helper()
	lo, hi := e.opts.PortLo, e.opts.PortHi
	if c.Source.Addr() != lbAddr {
		t.Errorf("source address %s, want %s", c.Source.Addr(), lbAddr)
	}
	if p := c.Source.Port(); p < lo || p > hi {
		t.Errorf("source port %d of %s outside %d-%d", p, c.Client, lo, hi)
	}
}

// TestPipelineConnection follows one connection through its life, then a
// second one on the same client port, through xlb_dispatch. The backend
// acknowledges in its own sequence space (the client's plus SeqDelta).
func TestPipelineConnection(t *testing.T) {
	e := newEnv(t, 4096)
	// Round robin makes the fresh selection of a recycled flow visible.
	e.must(e.p.SetSelection(1, ModeRoundRobin, []uint32{idA, idB}))
	cl := netip.AddrPortFrom(client1, 40000)
	var c Conn // the connection as tracked after the SYN
	b := func(clientSeq uint32) uint32 { return clientSeq + c.SeqDelta }

	steps := []struct {
		name         string
		in           func() []byte
		wantVerdict  uint32
		wantOut      func() []byte
		wantCounters map[string]uint64
		wantState    string
		wantActive   int64 // of c's backend
		wantHalfOpen int64
	}{
		{
			name:        "syn",
			in:          func() []byte { return fromClient(cl, vip, seg{flags: "S", seq: 1000}) },
			wantVerdict: xdpTX,
			wantOut: func() []byte {
				c = e.mustConn(cl, vip)
				e.checkLport(t, c)
				if c.Backend != backendA && c.Backend != backendB {
					t.Errorf("backend %s, want A or B", c.Backend)
				}
				return toBackend(c, seg{flags: "S", seq: 1000})
			},
			wantCounters: map[string]uint64{"fwd": 1, "new_conn": 1},
			wantState:    "syn", wantActive: 1, wantHalfOpen: 1,
		},
		{
			name: "syn-ack",
			in: func() []byte {
				return fromBackend(c.Backend, c.Source.Port(), seg{flags: "SA", seq: 5000, ack: b(1001)})
			},
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toClient(c, seg{flags: "SA", seq: 5000, ack: b(1001)}) },
			wantCounters: map[string]uint64{"ret": 1},
			wantState:    "syn-recv", wantActive: 1, wantHalfOpen: 1,
		},
		{
			// Not the SYN-ACK's sequence number plus one: no handshake.
			name:         "ack of something else",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "A", seq: 1001, ack: 4000}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "A", seq: 1001, ack: 4000}) },
			wantCounters: map[string]uint64{"fwd": 1},
			wantState:    "syn-recv", wantActive: 1, wantHalfOpen: 1,
		},
		{
			name:         "ack",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "A", seq: 1001, ack: 5001}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "A", seq: 1001, ack: 5001}) },
			wantCounters: map[string]uint64{"fwd": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			name: "client data",
			in: func() []byte {
				return fromClient(cl, vip, seg{flags: "PA", seq: 1001, ack: 5001, payload: []byte("GET / HTTP/1.0\r\n\r\n")})
			},
			wantVerdict: xdpTX,
			wantOut: func() []byte {
				return toBackend(c, seg{flags: "PA", seq: 1001, ack: 5001, payload: []byte("GET / HTTP/1.0\r\n\r\n")})
			},
			wantCounters: map[string]uint64{"fwd": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			name: "backend data",
			in: func() []byte {
				return fromBackend(c.Backend, c.Source.Port(), seg{flags: "PA", seq: 5001, ack: b(1019), payload: []byte("HTTP/1.0 200 OK\r\n\r\nhi")})
			},
			wantVerdict: xdpTX,
			wantOut: func() []byte {
				return toClient(c, seg{flags: "PA", seq: 5001, ack: b(1019), payload: []byte("HTTP/1.0 200 OK\r\n\r\nhi")})
			},
			wantCounters: map[string]uint64{"ret": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			// A forged RST and FIN, far from what the backend
			// acknowledged: forwarded (the backend judges them too),
			// but the connection stays as it is.
			name:         "client rst out of window",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "R", seq: 1019 + 1<<30}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "R", seq: 1019 + 1<<30}) },
			wantCounters: map[string]uint64{"fwd": 1, "untrusted_rst_fin": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			name:         "client fin out of window",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "FA", seq: 1019 + 3<<30, ack: 5022}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "FA", seq: 1019 + 3<<30, ack: 5022}) },
			wantCounters: map[string]uint64{"fwd": 1, "untrusted_rst_fin": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			name:         "backend rst out of window",
			in:           func() []byte { return fromBackend(c.Backend, c.Source.Port(), seg{flags: "R", seq: 5022 + 1<<31}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toClient(c, seg{flags: "R", seq: 5022 + 1<<31}) },
			wantCounters: map[string]uint64{"ret": 1, "untrusted_rst_fin": 1},
			wantState:    "established", wantActive: 1,
		},
		{
			name:         "client fin",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "FA", seq: 1019, ack: 5022}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "FA", seq: 1019, ack: 5022}) },
			wantCounters: map[string]uint64{"fwd": 1},
			wantState:    "fin", wantActive: 1,
		},
		{
			name: "backend fin",
			in: func() []byte {
				return fromBackend(c.Backend, c.Source.Port(), seg{flags: "FA", seq: 5022, ack: b(1020)})
			},
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toClient(c, seg{flags: "FA", seq: 5022, ack: b(1020)}) },
			wantCounters: map[string]uint64{"ret": 1, "closed": 1},
			wantState:    "closed", wantActive: 0,
		},
		{
			name:         "last ack after close",
			in:           func() []byte { return fromClient(cl, vip, seg{flags: "A", seq: 1020, ack: 5023}) },
			wantVerdict:  xdpTX,
			wantOut:      func() []byte { return toBackend(c, seg{flags: "A", seq: 1020, ack: 5023}) },
			wantCounters: map[string]uint64{"fwd": 1},
			wantState:    "closed", wantActive: 0,
		},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			in := st.in()
			before := e.stats()
			verdict, out := e.run(e.p.Entry(), in)
			after := e.stats()
			if verdict != st.wantVerdict {
				t.Errorf("verdict %s, want %s", verdictName(verdict), verdictName(st.wantVerdict))
			}
			want := st.wantOut()
			if !bytes.Equal(out, want) {
				t.Errorf("output differs:\n got % x\nwant % x", out, want)
			}
			if err := packet.Verify(out); err != nil {
				t.Errorf("output: %v", err)
			}
			checkDelta(t, before, after, st.wantCounters)
			now := e.mustConn(cl, vip)
			if now.State != st.wantState {
				t.Errorf("state %q, want %q", now.State, st.wantState)
			}
			if now.Source != c.Source || now.Backend != c.Backend || now.SeqDelta != c.SeqDelta {
				t.Errorf("connection moved: %s via %s (delta %d), was %s via %s (%d)", now.Backend, now.Source, now.SeqDelta,
					c.Backend, c.Source, c.SeqDelta)
			}
			if got := e.backendStats(now.BackendID); got.Active != st.wantActive || got.HalfOpen != st.wantHalfOpen {
				t.Errorf("backend %d %d active, %d half-open; want %d, %d", now.BackendID, got.Active, got.HalfOpen, st.wantActive, st.wantHalfOpen)
			}
		})
	}
	if t.Failed() {
		return
	}
	if used, held := e.p.PortsInUse(); used != 0 || held != 1 {
		t.Errorf("after the close: %d ports used, %d held; want the closed connection's port held", used, held)
	}

	old := c
	t.Run("recycle", func(t *testing.T) {
		before := e.stats()
		verdict, out := e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 9000}))
		checkDelta(t, before, e.stats(), map[string]uint64{"fwd": 1, "new_conn": 1, "recycled": 1})
		if verdict != xdpTX {
			t.Fatalf("verdict %s, want XDP_TX", verdictName(verdict))
		}
		c = e.mustConn(cl, vip)
		e.checkLport(t, c)
		if c.State != "syn" {
			t.Errorf("state %q, want syn", c.State)
		}
		if c.Backend == old.Backend {
			t.Errorf("round robin picked %s again for the new connection", c.Backend)
		}
		if want := toBackend(c, seg{flags: "S", seq: 9000}); !bytes.Equal(out, want) {
			t.Errorf("output differs:\n got % x\nwant % x", out, want)
		}
		if used, held := e.p.PortsInUse(); used != 1 || held != 1 {
			t.Errorf("%d ports used, %d held; want the new connection's and the old one resting", used, held)
		}
		for id, want := range map[uint32]int64{old.BackendID: 0, c.BackendID: 1} {
			if got := e.backendStats(id).Active; got != want {
				t.Errorf("backend %d active %d, want %d", id, got, want)
			}
		}
		// A late packet of the old connection still reaches its client
		// while the port rests.
		late := seg{flags: "A", seq: 5023, ack: old.SeqDelta + 1020}
		e.expect(t, e.p.Entry(), fromBackend(old.Backend, old.Source.Port(), late), xdpTX, toClient(old, late),
			map[string]uint64{"ret": 1})
	})
	t.Run("client rst", func(t *testing.T) {
		e.expect(t, e.p.Entry(), fromClient(cl, vip, seg{flags: "R", seq: 9001}), xdpTX, toBackend(c, seg{flags: "R", seq: 9001}),
			map[string]uint64{"fwd": 1, "closed": 1})
		if got := e.mustConn(cl, vip).State; got != "closed" {
			t.Errorf("state %q, want closed", got)
		}
		if got := e.backendStats(c.BackendID); got.Active != 0 || got.HalfOpen != 0 {
			t.Errorf("backend %d: %+v, want nothing active or half-open", c.BackendID, got)
		}
		// A second RST does not uncount again.
		e.expect(t, e.p.Entry(), fromClient(cl, vip, seg{flags: "R", seq: 9001}), xdpTX, toBackend(c, seg{flags: "R", seq: 9001}),
			map[string]uint64{"fwd": 1})
		if got := e.backendStats(c.BackendID).Active; got != 0 {
			t.Errorf("backend %d active %d after a second rst, want 0", c.BackendID, got)
		}
	})
}

// TestPipelineBackendRST closes a connection from the backend side: a RST
// that refuses the SYN counts only if it acknowledges exactly the SYN.
func TestPipelineBackendRST(t *testing.T) {
	e := newEnv(t, 4096)
	cl := netip.AddrPortFrom(client1, 40001)
	e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 1}))
	c := e.mustConn(cl, vip)
	wrong := seg{flags: "RA", ack: c.SeqDelta + 7}
	e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), wrong), xdpTX, toClient(c, wrong),
		map[string]uint64{"ret": 1, "untrusted_rst_fin": 1})
	if got := e.mustConn(cl, vip).State; got != "syn" {
		t.Errorf("state %q after a RST of something else, want syn", got)
	}
	rst := seg{flags: "RA", ack: c.SeqDelta + 2}
	e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), rst), xdpTX, toClient(c, rst),
		map[string]uint64{"ret": 1, "closed": 1})
	if got := e.mustConn(cl, vip).State; got != "closed" {
		t.Errorf("state %q, want closed", got)
	}
	if got := e.backendStats(c.BackendID); got.Active != 0 || got.HalfOpen != 0 {
		t.Errorf("backend: %+v, want nothing active or half-open", got)
	}
}

// TestPipelineSharedClientPort: two clients with the same source port,
// one of them without a neighbour entry, on a single backend.
func TestPipelineSharedClientPort(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	c1 := netip.AddrPortFrom(client1, 45000)
	c2 := netip.AddrPortFrom(client2, 45000)

	before := e.stats()
	verdict, out := e.run(e.p.Entry(), fromClient(c1, vip, seg{flags: "S", seq: 1}))
	checkDelta(t, before, e.stats(), map[string]uint64{"fwd": 1, "new_conn": 1})
	if want := toBackend(e.mustConn(c1, vip), seg{flags: "S", seq: 1}); verdict != xdpTX || !bytes.Equal(out, want) {
		t.Errorf("first syn: verdict %s, output % x, want % x", verdictName(verdict), out, want)
	}
	before = e.stats()
	verdict, out = e.run(e.p.Entry(), fromClient(c2, vip, seg{flags: "S", seq: 2}))
	checkDelta(t, before, e.stats(), map[string]uint64{"fwd": 1, "new_conn": 1})
	conn1, conn2 := e.mustConn(c1, vip), e.mustConn(c2, vip)
	if verdict != xdpTX || !bytes.Equal(out, toBackend(conn2, seg{flags: "S", seq: 2})) {
		t.Errorf("second syn: verdict %s, output % x", verdictName(verdict), out)
	}
	if conn1.Backend == conn2.Backend && conn1.Source == conn2.Source {
		t.Fatalf("both clients map to %s via %s", conn1.Backend, conn1.Source)
	}
	e.checkLport(t, conn1)
	e.checkLport(t, conn2)
	for _, c := range []Conn{conn1, conn2} {
		s := seg{flags: "SA", seq: 7, ack: 2}
		e.expect(t, e.p.Entry(), fromBackend(c.Backend, c.Source.Port(), s), xdpTX, toClient(c, s), map[string]uint64{"ret": 1})
	}
}

// TestBackendTraffic checks each backend's packet and byte counters
// (xlb_bk_ctr) against the packets sent each way: IPv4 total lengths.
func TestBackendTraffic(t *testing.T) {
	e := newEnv(t, 4096)
	e.must(e.p.SetSelection(1, ModeRandom, []uint32{idA}))
	cl := netip.AddrPortFrom(client1, 47000)
	var c Conn
	sent := [2]Traffic{}
	send := func(back bool, s seg) {
		t.Helper()
		pkt := fromClient(cl, vip, s)
		if back {
			pkt = fromBackend(backendA, c.Source.Port(), s)
		}
		if v, _ := e.run(e.p.Entry(), pkt); v != xdpTX {
			t.Fatalf("%s: %s", s.flags, verdictName(v))
		}
		n := uint64(binary.BigEndian.Uint16(pkt[14+2:]))
		if back {
			sent[0].FromBackendPackets++
			sent[0].FromBackendBytes += n
		} else {
			sent[0].ToBackendPackets++
			sent[0].ToBackendBytes += n
		}
	}
	send(false, seg{flags: "S", seq: 1})
	c = e.mustConn(cl, vip)
	send(true, seg{flags: "SA", seq: 10, ack: c.SeqDelta + 2})
	send(false, seg{flags: "A", seq: 2, ack: 11})
	send(false, seg{flags: "PA", seq: 2, ack: 11, payload: []byte("GET / HTTP/1.0\r\n\r\n")})
	send(true, seg{flags: "PA", seq: 11, ack: c.SeqDelta + 20, payload: make([]byte, 1000)})
	got, err := e.p.BackendTraffic()
	e.must(err)
	if got[idA] != sent[0] {
		t.Errorf("backend A's traffic %+v, want %+v", got[idA], sent[0])
	}
	if _, ok := got[idB]; ok {
		t.Errorf("backend B has traffic: %+v", got[idB])
	}
	// A reused id starts from zero.
	e.must(e.p.ResetBackendStats(idA))
	if got, err := e.p.BackendTraffic(); err != nil || got[idA] != sent[1] {
		t.Errorf("after a reset: %+v, %v", got[idA], err)
	}
}
