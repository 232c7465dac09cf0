package dispatcher

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Pinning. With Options.PinPath, Load pins every map of the pipeline
// there under its own name, with a map of its own (xlb_bk_owner: which
// service each backend id belongs to) and the layout record (xlb_layout);
// Pipeline.Attach pins the XDP link as xlb_link. All of it outlives the
// process: the link keeps the programs attached, the pinned program array
// keeps their stages, and the maps keep the connections. With
// Options.Adopt, Load takes the maps a previous run pinned (after
// ReadPinned has checked their layout), loads new programs against them
// into a new program array, and Attach swaps the new dispatcher in with one
// update of the pinned link.

// File names under the pin path.
const (
	LinkPin   = "xlb_link"   // the XDP bpf_link
	LayoutPin = "xlb_layout" // the layout record: a descriptor per adopted map
	ownerMap  = "xlb_bk_owner"
	// progsNext holds a new program array until the link runs it: the
	// array the link runs now must stay pinned (the kernel empties a
	// program array nobody holds) until the update.
	progsNext = "xlb_progs_next"
	// SecretsPin holds the ISN and cookie secrets. Unlike the rest it
	// outlives a full stop (RemovePins leaves it), so that the next
	// pipeline on this pin path draws the same ISNs (see
	// Pipeline.secrets); RemoveSecrets removes it, and a reboot.
	SecretsPin = "xlb_secrets"
)

// ErrNoState is returned by ReadPinned when nothing adoptable is pinned.
var ErrNoState = errors.New("no pinned state")

const (
	layoutKeySize   = 16 // a map name and its NUL
	layoutValueSize = 4096
)

// ownerSpec is xlb_bk_owner: backend id -> service id + 1 (0: the id is
// free). Only xlbd reads it, to tell after a restart which service each
// backend id belongs to.
func ownerSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: ownerMap, Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: uint32(MaxBackends)}
}

// secretsSpec is SecretsPin: {0} -> the ISN secret's two words, then the
// cookie secret's.
func secretsSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: SecretsPin, Type: ebpf.Array, KeySize: 4, ValueSize: 16, MaxEntries: 1}
}

// ReadSecrets reads the secrets pinned under dir; the error wraps
// os.ErrNotExist when there are none.
func ReadSecrets(dir string) ([4]uint32, error) {
	var keys [4]uint32
	path := filepath.Join(dir, SecretsPin)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		return keys, fmt.Errorf("read secrets %s: %w", path, err)
	}
	defer m.Close()
	if err := secretsSpec().Compatible(m); err != nil {
		return keys, fmt.Errorf("read secrets %s: %w", path, err)
	}
	if err := m.Lookup(uint32(0), &keys); err != nil {
		return keys, fmt.Errorf("read secrets %s: %w", path, err)
	}
	return keys, nil
}

// RemoveSecrets removes the secrets pinned under dir, if any.
func RemoveSecrets(dir string) error {
	if err := os.Remove(filepath.Join(dir, SecretsPin)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pin %s: %w", filepath.Join(dir, SecretsPin), err)
	}
	return nil
}

func layoutSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Name: LayoutPin, Type: ebpf.Hash, KeySize: layoutKeySize, ValueSize: layoutValueSize,
		MaxEntries: 256, Flags: 1 /* BPF_F_NO_PREALLOC */}
}

// Pinned is the state a previous run left under a pin path: its layout,
// checked against this build's, and how its tables were sized.
type Pinned struct {
	Layout         Layout
	Slots          uint32 // connection table slots
	Slots6         uint32 // IPv6 connection table slots (a few when it is not sized)
	PortLo, PortHi uint16
	Sources        []netip.Addr // by index
	// Sources6 are the IPv6 source addresses, by index; with none the
	// IPv6 tables were not sized (Options.Sources6 0).
	Sources6    []netip.Addr
	Link        bool // an XDP link is pinned
	LinkIfindex int  // the interface it is attached to
}

// ReadPinned reads the state pinned under dir. It returns an error wrapping
// ErrNoState when there is no layout record, and one wrapping ErrLayout,
// naming every map that differs, when the state was left by a build with
// another layout. It changes nothing.
func ReadPinned(dir string) (*Pinned, error) {
	pinned, err := readLayout(dir)
	if err != nil {
		return nil, err
	}
	mine, err := BuildLayout()
	if err != nil {
		return nil, err
	}
	if diff := mine.Diff(pinned); len(diff) > 0 {
		return nil, fmt.Errorf("%w: pinned %s, this build %s:\n\t%s", ErrLayout, pinned.Version(), mine.Version(), strings.Join(diff, "\n\t"))
	}
	st := &Pinned{Layout: pinned}
	settings, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_settings"), nil)
	if err != nil {
		return nil, fmt.Errorf("read pinned settings: %w", err)
	}
	defer settings.Close()
	var cfg xlbXlbCfg
	if err := settings.Lookup(uint32(0), &cfg); err != nil {
		return nil, fmt.Errorf("read pinned settings: %w", err)
	}
	if cfg.Nports == 0 {
		return nil, fmt.Errorf("read pinned settings: %w: settings never written", ErrNoState)
	}
	st.Slots, st.Slots6, st.PortLo, st.PortHi = cfg.CtMask+1, cfg.Ct6Mask+1, cfg.PortLo, cfg.PortHi
	ports, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_ports"), nil)
	if err != nil {
		return nil, fmt.Errorf("read pinned source ports: %w", err)
	}
	nsrc := ports.MaxEntries() / (cfg.Nports * uint32(PortWays))
	ports.Close()
	srcs, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_src"), nil)
	if err != nil {
		return nil, fmt.Errorf("read pinned source addresses: %w", err)
	}
	defer srcs.Close()
	for i := range nsrc {
		var a uint32
		if err := srcs.Lookup(i, &a); err != nil {
			return nil, fmt.Errorf("read pinned source address %d: %w", i, err)
		}
		st.Sources = append(st.Sources, addrFromBE(a))
	}
	if st.Sources6, err = readSources6(dir, cfg.Nports); err != nil {
		return nil, err
	}
	if l, err := link.LoadPinnedLink(filepath.Join(dir, LinkPin), nil); err == nil {
		st.Link = true
		if info, err := l.Info(); err == nil && info.XDP() != nil {
			st.LinkIfindex = int(info.XDP().Ifindex)
		}
		l.Close()
	}
	return st, nil
}

// readSources6 reads the IPv6 source addresses pinned under dir: the
// entries of xlb_src6 SetSettings wrote (index + 1 in each), which must
// be as many as the IPv6 return table is sized for.
func readSources6(dir string, nports uint32) ([]netip.Addr, error) {
	srcs, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_src6"), nil)
	if err != nil {
		return nil, fmt.Errorf("read pinned IPv6 source addresses: %w", err)
	}
	defer srcs.Close()
	var out []netip.Addr
	for i := range uint32(MaxSources) {
		var v xlbXlbSrc6Slot
		if err := srcs.Lookup(i, &v); err != nil {
			return nil, fmt.Errorf("read pinned IPv6 source address %d: %w", i, err)
		}
		if v.Idx != i+1 {
			break
		}
		out = append(out, addr6FromWords(v.Addr))
	}
	if len(out) == 0 {
		return nil, nil
	}
	ports, err := ebpf.LoadPinnedMap(filepath.Join(dir, "xlb_ports6"), nil)
	if err != nil {
		return nil, fmt.Errorf("read pinned IPv6 source ports: %w", err)
	}
	defer ports.Close()
	if want := uint32(len(out)) * nports * uint32(PortWays); ports.MaxEntries() != want {
		return nil, fmt.Errorf("read pinned IPv6 source ports: %d entries for %d addresses, want %d", ports.MaxEntries(), len(out), want)
	}
	return out, nil
}

// readLayout reads the layout record pinned under dir.
func readLayout(dir string) (Layout, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, LayoutPin), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, ErrNoState)
	}
	if err != nil {
		return nil, fmt.Errorf("read layout record: %w", err)
	}
	defer m.Close()
	l := Layout{}
	var (
		k [layoutKeySize]byte
		v [layoutValueSize]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		l[cString(k[:])] = cString(v[:])
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read layout record: %w", err)
	}
	return l, nil
}

func cString(b []byte) string {
	if i := slices.Index(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// writeLayout pins this build's layout record under dir, replacing one
// that is there.
func writeLayout(dir string, l Layout) error {
	m, err := ebpf.NewMap(layoutSpec())
	if err != nil {
		return fmt.Errorf("create layout record: %w", err)
	}
	defer m.Close()
	for name, d := range l {
		var (
			k [layoutKeySize]byte
			v [layoutValueSize]byte
		)
		if len(name) >= layoutKeySize || len(d) >= layoutValueSize {
			return fmt.Errorf("layout of %s: too long to record", name)
		}
		copy(k[:], name)
		copy(v[:], d)
		if err := m.Put(&k, &v); err != nil {
			return fmt.Errorf("write layout record: %w", err)
		}
	}
	return pinReplace(m, filepath.Join(dir, LayoutPin))
}

// pinReplace pins m at path, replacing what is pinned there in one step
// (a rename on the bpffs), so path never goes missing.
func pinReplace(m *ebpf.Map, path string) error {
	tmp := path + "_tmp"
	_ = os.Remove(tmp)
	c, err := m.Clone() // Pin renames a map that is pinned already
	if err != nil {
		return fmt.Errorf("pin %s: %w", path, err)
	}
	defer c.Close()
	if err := c.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin %s: %w", path, err)
	}
	return nil
}

// adoptMaps loads the maps pinned under dir that spec's pipeline adopts:
// every required map (an error if one is missing or incompatible) and the
// optional ones that are compatible.
func adoptMaps(spec *ebpf.CollectionSpec, dir string) (_ map[string]*ebpf.Map, err error) {
	out := map[string]*ebpf.Map{}
	defer func() {
		if err != nil {
			for _, m := range out {
				m.Close()
			}
		}
	}()
	for name, ms := range spec.Maps {
		if !isPipelineMap(name) || slices.Contains(freshMaps, name) {
			continue
		}
		optional := slices.Contains(optionalMaps, name)
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			if optional && errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, fmt.Errorf("adopt map %s: %w", name, err)
		}
		if err := ms.Compatible(m); err != nil {
			m.Close()
			if optional {
				continue
			}
			return nil, fmt.Errorf("adopt map %s: %w", name, err)
		}
		out[name] = m
	}
	return out, nil
}

// pin pins the pipeline's maps under p.pinPath: maps it adopted are there
// already; a new program array waits under progsNext while the link still
// runs the pinned one; the rest replace what is pinned. The layout record
// comes last: it marks the state complete.
func (p *Pipeline) pin(adopted map[string]*ebpf.Map) error {
	if err := os.MkdirAll(p.pinPath, 0o700); err != nil {
		return fmt.Errorf("create pin directory: %w", err)
	}
	all := p.mapsByName()
	all[ownerMap] = p.owner
	for name, m := range all {
		path := filepath.Join(p.pinPath, name)
		switch {
		case adopted[name] != nil:
			continue
		case name == "xlb_progs":
			if err := p.holdPinnedProgs(); err != nil {
				return err
			}
			if len(p.oldProgs) > 0 {
				path = filepath.Join(p.pinPath, progsNext)
			}
			if err := pinReplace(m, path); err != nil {
				return err
			}
		default:
			if err := pinReplace(m, path); err != nil {
				return err
			}
		}
	}
	l, err := layoutOf(p.spec)
	if err != nil {
		return err
	}
	return writeLayout(p.pinPath, l)
}

// holdPinnedProgs keeps a reference to every program array pinned by an
// earlier run (a link may run either), so none is emptied before the link
// runs the new one.
func (p *Pipeline) holdPinnedProgs() error {
	for _, name := range []string{"xlb_progs", progsNext} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(p.pinPath, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("hold pinned program array %s: %w", name, err)
		}
		p.oldProgs = append(p.oldProgs, m)
	}
	return nil
}

// progsInForce moves the new program array's pin in place once the link
// runs it, and lets the old arrays go.
func (p *Pipeline) progsInForce() error {
	if len(p.oldProgs) == 0 {
		return nil
	}
	if err := os.Rename(filepath.Join(p.pinPath, progsNext), filepath.Join(p.pinPath, "xlb_progs")); err != nil {
		return fmt.Errorf("pin program array: %w", err)
	}
	for _, m := range p.oldProgs {
		m.Close()
	}
	p.oldProgs = nil
	return nil
}

// PinPath is where the pipeline is pinned, or "".
func (p *Pipeline) PinPath() string { return p.pinPath }

// Adopted tells whether Load took the maps of an earlier run.
func (p *Pipeline) Adopted() bool { return p.adopted }

// Unpin removes every pin of the pipeline (maps, program arrays, layout
// record) but the secrets, so its maps go with the last reference to them.
// The link is the Attachment's.
func (p *Pipeline) Unpin() error {
	if p.pinPath == "" {
		return nil
	}
	return RemovePins(p.pinPath)
}

// RemovePins removes every pin a pipeline may have left under dir, except
// the link, the secrets (SecretsPin) and other files: the maps, the
// program arrays and the layout record.
func RemovePins(dir string) error {
	spec, err := loadXlb()
	if err != nil {
		return fmt.Errorf("load pipeline spec: %w", err)
	}
	names := []string{ownerMap, progsNext, LayoutPin}
	for name := range spec.Maps {
		if isPipelineMap(name) {
			names = append(names, name)
		}
	}
	var errs []error
	for _, name := range names {
		for _, path := range []string{filepath.Join(dir, name), filepath.Join(dir, name) + "_tmp"} {
			if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove pin %s: %w", path, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Attach attaches prog to the interface ifindex. Without a pin path it is
// the package's Attach. With one, the link is pinned there (LinkPin) and
// keeps prog attached after xlbd exits; a link an earlier run pinned there
// is taken over instead and its program replaced with one update
// (link.Update), so the interface is never without a program. The XDP mode
// of a taken-over link is the one it was attached with.
func (p *Pipeline) Attach(prog *ebpf.Program, ifindex int, mode XDPMode) (*Attachment, error) {
	if p.pinPath == "" {
		return Attach(prog, ifindex, mode)
	}
	path := filepath.Join(p.pinPath, LinkPin)
	l, err := link.LoadPinnedLink(path, nil)
	switch {
	case err == nil:
		info, err := l.Info()
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("read pinned link %s: %w", path, err)
		}
		if x := info.XDP(); x == nil || int(x.Ifindex) != ifindex {
			l.Close()
			return nil, fmt.Errorf("pinned link %s is not an xdp link on ifindex %d", path, ifindex)
		}
		if err := l.Update(prog); err != nil {
			l.Close()
			return nil, fmt.Errorf("replace the program of pinned link %s: %w", path, err)
		}
	case errors.Is(err, os.ErrNotExist):
		a, err := Attach(prog, ifindex, mode)
		if err != nil {
			return nil, err
		}
		l = a.link
		if err := l.Pin(path); err != nil {
			l.Close()
			return nil, fmt.Errorf("pin link: %w", err)
		}
	default:
		return nil, fmt.Errorf("load pinned link %s: %w", path, err)
	}
	if err := p.progsInForce(); err != nil {
		return &Attachment{link: l, pin: path}, err
	}
	return &Attachment{link: l, pin: path}, nil
}

// DetachPinned detaches the XDP link pinned under dir, if there is one,
// and removes its pin.
func DetachPinned(dir string) (bool, error) {
	path := filepath.Join(dir, LinkPin)
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("load pinned link %s: %w", path, err)
	}
	a := &Attachment{link: l, pin: path}
	return true, a.Close()
}
