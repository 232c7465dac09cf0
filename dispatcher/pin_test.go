package dispatcher

import (
	"errors"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
)

// TestLayout checks what the layout describes: the maps whose contents
// outlive a restart, with their key and value types member by member, and
// not the maps every load makes afresh; and that Diff names what changed.
func TestLayout(t *testing.T) {
	l, err := BuildLayout()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"xlb_conns", "xlb_ports", "xlb_settings", "xlb_backends", "xlb_services", "xlb_sel", ownerMap,
		"xlb_conns6", "xlb_ports6", "xlb_ct6_busy", "xlb_port6_busy", "xlb_services6", "xlb_vip_ports6", "xlb_backends6", "xlb_src6", "xlb_src6_slots", "xlb_port6_cur"} {
		if _, ok := l[name]; !ok {
			t.Errorf("layout lacks %s", name)
		}
	}
	for _, name := range slices.Concat(freshMaps, optionalMaps) {
		if _, ok := l[name]; ok {
			t.Errorf("layout has %s, which is never adopted or adopted only when compatible", name)
		}
	}
	for name, want := range map[string]string{
		"xlb_conns":     "struct xlb_conn{seq u32 @0, flags u32 @4, last_seen_j u64 @8,",
		"xlb_backends":  "struct xlb_backend{addr u32 @0, port u16 @4, weight u16 @6} size 8",
		"xlb_sel":       "inner {Array key u32 value u32",
		"xlb_conns6":    "struct xlb_conn6{",
		"xlb_backends6": "struct xlb_backend6{",
	} {
		if !strings.Contains(l[name], want) {
			t.Errorf("layout of %s lacks %q:\n%s", name, want, l[name])
		}
	}
	for _, name := range sizedMaps {
		if strings.Contains(l[name], "entries") {
			t.Errorf("daemon-sized map %s has its size in its layout:\n%s", name, l[name])
		}
	}
	if !strings.Contains(l["xlb_backends"], "entries 4096") || !strings.Contains(l["xlb_backends6"], "entries 4096") {
		t.Errorf("a fixed map's size is not in its layout:\n%s\n%s", l["xlb_backends"], l["xlb_backends6"])
	}
	if d := l.Diff(l); len(d) != 0 {
		t.Errorf("a layout differs from itself: %v", d)
	}
	other := maps.Clone(l)
	other["xlb_backends"] = strings.Replace(l["xlb_backends"], "weight u16 @6} size 8", "weight u16 @6, spare u32 @8} size 12", 1)
	delete(other, "xlb_src")
	other["xlb_gone"] = "Array key u32 value u32 flags 0x0 entries 1"
	d := l.Diff(other)
	want := []string{
		"map xlb_backends: this build has struct xlb_backend{addr u32 @0, port u16 @4, weight u16 @6} size 8; pinned has struct xlb_backend{addr u32 @0, port u16 @4, weight u16 @6, spare u32 @8} size 12",
		"map xlb_src: not in the pinned state (new in this build)",
		"map xlb_gone: pinned, not in this build",
	}
	if !slices.Equal(d, want) {
		t.Errorf("diff:\n%s\nwant:\n%s", strings.Join(d, "\n"), strings.Join(want, "\n"))
	}
	if l.Version() == other.Version() || l.Version() != maps.Clone(l).Version() {
		t.Errorf("versions: %s, %s", l.Version(), other.Version())
	}
}

// pinDir makes a directory on the bpffs, removed at cleanup.
func pinDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/sys/fs/bpf", "xlbt-pin-")
	if err != nil {
		t.Fatalf("pin directory: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// TestPinnedAdoption loads a pipeline pinned in a directory, opens an IPv4
// and an IPv6 connection through it, lets it go, and loads another that
// adopts the pins: the new programs find both connections and forward
// them, the services of both families, tables and backend owners are read
// back, the table sizes and source addresses of both families, the
// secrets are the same, and one update of the pinned link swaps the new
// dispatcher in. A layout record of another build is refused.
func TestPinnedAdoption(t *testing.T) {
	dir := pinDir(t)
	opts := Options{ConntrackSize: 4096, PortLo: portLo, PortHi: portHi, PinPath: dir, Sources6: 1}
	e := newEnvOpts(t, opts)
	e.must(e.p.SetBackendOwner(idA, 1))
	e.must(e.p.SetBackendOwner(idB, 1))
	e.must(e.p.SetBackendOwner(id6A, 3))
	cl := netip.AddrPortFrom(client1, 40000)
	if v, _ := e.run(e.p.Entry(), fromClient(cl, vip, seg{flags: "S", seq: 1000})); v != xdpTX {
		t.Fatalf("syn: %s", verdictName(v))
	}
	c := e.mustConn(cl, vip)
	cl6 := netip.AddrPortFrom(client6, 40000)
	if v, _ := e.run(e.p.Entry(), fromClient(cl6, vip6, seg{flags: "S", seq: 7000})); v != xdpTX {
		t.Fatalf("ipv6 syn: %s", verdictName(v))
	}
	c6 := e.mustConn(cl6, vip6)
	var first *Attachment
	var err error
	e.ns.Do(func() { first, err = e.p.Attach(e.p.Entry(), int(e.lb0), Generic) })
	if err != nil {
		t.Fatal(err)
	}
	firstProg, err := first.ProgramID()
	if err != nil {
		t.Fatal(err)
	}
	keys := e.p.keys
	e.must(first.Release())
	e.must(e.p.Close())

	pinned, err := ReadPinned(dir)
	if err != nil {
		t.Fatal(err)
	}
	if pinned.Slots != 8192 || pinned.Slots6 != 8192 || pinned.PortLo != portLo || pinned.PortHi != portHi ||
		!slices.Equal(pinned.Sources, []netip.Addr{lbAddr}) || !slices.Equal(pinned.Sources6, []netip.Addr{lbAddr6}) ||
		!pinned.Link || pinned.LinkIfindex != int(e.lb0) {
		t.Errorf("pinned %+v", pinned)
	}
	opts.Adopt = true
	p2, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p2.Close() })
	if !p2.Adopted() || p2.keys != keys {
		t.Errorf("adopted %v, secrets %v, want %v", p2.Adopted(), p2.keys, keys)
	}
	e.p = p2
	e.must(p2.SetSettings(e.opts))
	if got := e.mustConn(cl, vip); got.Idle < c.Idle || func() bool { got.Idle = c.Idle; return got != c }() {
		t.Errorf("connection after adoption %+v, before %+v", got, c)
	}
	if got := e.mustConn(cl6, vip6); got.Idle < c6.Idle || func() bool { got.Idle = c6.Idle; return got != c6 }() {
		t.Errorf("IPv6 connection after adoption %+v, before %+v", got, c6)
	}
	ack := fromClient(cl, vip, seg{flags: "A", seq: 1001, ack: 1})
	e.expect(t, p2.Entry(), ack, xdpTX, toBackend(c, seg{flags: "A", seq: 1001, ack: 1}), map[string]uint64{"fwd": 1})
	ack6 := seg{flags: "A", seq: 7001, ack: 1}
	e.expect(t, p2.Entry(), fromClient(cl6, vip6, ack6), xdpTX, toBackend(c6, ack6), map[string]uint64{"fwd": 1})
	svcs, err := p2.ServiceEntries()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(svcs, func(a, b ServiceEntry) int { return int(a.ID) - int(b.ID) })
	if len(svcs) != 4 || svcs[0].VIP != vip || svcs[0].Mode != ModeRandom || !slices.Equal(svcs[0].Table, []uint32{idA, idB}) ||
		!slices.Equal(svcs[0].Sources, []int{0}) || svcs[1].VIP != vip2 || svcs[1].Table != nil ||
		svcs[2].VIP != vip6 || svcs[2].Proto != TCP || !slices.Equal(svcs[2].Table, []uint32{id6A, id6B}) || !slices.Equal(svcs[2].Sources, []int{0}) ||
		svcs[3].VIP != vip6udp || svcs[3].Proto != UDP || !slices.Equal(svcs[3].Table, []uint32{id6A}) {
		t.Errorf("services %+v", svcs)
	}
	bks, err := p2.BackendEntries()
	if err != nil {
		t.Fatal(err)
	}
	if len(bks) != 3 || bks[0] != (BackendEntry{ID: idA, Address: backendA, Weight: 1, Service: 1}) || bks[1].ID != idB ||
		bks[2] != (BackendEntry{ID: id6A, Address: backend6A, Weight: 1, Service: 3}) {
		t.Errorf("backends %+v", bks)
	}
	e.must(p2.FreeBackend(idB))
	if bks, _ := p2.BackendEntries(); len(bks) != 2 {
		t.Errorf("after freeing %d: %+v", idB, bks)
	}

	var second *Attachment
	e.ns.Do(func() { second, err = p2.Attach(p2.Entry(), int(e.lb0), Generic) })
	if err != nil {
		t.Fatal(err)
	}
	secondProg, err := second.ProgramID()
	if err != nil {
		t.Fatal(err)
	}
	if secondProg == firstProg {
		t.Errorf("the pinned link still runs program %d", firstProg)
	}
	if _, err := os.Stat(filepath.Join(dir, progsNext)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left: %v", progsNext, err)
	}
	progs, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_progs"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var parse uint32
	err = progs.Lookup(uint32(StageParse), &parse)
	progs.Close()
	info, _ := p2.objs.XlbParse.Info()
	if id, _ := info.ID(); err != nil || parse != uint32(id) {
		t.Errorf("pinned program array's parse slot: %d (%v), want the new parse %d", parse, err, id)
	}

	// Another build's layout record.
	l, err := BuildLayout()
	if err != nil {
		t.Fatal(err)
	}
	l["xlb_conns"] += "\nstruct xlb_conn{changed}"
	e.must(writeLayout(dir, l))
	if _, err := ReadPinned(dir); !errors.Is(err, ErrLayout) || !strings.Contains(err.Error(), "map xlb_conns: pinned has struct xlb_conn{changed}") {
		t.Errorf("another layout: %v", err)
	}

	e.must(second.Close())
	if _, err := os.Stat(filepath.Join(dir, LinkPin)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("link pin after Close: %v", err)
	}
	e.must(p2.Unpin())
	if ents, _ := os.ReadDir(dir); len(ents) != 1 || ents[0].Name() != SecretsPin {
		t.Errorf("pins after Unpin: %v, want only %s", ents, SecretsPin)
	}
	if _, err := ReadPinned(dir); !errors.Is(err, ErrNoState) {
		t.Errorf("nothing pinned: %v", err)
	}
}

// TestSecretsOutliveStop: a pipeline loaded afresh on a pin path that a
// stopped one left (Unpin: a full stop) takes its ISN and cookie secrets,
// so a backend still in TIME_WAIT for the four-tuples the last one used
// gets ISNs after the old connections'; RemoveSecrets (xlbd cleanup) lets
// the next one draw new ones, and a pipeline without a pin path always
// draws its own.
func TestSecretsOutliveStop(t *testing.T) {
	dir := pinDir(t)
	opts := Options{ConntrackSize: 1024, PortLo: portLo, PortHi: portHi, PinPath: dir}
	load := func() [4]uint32 {
		t.Helper()
		p, err := Load(opts)
		if err != nil {
			t.Fatal(err)
		}
		keys := p.keys
		if err := p.Unpin(); err != nil {
			t.Fatal(err)
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		return keys
	}
	first := load()
	if first == ([4]uint32{}) {
		t.Fatal("secrets not drawn")
	}
	if pinned, err := ReadSecrets(dir); err != nil || pinned != first {
		t.Fatalf("pinned secrets %v (%v), want %v", pinned, err, first)
	}
	if again := load(); again != first {
		t.Errorf("a pipeline after a full stop drew %v, want the pinned %v", again, first)
	}
	if err := RemoveSecrets(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSecrets(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("secrets after RemoveSecrets: %v", err)
	}
	fresh := load()
	if fresh == first {
		t.Errorf("after RemoveSecrets the same secrets %v again", fresh)
	}
	if pinned, err := ReadSecrets(dir); err != nil || pinned != fresh {
		t.Errorf("pinned secrets %v (%v), want the new %v", pinned, err, fresh)
	}
	opts.PinPath = ""
	if unpinned := load(); unpinned == fresh {
		t.Errorf("a pipeline without a pin path took the pinned secrets")
	}
}
