package chain

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/packet"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// The test objects, compiled from testdata/members.c once per test binary.
var objs struct {
	once sync.Once
	dir  string
	err  error
}

// object returns the path of testdata/members.c compiled as flavour:
// "pass" (filter passes what it does not block), "drop" (filter drops
// everything), "mit" (license MIT) or "broken" (filter reads the packet
// without a bounds check).
func object(t *testing.T, flavour string) string {
	t.Helper()
	objs.once.Do(func() {
		objs.dir, objs.err = os.MkdirTemp("", "xlb-chain-objects-")
		if objs.err != nil {
			return
		}
		for name, defs := range map[string][]string{
			"pass":   nil,
			"drop":   {"-DVERDICT=XDP_DROP"},
			"mit":    {`-DLICENSE="MIT"`},
			"broken": {"-DBROKEN"},
		} {
			args := append([]string{"-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
				"-I/usr/include/x86_64-linux-gnu", "-c", "testdata/members.c", "-o", filepath.Join(objs.dir, name+".o")}, defs...)
			if out, err := exec.Command("clang", args...).CombinedOutput(); err != nil {
				objs.err = fmt.Errorf("compile %s: %v: %s", name, err, out)
				return
			}
		}
	})
	if objs.err != nil {
		t.Fatal(objs.err)
	}
	return filepath.Join(objs.dir, flavour+".o")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if objs.dir != "" {
		os.RemoveAll(objs.dir)
	}
	os.Exit(code)
}

// fixture is a loaded pipeline, a pin root on bpffs and a namespace whose
// loopback the chain can be attached to.
type fixture struct {
	t       *testing.T
	pipe    *dispatcher.Pipeline
	pinRoot string
	ns      *testnet.NS
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	testnet.RequirePrivileged(t)
	pipe, err := dispatcher.Load(dispatcher.Options{ConntrackSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pipe.Close() })
	dir, err := os.MkdirTemp("/sys/fs/bpf", "xlb-chain-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return &fixture{t: t, pipe: pipe, pinRoot: filepath.Join(dir, "chain"), ns: testnet.NewNS(t, "chain")}
}

// newChain builds a chain of specs and attaches it to the namespace's
// loopback in generic mode, so that changes are swapped in for real.
func (f *fixture) newChain(specs ...Spec) *Chain {
	f.t.Helper()
	c, err := New(Options{Pipeline: f.pipe, PinRoot: f.pinRoot, XLBPriority: 50}, specs)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		if err := c.Close(); err != nil {
			f.t.Errorf("close chain: %v", err)
		}
		if _, err := os.Stat(f.pinRoot); !errors.Is(err, os.ErrNotExist) {
			f.t.Errorf("pin root after Close: %v, want gone", err)
		}
	})
	var att *dispatcher.Attachment
	err = f.ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		att, err = dispatcher.Attach(c.Entry(), lo.Attrs().Index, dispatcher.Generic)
		return err
	})
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { att.Close() })
	c.Attached(att)
	return c
}

// attachedID is the id of the program attached to the namespace's lo.
func (f *fixture) attachedID() ebpf.ProgramID {
	f.t.Helper()
	return ebpf.ProgramID(f.ns.XDPProgram(f.t, "lo"))
}

// checkAttached fails unless c's Entry() is what runs on lo.
func (f *fixture) checkAttached(c *Chain) {
	f.t.Helper()
	info, err := c.Entry().Info()
	if err != nil {
		f.t.Fatal(err)
	}
	want, _ := info.ID()
	if got := f.attachedID(); got != want {
		f.t.Fatalf("program %d attached, want the chain's entry %d (%s)", got, want, info.Name)
	}
}

var (
	client  = netip.MustParseAddrPort("10.0.0.1:40000")
	blocked = netip.MustParseAddrPort("10.0.0.66:40000")
)

// run runs the chain on a SYN from src (xlb, with no service, passes it).
func run(t *testing.T, c *Chain, src netip.AddrPort) dispatcher.Verdict {
	t.Helper()
	pkt := packet.TCP(packet.TCPOpts{Src: src, Dst: netip.MustParseAddrPort("10.0.0.2:80"), Flags: "S"})
	v, err := c.Entry().Run(&ebpf.RunOptions{Data: pkt})
	if err != nil {
		t.Fatalf("test run: %v", err)
	}
	return dispatcher.Verdict(v)
}

// block puts a's source into the block list pinned for member name.
func (f *fixture) block(name string, a netip.AddrPort) {
	f.t.Helper()
	m := f.pinned(name, "blocked")
	defer m.Close()
	ip := a.Addr().As4()
	if err := m.Put(binary.NativeEndian.Uint32(ip[:]), uint32(1)); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) pinned(member, mapName string) *ebpf.Map {
	f.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(f.pinRoot, member, mapName), nil)
	if err != nil {
		f.t.Fatal(err)
	}
	return m
}

// order is the chain as "name@priority" in run order.
func order(c *Chain) string {
	var s []string
	for _, m := range c.List() {
		s = append(s, fmt.Sprintf("%s@%d", m.Name, m.Priority))
	}
	return strings.Join(s, " ")
}

func filterSpec(name, object string, prio int) Spec {
	return Spec{Name: name, Object: object, Program: "filter", Priority: prio}
}

func TestChainLifecycle(t *testing.T) {
	f := newFixture(t)
	obj := object(t, "pass")
	c := f.newChain(filterSpec("filter", obj, 10))
	f.checkAttached(c)
	if c.Entry() == f.pipe.Entry() {
		t.Fatal("a chain with a member runs xlb_dispatch alone")
	}
	if got, want := order(c), "filter@10 xlb@50"; got != want {
		t.Fatalf("chain %q, want %q", got, want)
	}
	info := c.List()[0]
	sum, err := fileSHA256(obj)
	if err != nil {
		t.Fatal(err)
	}
	if info.SHA256 != fmt.Sprintf("%x", sum) || info.PinDir != filepath.Join(f.pinRoot, "filter") ||
		!slices.Contains(info.Maps, "blocked") || !slices.Contains(info.Maps, "_bss") || info.Program != "filter" {
		t.Errorf("list entry of filter: %+v", info)
	}
	if v := run(t, c, blocked); v != dispatcher.Pass {
		t.Fatalf("verdict %s before blocking, want pass", v)
	}
	f.block("filter", blocked)
	if v := run(t, c, blocked); v != dispatcher.Drop {
		t.Fatalf("verdict %s for a blocked source, want drop", v)
	}
	if v := run(t, c, client); v != dispatcher.Pass {
		t.Fatalf("verdict %s for another source, want pass", v)
	}

	if err := c.Add(filterSpec("second", obj, 60)); err != nil {
		t.Fatal(err)
	}
	f.checkAttached(c)
	if got, want := order(c), "filter@10 xlb@50 second@60"; got != want {
		t.Fatalf("chain %q, want %q", got, want)
	}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"add twice", c.Add(filterSpec("second", obj, 70))},
		{"remove xlb", c.Remove("xlb")},
		{"remove a stranger", c.Remove("nobody")},
	} {
		if !errors.Is(tc.err, ErrMember) {
			t.Errorf("%s: %v, want %v", tc.name, tc.err, ErrMember)
		}
	}
	if err := c.Remove("second"); err != nil {
		t.Fatal(err)
	}
	f.checkAttached(c)
	if _, err := os.Stat(filepath.Join(f.pinRoot, "second")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pins of a removed member: %v, want gone", err)
	}
	if v := run(t, c, blocked); v != dispatcher.Drop {
		t.Fatalf("verdict %s for a blocked source after another member left, want drop", v)
	}
	if err := c.Remove("filter"); err != nil {
		t.Fatal(err)
	}
	if c.Entry() != f.pipe.Entry() {
		t.Error("the chain without members is not xlb_dispatch alone")
	}
	f.checkAttached(c)
}

func TestChainRefusesMembers(t *testing.T) {
	f := newFixture(t)
	obj := object(t, "pass")
	c := f.newChain(filterSpec("filter", obj, 10))
	f.block("filter", blocked)
	dir := t.TempDir()
	short := filepath.Join(dir, "short.o")
	empty := filepath.Join(dir, "empty.o")
	if err := os.WriteFile(short, []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	writable := filepath.Join(dir, "writable.o")
	b, err := os.ReadFile(obj)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(writable, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(writable, 0o666); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		spec Spec
		want []string
	}{
		{"empty continue-on", Spec{Name: "m", Object: obj, Program: "filter", Priority: -1, ContinueOn: []string{}},
			[]string{"empty continue-on set", "xlb", "never see a packet"}},
		{"run config with an empty continue-on", Spec{Name: "m", Object: obj, Program: "no_actions", Priority: -1},
			[]string{"XDP_RUN_CONFIG of no_actions", "empty continue-on set", "override"}},
		{"license not GPL-compatible", filterSpec("m", object(t, "mit"), 20),
			[]string{"not GPL-compatible", `"MIT"`}},
		{"run config priority above 1000", Spec{Name: "m", Object: obj, Program: "high_prio", Priority: -1},
			[]string{"XDP_RUN_CONFIG priority 2000", "0..1000"}},
		{"priority above 1000", filterSpec("m", obj, 1001), []string{"priority 1001 out of range"}},
		{"short file that is not ELF", filterSpec("m", short, 20), []string{short, "not an ELF object", `"hi\n"`}},
		{"empty file", filterSpec("m", empty, 20), []string{"not an ELF object"}},
		{"missing file", filterSpec("m", filepath.Join(dir, "none.o"), 20), []string{"no such file"}},
		{"object writable by others", filterSpec("m", writable, 20), []string{writable, "writable by others (mode 0666)"}},
		{"missing program", Spec{Name: "m", Object: obj, Program: "missing", Priority: -1}, []string{`no program "missing"`}},
		{"verifier refusal", Spec{Name: "m", Object: obj, Program: "unchecked", Priority: 20},
			[]string{"chain member m", "program unchecked", "refused by the verifier", "invalid access to packet"}},
		{"xlb's name", filterSpec("xlb", obj, 20), []string{"xlb's own pipeline"}},
		{"bad name", filterSpec("Bad_Name", obj, 20), []string{"not [a-z0-9-]{1,15}"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, entry, id := order(c), c.Entry(), f.attachedID()
			err := c.Add(tc.spec)
			if err == nil {
				t.Fatalf("accepted; chain %s", order(c))
			}
			t.Logf("refused: %v", err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q", w)
				}
			}
			if n := strings.Count(err.Error(), "\n"); n > verifierLines+2 {
				t.Errorf("error has %d lines, want a summary", n)
			}
			if order(c) != before || c.Entry() != entry || f.attachedID() != id {
				t.Errorf("chain changed by a refused member: %s, was %s", order(c), before)
			}
			if _, err := os.Stat(filepath.Join(f.pinRoot, "m")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pins of a refused member: %v", err)
			}
			if v := run(t, c, blocked); v != dispatcher.Drop {
				t.Errorf("blocked source: %s after a refused member, want drop", v)
			}
		})
	}
	t.Run("overrides make both run-config members acceptable", func(t *testing.T) {
		if err := c.Add(Spec{Name: "hp", Object: obj, Program: "high_prio", Priority: 70}); err != nil {
			t.Fatal(err)
		}
		if err := c.Add(Spec{Name: "na", Object: obj, Program: "no_actions", Priority: -1, ContinueOn: []string{"pass"}}); err != nil {
			t.Fatal(err)
		}
		if got, want := order(c), "filter@10 na@10 xlb@50 hp@70"; got != want {
			t.Fatalf("chain %q, want %q", got, want)
		}
		f.checkAttached(c)
	})
}

func TestChainPriorityChangeKeepsMaps(t *testing.T) {
	f := newFixture(t)
	obj := object(t, "pass")
	c := f.newChain(filterSpec("filter", obj, 10))
	f.block("filter", blocked)
	runs := func() uint64 {
		m := f.pinned("filter", "_bss")
		defer m.Close()
		var n uint64
		if err := m.Lookup(uint32(0), &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	mapID := func() ebpf.MapID { return xlbtest.PinnedMapID(t, filepath.Join(f.pinRoot, "filter", "blocked")) }
	run(t, c, client)
	id, before := mapID(), runs()
	for _, step := range []Spec{
		filterSpec("filter", obj, 60),
		{Name: "filter", Object: obj, Program: "filter", Priority: 60, ContinueOn: []string{"pass", "drop"}},
		{Name: "filter", Object: obj, Program: "filter", Priority: -1},
	} {
		p, err := c.Prepare([]Spec{step}, 50)
		if err != nil {
			t.Fatal(err)
		}
		if !p.Changed() {
			t.Fatalf("%+v: no change prepared", step)
		}
		t.Logf("prepared: %v", p.Summary)
		if err := p.Commit(); err != nil {
			t.Fatal(err)
		}
		f.checkAttached(c)
		if got := mapID(); got != id {
			t.Errorf("%+v: block list is map %d, was %d: recreated", step, got, id)
		}
		if v := run(t, c, blocked); v != dispatcher.Drop {
			t.Errorf("%+v: blocked source %s, want drop: the block list lost its entry", step, v)
		}
		if n := runs(); n < before {
			t.Errorf("%+v: run counter %d, was %d", step, n, before)
		}
	}
	if got, want := order(c), "filter@50 xlb@50"; got != want {
		t.Errorf("chain %q, want %q (default priority 50, tie broken by name)", got, want)
	}
}

func TestChainRebuiltObject(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	obj := filepath.Join(dir, "filter.o")
	install := func(flavour string) {
		t.Helper()
		b, err := os.ReadFile(object(t, flavour))
		if err != nil {
			t.Fatal(err)
		}
		// Replace the file as a build would: a new file renamed over it.
		tmp := obj + ".tmp"
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, obj); err != nil {
			t.Fatal(err)
		}
	}
	install("pass")
	specs := []Spec{filterSpec("filter", obj, 10)}
	c := f.newChain(specs...)
	if v := run(t, c, client); v != dispatcher.Pass {
		t.Fatalf("verdict %s, want pass", v)
	}
	p, err := c.Prepare(specs, 50)
	if err != nil {
		t.Fatal(err)
	}
	if p.Changed() {
		t.Errorf("an unchanged object prepares a change: %v", p.Summary)
	}
	p.Abort()

	install("drop")
	p, err = c.Prepare(specs, 50)
	if err != nil {
		t.Fatal(err)
	}
	if !p.Changed() || !strings.Contains(strings.Join(p.Summary, ";"), "filter replaced") {
		t.Fatalf("an object rebuilt at the same path: changed %v, %v", p.Changed(), p.Summary)
	}
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	f.checkAttached(c)
	if v := run(t, c, client); v != dispatcher.Drop {
		t.Fatalf("verdict %s after the rebuilt object (drops everything) was reloaded, want drop", v)
	}
	sum, _ := fileSHA256(obj)
	if got := c.List()[0].SHA256; got != fmt.Sprintf("%x", sum) {
		t.Errorf("listed sha256 %s, want the new object's %x", got, sum)
	}
	m := f.pinned("filter", "blocked") // pinned again for the new member
	m.Close()
}

func TestChainChangeFailsCleanly(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	obj := filepath.Join(dir, "filter.o")
	copyFile := func(from string) {
		t.Helper()
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(obj, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(object(t, "pass"))
	specs := []Spec{filterSpec("filter", obj, 10)}
	c := f.newChain(specs...)
	f.block("filter", blocked)
	state := func() string {
		id := f.attachedID()
		return fmt.Sprintf("%s prog=%d", order(c), id)
	}
	before := state()
	check := func(what string) {
		t.Helper()
		if got := state(); got != before {
			t.Errorf("%s: chain %s, was %s", what, got, before)
		}
		if v := run(t, c, blocked); v != dispatcher.Drop {
			t.Errorf("%s: blocked source %s, want drop", what, v)
		}
		m := f.pinned("filter", "blocked")
		defer m.Close()
		var one uint32
		ip := blocked.Addr().As4()
		if err := m.Lookup(binary.NativeEndian.Uint32(ip[:]), &one); err != nil {
			t.Errorf("%s: block list entry: %v", what, err)
		}
	}
	for _, tc := range []struct{ name, from string }{
		{"object replaced by a file that is not ELF", ""},
		{"object replaced by one the verifier refuses", object(t, "broken")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.from == "" {
				if err := os.WriteFile(obj, []byte("oops"), 0o644); err != nil {
					t.Fatal(err)
				}
			} else {
				copyFile(tc.from)
			}
			// With a new member besides, so the change is more than one step.
			p, err := c.Prepare(append(specs, filterSpec("other", object(t, "pass"), 20)), 40)
			if err == nil {
				p.Abort()
				t.Fatal("prepared a chain with a broken member")
			}
			t.Logf("refused: %v", err)
			check(tc.name)
			if _, err := os.Stat(filepath.Join(f.pinRoot, "other")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pins of the member a failed change would add: %v", err)
			}
		})
	}
	copyFile(object(t, "pass"))
	t.Run("aborted", func(t *testing.T) {
		p, err := c.Prepare([]Spec{filterSpec("other", object(t, "pass"), 20)}, 40)
		if err != nil {
			t.Fatal(err)
		}
		p.Abort()
		check("aborted")
	})
	t.Run("changed meanwhile", func(t *testing.T) {
		p, err := c.Prepare(append(specs, filterSpec("other", object(t, "pass"), 20)), 50)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Add(filterSpec("third", object(t, "pass"), 30)); err != nil {
			t.Fatal(err)
		}
		if err := p.Commit(); !errors.Is(err, ErrChangedMeanwhile) {
			t.Fatalf("commit after another change: %v, want %v", err, ErrChangedMeanwhile)
		}
		if got, want := order(c), "filter@10 third@30 xlb@50"; got != want {
			t.Errorf("chain %q, want %q", got, want)
		}
		if _, err := os.Stat(filepath.Join(f.pinRoot, "other")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pins of the member of a refused commit: %v", err)
		}
		f.checkAttached(c)
	})
}

func TestCheckPinPath(t *testing.T) {
	testnet.RequirePrivileged(t)
	if err := CheckPinPath("/sys/fs/bpf/xlb-no-such-dir/chain"); err != nil {
		t.Errorf("a path whose nearest directory is bpffs: %v", err)
	}
	for _, tc := range []struct {
		path string
		want []string
	}{
		{t.TempDir(), []string{"not on a bpffs", "mount -t bpf bpf /sys/fs/bpf"}},
		// What `ip netns exec` leaves: /sys is sysfs, with no bpffs on it.
		{"/sys/kernel/xlb/chain", []string{"not on a bpffs", "ip netns exec", "nsenter --net="}},
	} {
		err := CheckPinPath(tc.path)
		if !errors.Is(err, ErrNotBPFFS) {
			t.Errorf("%s: %v, want %v", tc.path, err, ErrNotBPFFS)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %v lacks %q", tc.path, err, w)
			}
		}
	}
}

func TestVerifierSummary(t *testing.T) {
	var lines []string
	for i := range 40 {
		lines = append(lines, fmt.Sprintf("%d: (b7) r0 = 2", i))
	}
	err := errors.New("build chain: load chain xlb,m: load program: permission denied:\n\t" + strings.Join(lines, "\n\t"))
	c := &Chain{log: slog.New(slog.DiscardHandler)}
	got := c.explain(err, nil).Error()
	if !strings.HasPrefix(got, "build chain: load chain xlb,m: load program: permission denied:") ||
		!strings.Contains(got, "(32 lines before these omitted") || !strings.HasSuffix(got, "39: (b7) r0 = 2") ||
		strings.Contains(got, "\n\t31: ") || strings.Count(got, "\n") != verifierLines+1 {
		t.Errorf("summary of a 41-line error:\n%s", got)
	}
	short := errors.New("build chain: one line")
	if got := c.explain(short, nil); got != short {
		t.Errorf("a short error was changed: %v", got)
	}
}
