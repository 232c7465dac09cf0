package dispatcher

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/internal/xdp"
)

// This file builds the chain dispatcher: one XDP program that calls every
// chain member as a BPF-to-BPF function, in priority order, and decides
// from each verdict whether the next member runs. docs/chain-protocol.md
// is the protocol a member program can rely on.

// ChainProtocolVersion is the version of docs/chain-protocol.md this
// builder implements.
const ChainProtocolVersion = 1

// Verdict is an XDP action (internal/xdp names them).
type Verdict = xdp.Verdict

// The XDP actions.
const (
	Aborted  = xdp.Aborted
	Drop     = xdp.Drop
	Pass     = xdp.Pass
	TX       = xdp.TX
	Redirect = xdp.Redirect
)

// ParseVerdict parses a verdict name: aborted, drop, pass, tx or redirect,
// with or without libxdp's XDP_ prefix, in any case.
func ParseVerdict(s string) (Verdict, error) { return xdp.Parse(s) }

// Chain defaults, as libxdp's (XDP_DEFAULT_RUN_PRIO and
// XDP_DEFAULT_CHAIN_CALL_ACTIONS).
const (
	DefaultPriority = 50
	PipelineName    = "xlb" // the chain name of xlb's own pipeline
)

// DefaultContinueOn is the continue-on set of a member that declares none.
var DefaultContinueOn = []Verdict{Pass}

// Errors of the chain builder.
var (
	ErrBadVerdict = xdp.ErrBadVerdict
	ErrBadMember  = errors.New("bad chain member")
)

// RunConfig is libxdp's XDP_RUN_CONFIG of a program, as declared in its
// object's .xdp_run_config section.
type RunConfig struct {
	Priority    int       // valid when HasPriority
	ContinueOn  []Verdict // valid when HasActions
	HasPriority bool
	HasActions  bool
}

// Member is a chain member loaded from an ELF object: its program's
// instructions (subprograms included) and the maps they use. Its maps are
// created by CreateMaps or AdoptMaps, pinned by Pin, unpinned by Unpin and
// released by Close.
type Member struct {
	Name      string
	Object    string
	Program   string
	Spec      *ebpf.ProgramSpec
	RunConfig RunConfig

	mapSpecs map[string]*ebpf.MapSpec // the maps the program references
	maps     map[string]*ebpf.Map
	pins     []string
	pinDir   string
}

// LoadMember reads program from the ELF object file object. An empty
// program means the object's only XDP program. It checks that the program
// is XDP and reads its XDP_RUN_CONFIG; it creates nothing in the kernel.
func LoadMember(name, object, program string) (*Member, error) {
	coll, err := ebpf.LoadCollectionSpec(object)
	if err != nil {
		return nil, fmt.Errorf("read chain member %s: %w", name, err)
	}
	if program == "" {
		var xdp []string
		for n, p := range coll.Programs {
			if p.Type == ebpf.XDP {
				xdp = append(xdp, n)
			}
		}
		if len(xdp) != 1 {
			slices.Sort(xdp)
			return nil, fmt.Errorf("chain member %s: %s holds %d xdp programs %v, name one: %w", name, object, len(xdp), xdp, ErrBadMember)
		}
		program = xdp[0]
	}
	ps, ok := coll.Programs[program]
	if !ok {
		return nil, fmt.Errorf("chain member %s: no program %q in %s: %w", name, program, object, ErrBadMember)
	}
	if ps.Type != ebpf.XDP {
		return nil, fmt.Errorf("chain member %s: program %s is %s, not xdp: %w", name, program, ps.Type, ErrBadMember)
	}
	if ps.Flags&xdpFrags != 0 {
		return nil, fmt.Errorf("chain member %s: program %s is xdp.frags; xlb's chain is not: %w", name, program, ErrBadMember)
	}
	m := &Member{Name: name, Object: object, Program: program, Spec: ps.Copy(), mapSpecs: map[string]*ebpf.MapSpec{}}
	for _, ins := range ps.Instructions {
		if !ins.IsLoadFromMap() || ins.Reference() == "" {
			continue
		}
		ref := ins.Reference()
		ms, ok := coll.Maps[ref]
		if !ok {
			return nil, fmt.Errorf("chain member %s: map %s: %w", name, ref, asm.ErrUnsatisfiedMapReference)
		}
		m.mapSpecs[ref] = ms.Copy()
	}
	if coll.Types != nil {
		m.RunConfig, err = readRunConfig(coll.Types, program)
		if err != nil {
			return nil, fmt.Errorf("chain member %s: %w", name, err)
		}
	}
	return m, nil
}

// xdpFrags is BPF_F_XDP_HAS_FRAGS.
const xdpFrags = 1 << 5

// readRunConfig reads libxdp's run configuration of program: a variable
// _<program> in the .xdp_run_config datasec, a struct whose members
// priority and XDP_<VERDICT> are __uint(name, value), pointers to arrays
// whose length is the value.
func readRunConfig(types *btf.Spec, program string) (RunConfig, error) {
	var rc RunConfig
	var ds *btf.Datasec
	if err := types.TypeByName(".xdp_run_config", &ds); err != nil {
		return rc, nil // no run configuration
	}
	for _, vs := range ds.Vars {
		v, ok := vs.Type.(*btf.Var)
		if !ok || v.Name != "_"+program {
			continue
		}
		st, ok := btf.UnderlyingType(v.Type).(*btf.Struct)
		if !ok {
			return rc, fmt.Errorf("xdp_run_config %s: %s, not a struct", v.Name, v.Type)
		}
		for _, mb := range st.Members {
			val, ok := uintMember(mb.Type)
			if !ok {
				return rc, fmt.Errorf("xdp_run_config %s: member %s is not __uint(name, value)", v.Name, mb.Name)
			}
			if mb.Name == "priority" {
				rc.Priority, rc.HasPriority = int(val), true
				continue
			}
			verdict, err := ParseVerdict(mb.Name)
			if err != nil {
				return rc, fmt.Errorf("xdp_run_config %s: %w", v.Name, err)
			}
			rc.HasActions = true
			if val != 0 {
				rc.ContinueOn = append(rc.ContinueOn, verdict)
			}
		}
	}
	return rc, nil
}

// uintMember decodes __uint(name, val): int (*name)[val].
func uintMember(t btf.Type) (uint32, bool) {
	ptr, ok := btf.UnderlyingType(t).(*btf.Pointer)
	if !ok {
		return 0, false
	}
	arr, ok := btf.UnderlyingType(ptr.Target).(*btf.Array)
	if !ok {
		return 0, false
	}
	return arr.Nelems, true
}

// CreateMaps creates the member's maps, unpinned (Pin pins them).
func (m *Member) CreateMaps() (err error) {
	if m.maps != nil {
		return fmt.Errorf("chain member %s: maps already created", m.Name)
	}
	m.maps = map[string]*ebpf.Map{}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	for _, name := range slices.Sorted(mapKeys(m.mapSpecs)) {
		spec := m.mapSpecs[name].Copy()
		spec.Pinning = ebpf.PinNone // the member's owner pins, in the member's own directory
		mp, err := ebpf.NewMap(spec)
		if err != nil {
			return fmt.Errorf("create map %s of chain member %s: %w", name, m.Name, err)
		}
		m.maps[name] = mp
	}
	return nil
}

// AdoptMaps creates the member's maps, unpinned, as CreateMaps does,
// except that a map an earlier run pinned under pinDir (as PinName) and
// that is compatible with the object's (type, key and value size, entries,
// flags) is taken instead, so the member's state survives a restart of
// xlbd. Read-only maps (.rodata) are always created from the object. It
// returns the names of the maps it took.
func (m *Member) AdoptMaps(pinDir string) (_ []string, err error) {
	if m.maps != nil {
		return nil, fmt.Errorf("chain member %s: maps already created", m.Name)
	}
	m.maps = map[string]*ebpf.Map{}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	var took []string
	for _, name := range slices.Sorted(mapKeys(m.mapSpecs)) {
		spec := m.mapSpecs[name].Copy()
		spec.Pinning = ebpf.PinNone
		if spec.Flags&unix.BPF_F_RDONLY_PROG == 0 && !strings.HasPrefix(name, ".rodata") && !strings.HasPrefix(name, ".kconfig") {
			old, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, PinName(name)), nil)
			if err == nil && spec.Compatible(old) == nil {
				m.maps[name] = old
				took = append(took, name)
				continue
			}
			if err == nil {
				old.Close()
			}
		}
		mp, err := ebpf.NewMap(spec)
		if err != nil {
			return nil, fmt.Errorf("create map %s of chain member %s: %w", name, m.Name, err)
		}
		m.maps[name] = mp
	}
	return took, nil
}

// PinName is the file name a member's map is pinned as: its name with
// dots turned into underscores (bpffs refuses dots), so .bss is _bss.
func PinName(mapName string) string { return strings.ReplaceAll(mapName, ".", "_") }

// Maps returns the member's maps by name, once created.
func (m *Member) Maps() map[string]*ebpf.Map { return m.maps }

// MapNames returns the names of the maps the member's program uses.
func (m *Member) MapNames() []string { return slices.Sorted(mapKeys(m.mapSpecs)) }

// PinDir is the directory the member's maps are pinned in, or "".
func (m *Member) PinDir() string { return m.pinDir }

// Pin pins each of the member's maps in dir as PinName, so the member's
// owner can reach them. A pin an earlier run left there is replaced, unless
// it is the member's map already (taken by AdoptMaps). If it fails it
// removes the pins it made.
func (m *Member) Pin(dir string) (err error) {
	m.pinDir = dir
	defer func() {
		if err != nil {
			m.Unpin()
		}
	}()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create pin directory of chain member %s: %w", m.Name, err)
	}
	for _, name := range m.MapNames() {
		path := filepath.Join(dir, PinName(name))
		if samePinned(path, m.maps[name]) {
			m.pins = append(m.pins, path) // adopted: pinned there already
			continue
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale pin %s: %w", path, err)
		}
		if err := m.maps[name].Pin(path); err != nil {
			return fmt.Errorf("pin map %s of chain member %s: %w", name, m.Name, err)
		}
		m.pins = append(m.pins, path)
	}
	return nil
}

// samePinned tells whether the map pinned at path is mp.
func samePinned(path string, mp *ebpf.Map) bool {
	old, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return false
	}
	defer old.Close()
	a, errA := old.Info()
	b, errB := mp.Info()
	if errA != nil || errB != nil {
		return false
	}
	idA, okA := a.ID()
	idB, okB := b.ID()
	return okA && okB && idA == idB
}

// Unpin removes the member's pins, and its pin directory if that is then
// empty.
func (m *Member) Unpin() error {
	var errs []error
	for _, p := range m.pins {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove pin %s: %w", p, err))
		}
	}
	m.pins = nil
	if m.pinDir != "" {
		_ = os.Remove(m.pinDir) // only if empty
	}
	return errors.Join(errs...)
}

// Close releases the member's maps. Their pins stay: Unpin removes them.
func (m *Member) Close() error {
	for _, mp := range m.maps {
		mp.Close()
	}
	m.maps = nil
	return nil
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// ChainEntry is a member in a chain: Member nil stands for xlb's own
// pipeline (xlb_dispatch). ContinueOn nil means DefaultContinueOn.
type ChainEntry struct {
	Member     *Member
	Priority   int
	ContinueOn []Verdict
}

// Name is the entry's chain name.
func (e ChainEntry) Name() string {
	if e.Member == nil {
		return PipelineName
	}
	return e.Member.Name
}

// SortChain orders entries as the chain runs them: by priority, lower
// first, ties broken by name.
func SortChain(entries []ChainEntry) {
	slices.SortStableFunc(entries, func(a, b ChainEntry) int {
		return cmp.Or(cmp.Compare(a.Priority, b.Priority), cmp.Compare(a.Name(), b.Name()))
	})
}

// Chain symbols of the combined program.
const chainMain = "xlb_chain"

// BuildChain builds the chain dispatcher for entries (sorted with
// SortChain first) and loads it: one XDP program whose main function
// calls each member as a subprogram and continues while the member's
// verdict is in its continue-on set. Members must have created their maps.
// A chain that is only xlb's pipeline gives a duplicate of Entry(). The
// caller owns the returned program.
//
// It needs Linux 5.10 or later on x86-64 (tail calls from subprograms).
func (p *Pipeline) BuildChain(entries []ChainEntry) (*ebpf.Program, error) {
	if len(entries) == 0 {
		return nil, fmt.Errorf("build chain: no members: %w", ErrBadMember)
	}
	if len(entries) == 1 && entries[0].Member == nil {
		prog, err := p.Entry().Clone()
		if err != nil {
			return nil, fmt.Errorf("build chain: %w", err)
		}
		return prog, nil
	}
	spec, err := p.chainSpec(entries)
	if err != nil {
		return nil, fmt.Errorf("build chain: %w", err)
	}
	prog, err := ebpf.NewProgramWithOptions(spec, ebpf.ProgramOptions{LogSizeStart: 1 << 20})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load chain %s: %+v", chainNames(entries), verr)
		}
		return nil, fmt.Errorf("load chain %s: %w", chainNames(entries), err)
	}
	return prog, nil
}

func chainNames(entries []ChainEntry) string {
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return strings.Join(names, ",")
}

// chainSpec assembles the combined program.
func (p *Pipeline) chainSpec(entries []ChainEntry) (*ebpf.ProgramSpec, error) {
	xlbSpec, err := loadXlb()
	if err != nil {
		return nil, fmt.Errorf("load pipeline spec: %w", err)
	}
	dispatch := xlbSpec.Programs["xlb_dispatch"]
	pipeMaps := p.mapsByName()

	// A member whose continue-on set is empty ends the chain: later
	// members could never run and the verifier refuses unreachable code.
	for i, e := range entries {
		if e.ContinueOn != nil && len(e.ContinueOn) == 0 {
			entries = entries[:i+1]
			break
		}
	}

	type fn struct {
		insns asm.Instructions
		maps  map[string]*ebpf.Map
	}
	fns := make([]fn, len(entries))
	license := dispatch.License
	for i, e := range entries {
		switch {
		case e.Member == nil:
			fns[i] = fn{dispatch.Instructions, pipeMaps}
		case e.Member.maps == nil:
			return nil, fmt.Errorf("member %s: maps not created: %w", e.Member.Name, ErrBadMember)
		default:
			fns[i] = fn{e.Member.Spec.Instructions, e.Member.maps}
			if !gplCompatible(e.Member.Spec.License) {
				license = e.Member.Spec.License
			}
		}
	}

	main := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1).WithSymbol(chainMain)}
	for i, e := range entries {
		call := asm.Instructions{
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.Call.Label(memberSymbol(i, "")),
		}
		if i > 0 {
			call[0] = call[0].WithSymbol(fmt.Sprintf("chain_next_%d", i))
		}
		main = append(main, call...)
		if i == len(entries)-1 {
			break
		}
		cont := e.ContinueOn
		if cont == nil {
			cont = DefaultContinueOn
		}
		for _, v := range slices.Compact(slices.Sorted(slices.Values(cont))) {
			main = append(main, asm.JEq.Imm(asm.R0, int32(v), fmt.Sprintf("chain_next_%d", i+1)))
		}
		main = append(main, asm.Return())
	}
	main = append(main, asm.Return())
	// The kernel refuses tail calls in subprograms without BTF func
	// info, and func info must cover every function or none: main gets
	// xlb_dispatch's prototype, int (struct xdp_md *), and a line (line
	// info, when any member has it, must start at instruction 0).
	proto, ok := btf.FuncMetadata(&dispatch.Instructions[0]).Type.(*btf.FuncProto)
	if !ok {
		return nil, fmt.Errorf("xlb_dispatch has no BTF prototype")
	}
	main[0] = btf.WithFuncMetadata(main[0], &btf.Func{Name: chainMain, Type: proto, Linkage: btf.GlobalFunc})
	main[0] = main[0].WithSource(asm.Comment("xlb chain dispatcher, protocol v1"))

	insns := main
	for i, f := range fns {
		renamed, err := renameMember(i, f.insns, f.maps, proto.Return)
		if err != nil {
			return nil, fmt.Errorf("member %s: %w", entries[i].Name(), err)
		}
		insns = append(insns, renamed...)
	}
	return &ebpf.ProgramSpec{
		Name:         chainMain,
		Type:         ebpf.XDP,
		AttachType:   dispatch.AttachType, // the prog array's owner rules
		Flags:        dispatch.Flags,
		License:      license,
		Instructions: insns,
	}, nil
}

// memberSymbol is the symbol of member i's function sym ("" for its
// entry).
func memberSymbol(i int, sym string) string {
	if sym == "" {
		return fmt.Sprintf("chain_m%d", i)
	}
	return fmt.Sprintf("chain_m%d_%s", i, sym)
}

// renameMember copies a member's instructions as function i of the chain:
// its symbols and calls get a per-member prefix, its map loads point at
// maps, its entry function becomes static so the verifier checks it in
// the caller's context, and a function without BTF func info gets a
// generic one, int (void) (the verifier does not hold a static function
// to its prototype), and a line.
func renameMember(i int, in asm.Instructions, maps map[string]*ebpf.Map, intType btf.Type) (asm.Instructions, error) {
	out := slices.Clone(in)
	entry := in[0].Symbol()
	name := func(sym string) string {
		if sym == entry {
			return memberSymbol(i, "")
		}
		return memberSymbol(i, sym)
	}
	for j := range out {
		ins := &out[j]
		if sym := ins.Symbol(); sym != "" {
			*ins = ins.WithSymbol(name(sym))
			fn := btf.FuncMetadata(ins)
			switch {
			case fn == nil:
				fn = &btf.Func{Name: name(sym), Type: &btf.FuncProto{Return: intType}, Linkage: btf.StaticFunc}
			case sym == entry:
				static := *fn
				static.Linkage = btf.StaticFunc
				fn = &static
			}
			*ins = btf.WithFuncMetadata(*ins, fn)
			if ins.Source() == nil {
				// Line info, once given, must start every function.
				*ins = ins.WithSource(asm.Comment(name(sym)))
			}
		}
		switch {
		case ins.IsFunctionReference() && ins.Reference() != "":
			*ins = ins.WithReference(name(ins.Reference()))
		case ins.IsLoadFromMap() && ins.Reference() != "":
			mp, ok := maps[ins.Reference()]
			if !ok {
				return nil, fmt.Errorf("map %s: %w", ins.Reference(), asm.ErrUnsatisfiedMapReference)
			}
			if err := ins.AssociateMap(mp); err != nil {
				return nil, fmt.Errorf("map %s: %w", ins.Reference(), err)
			}
		}
	}
	return out, nil
}

func gplCompatible(l string) bool {
	switch l {
	case "GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL":
		return true
	}
	return false
}

// mapsByName returns the pipeline's maps by their names in xlb.c.
func (p *Pipeline) mapsByName() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	v := reflect.ValueOf(p.objs.xlbMaps)
	for i := range v.NumField() {
		if tag := v.Type().Field(i).Tag.Get("ebpf"); tag != "" {
			out[tag] = v.Field(i).Interface().(*ebpf.Map)
		}
	}
	return out
}
