package dispatcher

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/internal/packet"
)

// scratchCPU0 reads the per-CPU scratch of CPU 0, where the namespace's
// thread runs the programs.
func (e *env) scratchCPU0() xlbXlbPkt {
	e.t.Helper()
	var per []xlbXlbPkt
	if err := e.p.objs.XlbScratch.Lookup(uint32(0), &per); err != nil {
		e.t.Fatalf("read scratch: %v", err)
	}
	return per[0]
}

func (e *env) setScratch(p xlbXlbPkt) {
	e.t.Helper()
	n, err := ebpf.PossibleCPU()
	e.must(err)
	per := make([]xlbXlbPkt, n)
	for i := range per {
		per[i] = p
	}
	e.must(e.p.objs.XlbScratch.Put(uint32(0), per))
}

func flowOf(src, dst netip.AddrPort) xlbXlbFlow {
	return xlbXlbFlow{Saddr: addrBE(src.Addr()), Daddr: addrBE(dst.Addr()), Sport: portBE(src.Port()), Dport: portBE(dst.Port()), Proto: 6}
}

// TestStageParse runs parse with the conntrack slot empty, so the packet
// stops after parse and its scratch output can be read.
func TestStageParse(t *testing.T) {
	e := newEnv(t, 1024)
	e.must(e.p.ProgArray().Delete(uint32(StageConntrack)))
	cl := netip.AddrPortFrom(client1, 40000)
	lb := netip.AddrPortFrom(lbAddr, portLo+7)
	tests := []struct {
		name    string
		in      []byte
		wantDir uint8
		want    xlbXlbFlow
		flags   uint8
	}{
		{"syn to vip", fromClient(cl, vip, seg{flags: "S"}), uint8(xlbXlbDirXLB_DIR_FWD), flowOf(cl, vip), 0x02},
		{"fin to second vip", fromClient(cl, vip2, seg{flags: "FA"}), uint8(xlbXlbDirXLB_DIR_FWD), flowOf(cl, vip2), 0x11},
		{"reply", fromBackend(backendB, lb.Port(), seg{flags: "PA", payload: []byte("x")}), uint8(xlbXlbDirXLB_DIR_RET), flowOf(backendB, lb), 0x18},
	}
	for _, prog := range []struct {
		name string
		p    *ebpf.Program
	}{{"parse", e.p.Stage(StageParse)}, {"dispatch", e.p.Entry()}} {
		for _, tt := range tests {
			t.Run(prog.name+"/"+tt.name, func(t *testing.T) {
				e.setScratch(xlbXlbPkt{})
				e.expect(t, prog.p, tt.in, xdpPass, nil, map[string]uint64{"tailcall_fail": 1})
				got := e.scratchCPU0()
				if got.Flow != tt.want || got.Dir != tt.wantDir || got.TcpFlags != tt.flags {
					t.Errorf("scratch flow %+v dir %d flags %#x, want %+v dir %d flags %#x", got.Flow, got.Dir, got.TcpFlags, tt.want, tt.wantDir, tt.flags)
				}
				if got.SvcId != 0 {
					t.Errorf("parse wrote service %d: the service is conntrack's to look up", got.SvcId)
				}
			})
		}
	}
}

// TestStageDispatchEmpty: with no parse stage everything is passed.
func TestStageDispatchEmpty(t *testing.T) {
	e := newEnv(t, 1024)
	e.must(e.p.ProgArray().Delete(uint32(StageParse)))
	e.expect(t, e.p.Entry(), fromClient(netip.AddrPortFrom(client1, 1), vip, seg{flags: "S"}), xdpPass, nil, map[string]uint64{"tailcall_fail": 1})
}

// TestStageRewrite runs rewrite alone on a scratch written by the test.
func TestStageRewrite(t *testing.T) {
	e := newEnv(t, 1024)
	cl := netip.AddrPortFrom(client1, 33333)
	newSrc := netip.MustParseAddrPort("10.50.0.1:21111")
	newDst := netip.MustParseAddrPort("192.0.2.77:9999")
	dmac := neighbours[backendC.Addr()]
	s := seg{flags: "PA", seq: 0xfffffff0, ack: 12, payload: []byte("payload!")}
	in := fromClient(cl, vip, s)
	want := func(smac []byte) []byte {
		return packet.TCP(packet.TCPOpts{SrcMAC: smac, DstMAC: dmac, Src: newSrc, Dst: newDst, Flags: "PA", Seq: s.seq, Ack: s.ack, Payload: s.payload})
	}
	scr := func(dir xlbXlbDir, ifindex uint32, smac []byte) xlbXlbPkt {
		p := xlbXlbPkt{
			Dir:      uint8(dir),
			NewSaddr: addrBE(newSrc.Addr()), NewDaddr: addrBE(newDst.Addr()),
			NewSport: portBE(newSrc.Port()), NewDport: portBE(newDst.Port()),
		}
		p.Nh.Ifindex = ifindex
		copy(p.Nh.Smac[:], smac)
		copy(p.Nh.Dmac[:], dmac)
		return p
	}
	opts := packet.TCPOpts{SrcMAC: clientMAC(client1), DstMAC: lbMAC, Src: cl, Dst: vip, Flags: "PA", IPOptions: []byte{1, 1, 1, 1}}
	tests := []struct {
		name         string
		scratch      xlbXlbPkt
		in           []byte
		wantVerdict  uint32
		wantOut      []byte
		wantCounters map[string]uint64
	}{
		{"forward, same interface", scr(xlbXlbDirXLB_DIR_FWD, e.lb0, lbMAC), in, xdpTX, want(lbMAC), map[string]uint64{"fwd": 1}},
		{"return, same interface", scr(xlbXlbDirXLB_DIR_RET, e.lb0, lbMAC), in, xdpTX, want(lbMAC), map[string]uint64{"ret": 1}},
		{"forward, other interface", scr(xlbXlbDirXLB_DIR_FWD, e.lb1, lb1MAC), in, xdpRedirect, want(lb1MAC), map[string]uint64{"fwd": 1, "redirect": 1}},
		{"ip options", scr(xlbXlbDirXLB_DIR_FWD, e.lb0, lbMAC), packet.TCP(opts), xdpDrop, nil, map[string]uint64{"drop_internal": 1}},
		{"short packet", scr(xlbXlbDirXLB_DIR_FWD, e.lb0, lbMAC), packet.Truncate(in, 14+20+19), xdpDrop, nil, map[string]uint64{"drop_internal": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e.setScratch(tt.scratch)
			e.expect(t, e.p.Stage(StageRewrite), tt.in, tt.wantVerdict, tt.wantOut, tt.wantCounters)
		})
	}
}
