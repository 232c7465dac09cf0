// Package chain keeps the XDP programs that share xlb's interface (the
// chain members, docs/chain-protocol.md): it loads and checks members,
// creates and pins their maps, builds the chain dispatcher around xlb's
// pipeline with dispatcher.BuildChain, and swaps a new chain in with one
// bpf_link update. Every change is prepared completely (members loaded,
// maps created, the new chain verified by the kernel) before anything
// running changes; a change that fails leaves the running chain, its
// members and their pins exactly as they were.
package chain

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/fsperm"
)

// Errors of the chain.
var (
	ErrMember           = errors.New("chain member")
	ErrNotELF           = errors.New("not an ELF object")
	ErrNotGPL           = errors.New("license is not GPL-compatible")
	ErrNotBPFFS         = errors.New("not on a bpffs")
	ErrVerifier         = errors.New("refused by the verifier")
	ErrChangedMeanwhile = errors.New("chain changed meanwhile")
	ErrUnpinned         = errors.New("chain in force, but its pins could not all be updated")
)

// Spec is a member as requested by the configuration file or by
// `xlbctl chain add`.
type Spec struct {
	Name    string
	Object  string // path of the ELF object
	Program string // "" means the object's only XDP program
	// Priority -1 means the object's XDP_RUN_CONFIG priority, or
	// dispatcher.DefaultPriority.
	Priority int
	// ContinueOn nil means the object's XDP_RUN_CONFIG, or
	// dispatcher.DefaultContinueOn. An empty set is refused: the chain
	// would end after the member.
	ContinueOn []string
}

// Info describes a member of the running chain, xlb's pipeline included.
type Info struct {
	Name       string
	Object     string
	Program    string
	SHA256     string // of the object, hex
	Priority   int
	ContinueOn []string
	Builtin    bool     // xlb's own pipeline
	PinDir     string   // where the member's maps are pinned
	Maps       []string // pin names in PinDir
}

// Options configure a Chain.
type Options struct {
	Pipeline    *dispatcher.Pipeline
	PinRoot     string // members' maps are pinned in PinRoot/<name>
	XLBPriority int
	Logger      *slog.Logger
	// Adopt makes New take the maps an earlier xlbd pinned for a member
	// under PinRoot/<name> when they are compatible with its object's
	// (dispatcher.Member.AdoptMaps), so the member's state survives a
	// restart.
	Adopt bool
}

// Chain is the chain on one interface. Its methods are safe for
// concurrent use.
type Chain struct {
	log     *slog.Logger
	pipe    *dispatcher.Pipeline
	pinRoot string

	adopt bool // set while New loads the members

	mu      sync.Mutex
	att     *dispatcher.Attachment
	xlbPrio int
	members []*member
	prog    *ebpf.Program // the chain in force; nil while xlb_dispatch runs alone
	gen     uint64        // counts committed changes
}

// member is a loaded member with its maps.
type member struct {
	spec       Spec // as requested
	m          *dispatcher.Member
	sum        [sha256.Size]byte
	priority   int
	continueOn []dispatcher.Verdict // nil: dispatcher.DefaultContinueOn
	pinDir     string               // where the member's maps are pinned, once committed
}

var memberName = regexp.MustCompile(`^[a-z0-9-]{1,15}$`)

// New loads the members and builds the chain around opts.Pipeline. It
// attaches nothing: the caller attaches Entry() and then calls Attached,
// so the interface goes from no program to the whole chain in one step.
func New(opts Options, specs []Spec) (*Chain, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Chain{log: opts.Logger, pipe: opts.Pipeline, pinRoot: opts.PinRoot, xlbPrio: opts.XLBPriority, adopt: opts.Adopt}
	if len(specs) == 0 {
		return c, nil
	}
	p, err := c.Prepare(specs, opts.XLBPriority)
	c.adopt = false
	if err != nil {
		return nil, err
	}
	if err := p.Commit(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Entry is the program to attach: the chain, or xlb_dispatch alone.
func (c *Chain) Entry() *ebpf.Program {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.prog != nil {
		return c.prog
	}
	return c.pipe.Entry()
}

// Attached tells the chain where Entry() is attached: later changes are
// swapped in there.
func (c *Chain) Attached(att *dispatcher.Attachment) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.att = att
}

// Close releases the chain's program and the members' maps and pins. It
// leaves the attachment to its owner.
func (c *Chain) Close() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, m := range c.members {
		errs = append(errs, m.close())
	}
	c.members = nil
	if c.prog != nil {
		c.prog.Close()
		c.prog = nil
	}
	_ = os.Remove(c.pinRoot) // only if empty
	return errors.Join(errs...)
}

// Release lets the chain's program and the members' maps go, keeping their
// pins (the data path stays attached).
func (c *Chain) Release() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.members {
		m.m.Close() // the pins stay
	}
	c.members = nil
	if c.prog != nil {
		c.prog.Close()
		c.prog = nil
	}
	return nil
}

// List returns the chain in run order, xlb's pipeline included.
func (c *Chain) List() []Info {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Info
	for _, e := range entries(c.members, c.xlbPrio) {
		cont := e.ContinueOn
		if cont == nil {
			cont = dispatcher.DefaultContinueOn
		}
		info := Info{Name: e.Name(), Priority: e.Priority, ContinueOn: []string{}}
		for _, v := range cont {
			info.ContinueOn = append(info.ContinueOn, v.String())
		}
		if e.Member == nil {
			info.Builtin = true
			info.Program = "xlb_dispatch"
		} else {
			m := c.byName(e.Member.Name)
			info.Object, info.Program, info.SHA256 = m.spec.Object, m.m.Program, fmt.Sprintf("%x", m.sum)
			info.PinDir = m.pinDir
			for _, n := range m.m.MapNames() {
				info.Maps = append(info.Maps, dispatcher.PinName(n))
			}
		}
		out = append(out, info)
	}
	return out
}

func (c *Chain) byName(name string) *member {
	i := slices.IndexFunc(c.members, func(m *member) bool { return m.spec.Name == name })
	if i < 0 {
		return nil
	}
	return c.members[i]
}

// Add adds a member and swaps the new chain in.
func (c *Chain) Add(spec Spec) error {
	c.mu.Lock()
	if c.byName(spec.Name) != nil {
		c.mu.Unlock()
		return fmt.Errorf("%w %s: already in the chain", ErrMember, spec.Name)
	}
	want := c.specs()
	xlbPrio := c.xlbPrio
	c.mu.Unlock()
	p, err := c.prepare(append(want, spec), xlbPrio, false)
	if err != nil {
		return err
	}
	if err := p.Commit(); err != nil {
		return fmt.Errorf("add chain member %s: %w", spec.Name, err)
	}
	m := p.byName(spec.Name)
	c.log.Info("chain member added", "name", spec.Name, "object", spec.Object, "program", m.m.Program, "priority", m.priority)
	return nil
}

// Remove removes a member and swaps the new chain in.
func (c *Chain) Remove(name string) error {
	if name == dispatcher.PipelineName {
		return fmt.Errorf("%w %s: xlb's own pipeline cannot be removed", ErrMember, name)
	}
	c.mu.Lock()
	if c.byName(name) == nil {
		c.mu.Unlock()
		return fmt.Errorf("%w %s: not in the chain", ErrMember, name)
	}
	want := slices.DeleteFunc(c.specs(), func(s Spec) bool { return s.Name == name })
	xlbPrio := c.xlbPrio
	c.mu.Unlock()
	p, err := c.prepare(want, xlbPrio, false)
	if err != nil {
		return fmt.Errorf("remove chain member %s: %w", name, err)
	}
	if err := p.Commit(); err != nil {
		return fmt.Errorf("remove chain member %s: %w", name, err)
	}
	c.log.Info("chain member removed", "name", name)
	return nil
}

// specs returns the running members' specs. Caller holds c.mu.
func (c *Chain) specs() []Spec {
	out := make([]Spec, len(c.members))
	for i, m := range c.members {
		out[i] = m.spec
	}
	return out
}

// Plan is a prepared change of the chain: new members loaded and their
// maps created, the new chain program loaded (and so verified). Nothing
// running has changed until Commit; Abort releases what was prepared.
type Plan struct {
	c        *Chain
	gen      uint64
	xlbPrio  int
	members  []*member // the chain after Commit
	fresh    []*member // members this plan loaded
	dropped  []*member // running members that Commit releases
	prog     *ebpf.Program
	changed  bool
	Summary  []string // what Commit changes, for the log
	finished bool
}

// Prepare prepares making the chain exactly want with xlb at xlbPrio.
// Members whose name, object (path and SHA-256 of its content) and
// program are unchanged keep running with their maps, even when their
// priority or continue-on changes; other members are loaded afresh.
func (c *Chain) Prepare(want []Spec, xlbPrio int) (*Plan, error) {
	return c.prepare(want, xlbPrio, true)
}

func (c *Chain) prepare(want []Spec, xlbPrio int, rehash bool) (_ *Plan, err error) {
	c.mu.Lock()
	p := &Plan{c: c, gen: c.gen, xlbPrio: xlbPrio, changed: xlbPrio != c.xlbPrio}
	running := slices.Clone(c.members)
	c.mu.Unlock()
	defer func() {
		if err != nil {
			p.Abort()
		}
	}()
	if p.changed {
		p.Summary = append(p.Summary, fmt.Sprintf("xlb priority %d", xlbPrio))
	}
	names := map[string]bool{}
	for _, s := range want {
		if names[s.Name] {
			return nil, fmt.Errorf("%w %s: listed twice", ErrMember, s.Name)
		}
		names[s.Name] = true
		old := runningMember(running, s.Name)
		if old != nil && old.spec.Object == s.Object && old.spec.Program == s.Program {
			same := true
			if rehash {
				sum, err := fileSHA256(s.Object)
				same = err == nil && sum == old.sum
			}
			if same {
				kept, err := old.with(s)
				if err != nil {
					return nil, err
				}
				if kept.priority != old.priority || !slices.Equal(kept.continueOn, old.continueOn) {
					p.changed = true
					p.Summary = append(p.Summary, fmt.Sprintf("%s priority %d continue-on %s (maps kept)", s.Name, kept.priority, verdicts(kept.continueOn)))
				}
				p.members = append(p.members, kept)
				continue
			}
		}
		m, err := c.load(s)
		if err != nil {
			return nil, err
		}
		p.fresh = append(p.fresh, m)
		p.members = append(p.members, m)
		p.changed = true
		if old != nil {
			p.Summary = append(p.Summary, fmt.Sprintf("%s replaced (object %s or its program changed; new maps)", s.Name, s.Object))
		} else {
			p.Summary = append(p.Summary, fmt.Sprintf("%s added", s.Name))
		}
	}
	for _, m := range running {
		if !names[m.spec.Name] || !slices.ContainsFunc(p.members, func(x *member) bool { return x.m == m.m }) {
			p.dropped = append(p.dropped, m)
			p.changed = true
			if !names[m.spec.Name] {
				p.Summary = append(p.Summary, m.spec.Name+" removed")
			}
		}
	}
	if !p.changed {
		return p, nil
	}
	if len(p.members) > 0 {
		prog, err := c.pipe.BuildChain(entries(p.members, xlbPrio))
		if err != nil {
			return nil, c.explain(err, p.fresh)
		}
		p.prog = prog
	}
	return p, nil
}

func runningMember(ms []*member, name string) *member {
	for _, m := range ms {
		if m.spec.Name == name {
			return m
		}
	}
	return nil
}

// Changed tells whether Commit changes anything.
func (p *Plan) Changed() bool { return p.changed }

// Commit swaps the prepared chain in with one bpf_link update and
// releases the members it drops. If the swap fails nothing changed; an
// error wrapping ErrUnpinned means the new chain is in force but some of
// its pins are missing.
func (p *Plan) Commit() error {
	if p.finished {
		return errors.New("commit chain change: already finished")
	}
	c := p.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != p.gen {
		p.abortLocked()
		return fmt.Errorf("commit chain change: %w; try again", ErrChangedMeanwhile)
	}
	if !p.changed {
		p.finished = true
		return nil
	}
	next := c.pipe.Entry()
	if p.prog != nil {
		next = p.prog
	}
	if c.att != nil {
		if err := c.att.Replace(next); err != nil {
			p.abortLocked()
			return err
		}
	}
	p.finished = true
	var errs []error
	for _, m := range p.dropped {
		errs = append(errs, m.close())
	}
	// New members pin their maps once the members they replace have
	// removed theirs (a pin failure leaves the member running, unpinned).
	for _, m := range p.fresh {
		errs = append(errs, m.m.Pin(m.pinDir))
	}
	if c.prog != nil {
		c.prog.Close()
	}
	c.prog = p.prog
	c.members = p.members
	c.xlbPrio = p.xlbPrio
	c.gen++
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrUnpinned, err)
	}
	return nil
}

// Abort releases what Prepare loaded; the running chain is untouched.
func (p *Plan) Abort() {
	if p.finished {
		return
	}
	p.c.mu.Lock()
	defer p.c.mu.Unlock()
	p.abortLocked()
}

func (p *Plan) abortLocked() {
	p.finished = true
	for _, m := range p.fresh {
		_ = m.close()
	}
	if p.prog != nil {
		p.prog.Close()
	}
}

func (p *Plan) byName(name string) *member { return runningMember(p.members, name) }

// load reads and checks a member and creates its maps, unpinned. Every
// check that needs no kernel object comes first.
func (c *Chain) load(s Spec) (_ *member, err error) {
	switch {
	case s.Name == dispatcher.PipelineName:
		return nil, fmt.Errorf("%w %s: the name of xlb's own pipeline", ErrMember, s.Name)
	case !memberName.MatchString(s.Name):
		return nil, fmt.Errorf("%w %q: name is not [a-z0-9-]{1,15}", ErrMember, s.Name)
	case s.Object == "":
		return nil, fmt.Errorf("%w %s: no object", ErrMember, s.Name)
	case s.Priority < -1 || s.Priority > config.MaxPriority:
		return nil, fmt.Errorf("%w %s: priority %d out of range 0..%d", ErrMember, s.Name, s.Priority, config.MaxPriority)
	case s.ContinueOn != nil && len(s.ContinueOn) == 0:
		return nil, fmt.Errorf("%w %s: %w", ErrMember, s.Name, errEmptyContinueOn)
	}
	file, err := CheckObject(s.Object)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrMember, s.Name, err)
	}
	if err := CheckPinPath(c.pinRoot); err != nil {
		return nil, fmt.Errorf("%w %s: pin path %w", ErrMember, s.Name, err)
	}
	sum, err := fileSHA256(file)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrMember, s.Name, err)
	}
	dm, err := dispatcher.LoadMember(s.Name, file, s.Program)
	if err != nil {
		return nil, err
	}
	if !gplCompatible(dm.Spec.License) {
		return nil, fmt.Errorf("%w %s: %s: %w (%q): the chain is one program that links every member with xlb's code, and is loaded as GPL", ErrMember, s.Name, s.Object, ErrNotGPL, dm.Spec.License)
	}
	m := &member{spec: s, m: dm, sum: sum, pinDir: filepath.Join(c.pinRoot, s.Name)}
	m, err = m.with(s)
	if err != nil {
		return nil, err
	}
	if c.adopt {
		took, err := dm.AdoptMaps(m.pinDir)
		if err != nil {
			return nil, err
		}
		if len(took) > 0 {
			c.log.Info("chain member's pinned maps adopted", "name", s.Name, "maps", took)
		}
		return m, nil
	}
	if err := dm.CreateMaps(); err != nil {
		return nil, err
	}
	return m, nil
}

var errEmptyContinueOn = errors.New("empty continue-on set: the chain would end after this member, so xlb (and every member after it) would never see a packet; list the verdicts after which the chain goes on, such as pass")

// with returns a copy of m (same program and maps) whose priority and
// continue-on follow s.
func (m *member) with(s Spec) (*member, error) {
	rc := m.m.RunConfig
	out := *m
	out.spec = s
	out.priority = dispatcher.DefaultPriority
	switch {
	case s.Priority >= 0:
		out.priority = s.Priority
	case rc.HasPriority && (rc.Priority < 0 || rc.Priority > config.MaxPriority):
		return nil, fmt.Errorf("%w %s: XDP_RUN_CONFIG priority %d of %s out of range 0..%d; set the member's priority to override it",
			ErrMember, s.Name, rc.Priority, m.m.Program, config.MaxPriority)
	case rc.HasPriority:
		out.priority = rc.Priority
	}
	out.continueOn = nil
	switch {
	case s.ContinueOn != nil:
		if len(s.ContinueOn) == 0 {
			return nil, fmt.Errorf("%w %s: %w", ErrMember, s.Name, errEmptyContinueOn)
		}
		out.continueOn = []dispatcher.Verdict{}
		for _, name := range s.ContinueOn {
			v, err := dispatcher.ParseVerdict(name)
			if err != nil {
				return nil, fmt.Errorf("%w %s: %w", ErrMember, s.Name, err)
			}
			out.continueOn = append(out.continueOn, v)
		}
	case rc.HasActions && len(rc.ContinueOn) == 0:
		return nil, fmt.Errorf("%w %s: XDP_RUN_CONFIG of %s: %w; set the member's continue-on to override it", ErrMember, s.Name, m.m.Program, errEmptyContinueOn)
	case rc.HasActions:
		out.continueOn = slices.Clone(rc.ContinueOn)
	}
	return &out, nil
}

// close removes the member's pins and releases its maps.
func (m *member) close() error {
	return errors.Join(m.m.Unpin(), m.m.Close())
}

// entries is the chain of members plus xlb's pipeline, in run order.
func entries(members []*member, xlbPrio int) []dispatcher.ChainEntry {
	out := []dispatcher.ChainEntry{{Priority: xlbPrio}}
	for _, m := range members {
		out = append(out, dispatcher.ChainEntry{Member: m.m, Priority: m.priority, ContinueOn: m.continueOn})
	}
	dispatcher.SortChain(out)
	return out
}

func verdicts(vs []dispatcher.Verdict) string {
	if vs == nil {
		vs = dispatcher.DefaultContinueOn
	}
	names := make([]string, len(vs))
	for i, v := range vs {
		names[i] = v.String()
	}
	return strings.Join(names, ",")
}

// gplLicenses are the licenses the kernel takes as GPL-compatible
// (license_is_gpl_compatible).
var gplLicenses = []string{"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL"}

func gplCompatible(l string) bool { return slices.Contains(gplLicenses, l) }

// elfMagic starts every ELF file.
var elfMagic = []byte("\x7fELF")

// CheckObject checks, without loading it, that path can be a chain
// member's object: an ELF file that only root can have written (the
// file and every directory on its path, see internal/fsperm). It returns
// the object's resolved path, which is what xlbd loads.
func CheckObject(path string) (string, error) {
	file, err := fsperm.Check(path)
	if err != nil {
		return "", err
	}
	f, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, len(elfMagic))
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if !bytes.Equal(head[:n], elfMagic) {
		return "", fmt.Errorf("%s: %w (an eBPF object from clang -target bpf starts with \\x7fELF; this file starts with %q)", path, ErrNotELF, head[:n])
	}
	return file, nil
}

// fileSHA256 hashes a file (objects are small: it reads it whole).
func fileSHA256(path string) ([sha256.Size]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	return sha256.Sum256(b), nil
}

// CheckPinPath checks that path, or the nearest of its parents that
// exists, is on a bpffs, and explains how to get one if not.
func CheckPinPath(path string) error {
	dir := filepath.Clean(path)
	for {
		var st unix.Statfs_t
		err := unix.Statfs(dir, &st)
		if err == nil {
			if st.Type == unix.BPF_FS_MAGIC {
				return nil
			}
			return fmt.Errorf("%s: %s is %w (filesystem magic %#x)%s", path, dir, ErrNotBPFFS, st.Type, bpffsHint(dir, st.Type))
		}
		if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%s: statfs %s: %w", path, dir, err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return fmt.Errorf("%s: %w", path, err)
		}
		dir = parent
	}
}

func bpffsHint(dir string, magic int64) string {
	const mount = "mount one with `mount -t bpf bpf /sys/fs/bpf`, or set pin-path to a directory on a bpffs"
	if magic == unix.SYSFS_MAGIC && (dir == "/sys" || strings.HasPrefix(dir, "/sys/")) {
		return "; /sys/fs/bpf is not mounted here: `ip netns exec` remounts /sys without bpffs, so start xlbd with `nsenter --net=/run/netns/NAME` instead; otherwise " + mount
	}
	return "; " + mount
}

// explain turns a failed chain build into an error that names the member
// at fault: each member this change loads is verified on its own, and
// the first the verifier refuses is reported with the end of its own
// log (the whole log goes to the debug log). Otherwise the combined
// chain's error is shortened to its first line and its last lines.
func (c *Chain) explain(err error, fresh []*member) error {
	for _, m := range fresh {
		verr := verifyAlone(m.m)
		if verr == nil {
			continue
		}
		var ve *ebpf.VerifierError
		if errors.As(verr, &ve) {
			c.log.Debug("verifier log", "member", m.spec.Name, "log", fmt.Sprintf("%+v", ve))
			log := ve.Log
			if n := len(log); n > 0 && strings.HasPrefix(log[n-1], "processed ") {
				log = log[:n-1]
			}
			return fmt.Errorf("%w %s: program %s of %s %w:%s", ErrMember, m.spec.Name, m.m.Program, m.spec.Object, ErrVerifier, tail(log, verifierLines))
		}
		return fmt.Errorf("%w %s: load program %s of %s: %w", ErrMember, m.spec.Name, m.m.Program, m.spec.Object, verr)
	}
	c.log.Debug("verifier log", "chain", err.Error())
	lines := strings.Split(err.Error(), "\n")
	if len(lines) <= verifierLines+1 {
		return err
	}
	return fmt.Errorf("%s%s", lines[0], tail(lines[1:], verifierLines))
}

// verifierLines is how many lines of a verifier log an error keeps.
const verifierLines = 8

// tail formats the last n lines, saying how many it leaves out.
func tail(lines []string, n int) string {
	var b strings.Builder
	if len(lines) > n {
		fmt.Fprintf(&b, "\n\t(%d lines before these omitted; the debug log has them all)", len(lines)-n)
		lines = lines[len(lines)-n:]
	}
	for _, l := range lines {
		b.WriteString("\n\t")
		b.WriteString(strings.TrimLeft(l, "\t"))
	}
	return b.String()
}

// verifyAlone loads a member's program on its own, with its maps, to see
// whether the verifier accepts it, and releases it.
func verifyAlone(m *dispatcher.Member) error {
	spec := m.Spec.Copy()
	maps := m.Maps()
	for i := range spec.Instructions {
		ins := &spec.Instructions[i]
		if !ins.IsLoadFromMap() || ins.Reference() == "" {
			continue
		}
		mp, ok := maps[ins.Reference()]
		if !ok {
			return fmt.Errorf("map %s not created", ins.Reference())
		}
		if err := ins.AssociateMap(mp); err != nil {
			return fmt.Errorf("map %s: %w", ins.Reference(), err)
		}
	}
	prog, err := ebpf.NewProgramWithOptions(spec, ebpf.ProgramOptions{LogSizeStart: 1 << 20})
	if err != nil {
		return err
	}
	return prog.Close()
}
