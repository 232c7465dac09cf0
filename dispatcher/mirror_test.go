package dispatcher

import (
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/xlb-project/xlb/internal/testnet"
)

// TestMirrorsAgree proves that the Go copies of data path functions
// (flowHash, portWay, connClosed, connHalfOpen, connState) compute what
// the C in programs/include computes: a test program (testdata/mirror.c)
// runs the C on the same inputs, every combination of the connection
// flags and random flows and backends.
func TestMirrorsAgree(t *testing.T) {
	testnet.RequirePrivileged(t)
	spec, err := loadMirror()
	if err != nil {
		t.Fatal(err)
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"xlb_mirror"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatalf("load mirror program: %v", err)
	}
	defer objs.Prog.Close()

	run := func(in mirrorMirrorIo) mirrorMirrorIo {
		t.Helper()
		size := int(unsafe.Sizeof(in))
		out := make([]byte, size+256)
		v, err := objs.Prog.Run(&ebpf.RunOptions{
			Data:    unsafe.Slice((*byte)(unsafe.Pointer(&in)), size),
			DataOut: out,
		})
		if err != nil || v != uint32(TX) {
			t.Fatalf("run mirror program: verdict %s, %v", Verdict(v), err)
		}
		return *(*mirrorMirrorIo)(unsafe.Pointer(&out[0]))
	}
	check := func(in mirrorMirrorIo) {
		t.Helper()
		got := run(in)
		flow := xlbXlbFlow(in.Flow)
		want := in
		want.FlowHash = flowHash(&flow)
		want.PortWay = portWay(in.Baddr, in.Bport)
		want.Closed = b2u(connClosed(in.Flags))
		want.HalfOpen = b2u(connHalfOpen(in.Flags))
		want.State = connState(in.Flags)
		if got != want {
			t.Fatalf("C and Go differ for flow %+v flags %#x backend %#x:%#x:\n C  %+v\n Go %+v", in.Flow, in.Flags, in.Baddr, in.Bport, got, want)
		}
	}

	// Every combination of the defined flags (enum xlb_conn_flag, read
	// from the pipeline's BTF), with and without the tombstone bit and
	// with bits no flag uses.
	xlbSpec, err := loadXlb()
	if err != nil {
		t.Fatal(err)
	}
	var flagEnum *btf.Enum
	if err := xlbSpec.Types.TypeByName("xlb_conn_flag", &flagEnum); err != nil {
		t.Fatal(err)
	}
	var defined uint32
	for _, v := range flagEnum.Values {
		if uint32(v.Value) != ctDead {
			defined |= uint32(v.Value)
		}
	}
	states := map[uint32]bool{}
	for f := uint32(0); f <= defined; f++ {
		if f&^defined != 0 {
			continue
		}
		for _, extra := range []uint32{0, ctDead, 1 << 12, ctDead | 1<<20} {
			check(mirrorMirrorIo{Flags: f | extra})
			states[connState(f)] = true
		}
	}
	if len(states) != int(xlbXlbCtStateXLB_CT_MAX) {
		t.Errorf("the flag combinations reached %d states, want all %d", len(states), xlbXlbCtStateXLB_CT_MAX)
	}

	// Random flows and backends, and the edges of every field.
	rng := rand.New(rand.NewPCG(1, 2))
	edges := []uint32{0, 1, 0x7fffffff, 0x80000000, 0xffffffff}
	for i := range 20000 {
		var in mirrorMirrorIo
		in.Flow.Saddr, in.Flow.Daddr = rng.Uint32(), rng.Uint32()
		in.Flow.Sport, in.Flow.Dport = uint16(rng.Uint32()), uint16(rng.Uint32())
		in.Flow.Proto = uint8(rng.Uint32())
		in.Baddr, in.Bport = rng.Uint32(), uint16(rng.Uint32())
		in.Flags = rng.Uint32()
		if i < len(edges)*len(edges) {
			e1, e2 := edges[i%len(edges)], edges[i/len(edges)]
			in.Flow.Saddr, in.Flow.Daddr, in.Baddr = e1, e2, e1^e2
			in.Flow.Sport, in.Flow.Dport, in.Bport = uint16(e1), uint16(e2), uint16(e2>>16)
		}
		check(in)
	}
}

func b2u(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}
