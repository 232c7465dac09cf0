package dispatcher

import (
	"bytes"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"

	"github.com/xlb-project/xlb/internal/packet"
	"github.com/xlb-project/xlb/internal/testnet"
)

// Offsets of the trace that testdata/chain_members.c writes.
const (
	chainTraceOff = 54
	chainTraceLen = 16
)

var chainObj struct {
	once sync.Once
	path string
	err  error
}

// chainMembersObject compiles testdata/chain_members.c once per test
// binary (clang is a CI dependency, see docs/chain-protocol.md).
func chainMembersObject(t testing.TB) string {
	t.Helper()
	chainObj.once.Do(func() {
		dir, err := os.MkdirTemp("", "xlb-chain-test")
		if err != nil {
			chainObj.err = err
			return
		}
		chainObj.path = filepath.Join(dir, "chain_members.o")
		chainObj.err = compileBPF("testdata/chain_members.c", chainObj.path, "-g")
	})
	if chainObj.err != nil {
		t.Fatalf("compile chain members: %v", chainObj.err)
	}
	return chainObj.path
}

func compileBPF(src, out string, flags ...string) error {
	args := append([]string{"-O2", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
		"-I/usr/include/x86_64-linux-gnu", "-c", src, "-o", out}, flags...)
	cmd := exec.Command("clang", args...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return errors.New(strings.TrimSpace(string(b)) + ": " + err.Error())
	}
	return nil
}

// chainPacket is a TCP packet that xlb passes (no service is configured),
// with an empty trace as its payload.
func chainPacket() []byte {
	return packet.TCP(packet.TCPOpts{
		Src:     netip.MustParseAddrPort("10.0.0.1:40000"),
		Dst:     netip.MustParseAddrPort("10.0.0.2:80"),
		Flags:   "S",
		Payload: make([]byte, chainTraceLen),
	})
}

// chainMalformed is a packet xlb drops (IPv4 header length 4) with room
// for the trace.
func chainMalformed() []byte {
	b := chainPacket()
	b[14] = 0x44
	return b
}

func chainTrace(out []byte) string {
	if len(out) < chainTraceOff+chainTraceLen {
		return "<short>"
	}
	n := int(out[chainTraceOff])
	if n >= chainTraceLen {
		return "<bad>"
	}
	return string(out[chainTraceOff+1 : chainTraceOff+1+n])
}

type chainFixture struct {
	t   *testing.T
	p   *Pipeline
	obj string
	pin string
}

func newChainFixture(t *testing.T) *chainFixture {
	testnet.RequirePrivileged(t)
	obj := chainMembersObject(t)
	p, err := Load(Options{ConntrackSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return &chainFixture{t: t, p: p, obj: obj}
}

// member loads program from the test object as a member with created maps.
func (f *chainFixture) member(name, program string) *Member {
	f.t.Helper()
	m, err := LoadMember(name, f.obj, program)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := m.CreateMaps(); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { m.Close() })
	if f.pin != "" {
		if err := m.Pin(filepath.Join(f.pin, name)); err != nil {
			f.t.Fatal(err)
		}
		f.t.Cleanup(func() { m.Unpin() })
	}
	return m
}

func (f *chainFixture) build(entries ...ChainEntry) *ebpf.Program {
	f.t.Helper()
	prog, err := f.p.BuildChain(entries)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { prog.Close() })
	return prog
}

func chainRun(t *testing.T, prog *ebpf.Program, in []byte) (Verdict, []byte) {
	t.Helper()
	out := make([]byte, len(in)+256)
	v, err := prog.Run(&ebpf.RunOptions{Data: in, DataOut: out})
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return Verdict(v), out
}

// TestChainTailCallReturnsToCaller checks what the chain design rests on:
// a tail call made from a BPF-to-BPF subprogram returns, when the called
// program exits, to the subprogram's caller, with that program's verdict.
func TestChainTailCallReturnsToCaller(t *testing.T) {
	testnet.RequirePrivileged(t)
	progs, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ProgramArray, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer progs.Close()
	target, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.XDP, AttachType: ebpf.AttachXDP, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, int32(TX)), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := progs.Put(uint32(0), target); err != nil {
		t.Fatal(err)
	}
	// main: r6 = ctx; r0 = sub(ctx); r0 += 100; return r0
	// sub:  tail_call(ctx, progs, 0); return 1
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1).WithSymbol("main"),
		asm.Call.Label("sub"),
		asm.Add.Imm(asm.R0, 100),
		asm.Return(),
		asm.LoadMapPtr(asm.R2, progs.FD()).WithSymbol("sub"),
		asm.Mov.Imm(asm.R3, 0),
		asm.FnTailCall.Call(),
		asm.Mov.Imm(asm.R0, 1),
		asm.Return(),
	}
	spec := &ebpf.ProgramSpec{Type: ebpf.XDP, AttachType: ebpf.AttachXDP, License: "GPL", Instructions: insns}
	// The kernel wants BTF func info for a subprogram that tail-calls.
	if _, err := ebpf.NewProgram(spec); err == nil || !strings.Contains(err.Error(), "without BTF") {
		t.Errorf("tail call in a subprogram without func info: %v, want refused", err)
	}
	intType := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	proto := &btf.FuncProto{Return: intType}
	spec.Instructions = slices.Clone(insns)
	spec.Instructions[0] = btf.WithFuncMetadata(insns[0], &btf.Func{Name: "main", Type: proto, Linkage: btf.GlobalFunc})
	spec.Instructions[4] = btf.WithFuncMetadata(insns[4], &btf.Func{Name: "sub", Type: proto, Linkage: btf.StaticFunc})
	caller, err := ebpf.NewProgram(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer caller.Close()
	v, err := caller.Run(&ebpf.RunOptions{Data: make([]byte, 64)})
	if err != nil {
		t.Fatal(err)
	}
	if v != 100+uint32(TX) {
		t.Fatalf("caller returned %d, want %d (tail-called program's XDP_TX + 100)", v, 100+uint32(TX))
	}
}

func TestChainSemantics(t *testing.T) {
	f := newChainFixture(t)
	a := f.member("a", "pass_a")
	b := f.member("b", "pass_b")
	c := f.member("c", "pass_c")
	d := f.member("d", "drop_d")
	tx := f.member("t", "tx_t")
	r := f.member("r", "redirect_r")
	x := f.member("x", "aborted_x")
	xlb := func(prio int) ChainEntry { return ChainEntry{Priority: prio} }
	e := func(m *Member, prio int, cont ...Verdict) ChainEntry {
		return ChainEntry{Member: m, Priority: prio, ContinueOn: cont}
	}

	tests := []struct {
		name        string
		entries     []ChainEntry
		in          []byte
		wantVerdict Verdict
		wantTrace   string
	}{
		{"xlb only passes", []ChainEntry{xlb(50)}, chainPacket(), Pass, ""},
		{"xlb only drops malformed", []ChainEntry{xlb(50)}, chainMalformed(), Drop, ""},
		{"priority order", []ChainEntry{e(c, 30), e(a, 10), e(b, 20)}, chainPacket(), Pass, "abc"},
		{"ties by name", []ChainEntry{e(c, 10), e(b, 10), e(a, 10)}, chainPacket(), Pass, "abc"},
		{"drop ends the chain", []ChainEntry{e(a, 10), e(d, 20), e(b, 30)}, chainPacket(), Drop, "ad"},
		{"tx ends the chain", []ChainEntry{e(a, 10), e(tx, 20), e(b, 30)}, chainPacket(), TX, "at"},
		{"redirect ends the chain", []ChainEntry{e(r, 10), e(b, 30)}, chainPacket(), Redirect, "r"},
		{"aborted ends the chain", []ChainEntry{e(x, 10), e(b, 30)}, chainPacket(), Aborted, "x"},
		{"continue on drop", []ChainEntry{e(d, 10, Pass, Drop), e(b, 30)}, chainPacket(), Pass, "db"},
		{"continue on tx", []ChainEntry{e(tx, 10, TX), e(d, 30)}, chainPacket(), Drop, "td"},
		{"pass does not continue when not listed", []ChainEntry{e(a, 10, Drop), e(b, 30)}, chainPacket(), Pass, "a"},
		{"empty continue set ends the chain", []ChainEntry{e(a, 10), e(b, 20, []Verdict{}...), e(c, 30)}, chainPacket(), Pass, "ab"},
		{"last verdict is returned", []ChainEntry{e(a, 10), e(d, 20, Drop)}, chainPacket(), Drop, "ad"},
		{"xlb in the middle passes on", []ChainEntry{e(a, 10), xlb(50), e(b, 60)}, chainPacket(), Pass, "ab"},
		{"xlb in the middle drops malformed", []ChainEntry{e(a, 10), xlb(50), e(b, 60)}, chainMalformed(), Drop, "a"},
		{"xlb first", []ChainEntry{xlb(5), e(a, 10), e(b, 60)}, chainPacket(), Pass, "ab"},
		{"xlb last", []ChainEntry{e(a, 10), e(b, 60), xlb(70)}, chainMalformed(), Drop, "ab"},
		{"member after xlb sees no dropped packet", []ChainEntry{xlb(10), e(a, 60)}, chainMalformed(), Drop, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entries := append([]ChainEntry(nil), tt.entries...)
			SortChain(entries)
			prog := f.build(entries...)
			v, out := chainRun(t, prog, tt.in)
			if v != tt.wantVerdict {
				t.Errorf("verdict %s, want %s", v, tt.wantVerdict)
			}
			if got := chainTrace(out); got != tt.wantTrace {
				t.Errorf("trace %q, want %q", got, tt.wantTrace)
			}
			// Nothing but the trace may change.
			want := append([]byte(nil), tt.in...)
			want[chainTraceOff] = byte(len(tt.wantTrace))
			copy(want[chainTraceOff+1:], tt.wantTrace)
			if !bytes.Equal(out[:len(want)], want) {
				t.Errorf("output packet\n%x\nwant\n%x", out[:len(want)], want)
			}
		})
	}
}

// TestChainPipelineVerdicts checks that xlb's counters move when it runs
// as a chain member: its tail calls run for real.
func TestChainPipelineVerdicts(t *testing.T) {
	f := newChainFixture(t)
	a := f.member("a", "pass_a")
	prog := f.build(ChainEntry{Member: a, Priority: 10}, ChainEntry{Priority: 50})
	before, err := f.p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	chainRun(t, prog, chainMalformed())
	after, err := f.p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if after["drop_ip_hdr"] != before["drop_ip_hdr"]+1 {
		t.Errorf("drop_ip_hdr %d -> %d, want one more (stats %v)", before["drop_ip_hdr"], after["drop_ip_hdr"], after)
	}
}

func TestChainRunConfig(t *testing.T) {
	f := newChainFixture(t)
	tests := []struct {
		program string
		want    RunConfig
	}{
		{"pass_a", RunConfig{}},
		{"early_e", RunConfig{Priority: 10, HasPriority: true, ContinueOn: []Verdict{Pass}, HasActions: true}},
		{"soft_s", RunConfig{Priority: 20, HasPriority: true, ContinueOn: []Verdict{Drop, Pass}, HasActions: true}},
	}
	for _, tt := range tests {
		m, err := LoadMember(tt.program, f.obj, tt.program)
		if err != nil {
			t.Fatal(err)
		}
		got := m.RunConfig
		if got.Priority != tt.want.Priority || got.HasPriority != tt.want.HasPriority ||
			got.HasActions != tt.want.HasActions || !sameVerdicts(got.ContinueOn, tt.want.ContinueOn) {
			t.Errorf("%s: run config %+v, want %+v", tt.program, got, tt.want)
		}
	}

	// The run configurations order the chain: early (10) and soft (20,
	// continues on drop) before xlb (50), late (90) after it.
	var entries []ChainEntry
	for _, p := range []string{"late_l", "soft_s", "early_e"} {
		m := f.member(p, p)
		entries = append(entries, ChainEntry{Member: m, Priority: m.RunConfig.Priority, ContinueOn: m.RunConfig.ContinueOn})
	}
	entries = append(entries, ChainEntry{Priority: DefaultPriority})
	SortChain(entries)
	v, out := chainRun(t, f.build(entries...), chainPacket())
	if v != Pass || chainTrace(out) != "esl" {
		t.Errorf("verdict %s trace %q, want pass \"esl\"", v, chainTrace(out))
	}
}

func sameVerdicts(a, b []Verdict) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[Verdict]bool{}
	for _, v := range a {
		seen[v] = true
	}
	for _, v := range b {
		if !seen[v] {
			return false
		}
	}
	return true
}

// TestChainGlobalsAndMaps runs a member with .rodata, .data and .bss
// globals and one with its own map, and checks the maps are pinned where
// the protocol says and removed with the member.
func TestChainGlobalsAndMaps(t *testing.T) {
	f := newChainFixture(t)
	pin, err := os.MkdirTemp("/sys/fs/bpf", "xlb-chain-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pin) })
	f.pin = pin
	g := f.member("g", "globals")
	k := f.member("k", "counter")
	prog := f.build(ChainEntry{Member: g, Priority: 10}, ChainEntry{Member: k, Priority: 20}, ChainEntry{Priority: 50})
	for i := range 3 {
		v, out := chainRun(t, prog, chainPacket())
		if v != Pass || chainTrace(out) != "gk" {
			t.Fatalf("run %d: verdict %s trace %q, want pass \"gk\"", i, v, chainTrace(out))
		}
	}
	// runs is g's global_runs, in .bss.
	runs := func() uint64 {
		t.Helper()
		var n uint64
		if err := g.Maps()[".bss"].Lookup(uint32(0), &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := runs(); n != 3 {
		t.Errorf(".bss global_runs = %d, want 3", n)
	}
	// The step lives in .data: the owner may change it through the pin.
	data, err := ebpf.LoadPinnedMap(filepath.Join(f.pin, "g", "_data"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	if err := data.Put(uint32(0), uint64(10)); err != nil {
		t.Fatal(err)
	}
	chainRun(t, prog, chainPacket())
	if n := runs(); n != 13 {
		t.Errorf("global_runs = %d after a step of 10, want 13", n)
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(f.pin, "k", "counter_map"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	var count uint64
	if err := pinned.Lookup(uint32(0), &count); err != nil {
		t.Fatal(err)
	}
	if count != 4 {
		t.Errorf("pinned counter_map = %d, want 4", count)
	}
	if got, want := k.MapNames(), []string{"counter_map"}; strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("map names %v, want %v", got, want)
	}
	if err := k.Unpin(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(f.pin, "k")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory of an unpinned member: %v, want it gone", err)
	}
}

// TestChainMemberWithoutFuncInfo chains a member without .BTF.ext (no
// func or line info) around xlb, whose tail calls need func info.
func TestChainMemberWithoutFuncInfo(t *testing.T) {
	f := newChainFixture(t)
	obj := filepath.Join(t.TempDir(), "noext.o")
	if b, err := exec.Command("llvm-objcopy", "--remove-section=.BTF.ext", f.obj, obj).CombinedOutput(); err != nil {
		t.Fatalf("strip .BTF.ext: %v: %s", err, b)
	}
	m, err := LoadMember("a", obj, "pass_a")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.CreateMaps(); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	b := f.member("b", "pass_b")
	prog := f.build(ChainEntry{Member: m, Priority: 10}, ChainEntry{Priority: 50}, ChainEntry{Member: b, Priority: 60})
	for _, tc := range []struct {
		in    []byte
		v     Verdict
		trace string
	}{{chainPacket(), Pass, "ab"}, {chainMalformed(), Drop, "a"}} {
		if v, out := chainRun(t, prog, tc.in); v != tc.v || chainTrace(out) != tc.trace {
			t.Errorf("verdict %s trace %q, want %s %q", v, chainTrace(out), tc.v, tc.trace)
		}
	}
}

func TestChainRefusesBadMembers(t *testing.T) {
	f := newChainFixture(t)
	if _, err := LoadMember("m", f.obj, "missing"); !errors.Is(err, ErrBadMember) {
		t.Errorf("missing program: %v, want ErrBadMember", err)
	}
	if _, err := LoadMember("m", f.obj, "not_xdp"); !errors.Is(err, ErrBadMember) {
		t.Errorf("tc program: %v, want ErrBadMember", err)
	}
	if _, err := LoadMember("m", f.obj, ""); !errors.Is(err, ErrBadMember) {
		t.Errorf("no program named in an object with many: %v, want ErrBadMember", err)
	}
	if _, err := LoadMember("m", filepath.Join(t.TempDir(), "none.o"), "x"); err == nil {
		t.Error("missing object accepted")
	}
	u := f.member("u", "unchecked")
	_, err := f.p.BuildChain([]ChainEntry{{Member: u, Priority: 10}, {Priority: 50}})
	var verr *ebpf.VerifierError
	if err == nil || !strings.Contains(err.Error(), "load chain u,xlb") {
		t.Errorf("unchecked member: %v, want a load error naming the chain", err)
	} else if errors.As(err, &verr) {
		t.Log(err)
	}
}
