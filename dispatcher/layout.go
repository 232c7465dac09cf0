package dispatcher

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// The layout of the state that outlives a restart: the maps xlbd pins and
// a later xlbd adopts, described from the BTF of the object that defines
// them. Two builds whose layouts are equal can share the pinned maps; a
// build whose layout differs must not adopt them (a struct read with
// another build's offsets is garbage).

// Map classes for adoption.
var (
	// freshMaps are created anew by every Load and never adopted: the
	// per-packet scratch, the clock, the random state and the program
	// array (each set of programs gets its own, so that one link update
	// swaps the dispatcher and its stages at once).
	freshMaps = []string{"xlb_progs", "xlb_scratch", "xlb_rng", "xlb_now"}
	// optionalMaps are adopted when they are compatible and started
	// afresh otherwise: counters and hints no connection depends on.
	optionalMaps = []string{"xlb_stats", "xlb_bk_ctr", "xlb_rr", "xlb_syn_ok"}
	// sizedMaps are sized from configuration (conntrack.max-entries,
	// source-ports, the number of source addresses of each family): their
	// layout leaves the size out, Pinned says it and the daemon checks it.
	sizedMaps = []string{"xlb_conns", "xlb_ports", "xlb_ct_busy", "xlb_port_busy",
		"xlb_conns6", "xlb_ports6", "xlb_ct6_busy", "xlb_port6_busy"}
)

// ErrLayout is returned when pinned state was left by a build whose layout
// differs from this one's.
var ErrLayout = errors.New("pinned state has another layout")

// Layout describes, map by map, the maps a restart adopts: the map type,
// key and value types as the object's BTF spells them (member names,
// offsets and sizes, recursively), flags and, unless the daemon sizes the
// map, its size.
type Layout map[string]string

// Version is a short digest of the whole layout.
func (l Layout) Version() string {
	h := sha256.New()
	for _, name := range slices.Sorted(maps.Keys(l)) {
		fmt.Fprintf(h, "%s\n%s\n", name, l[name])
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// Diff lists how pinned differs from l, one line per map, naming the types
// whose definitions changed. It is empty when they are equal.
func (l Layout) Diff(pinned Layout) []string {
	var out []string
	for _, name := range slices.Sorted(maps.Keys(l)) {
		old, ok := pinned[name]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("map %s: not in the pinned state (new in this build)", name))
		case old != l[name]:
			out = append(out, fmt.Sprintf("map %s: %s", name, lineDiff(old, l[name])))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(pinned)) {
		if _, ok := l[name]; !ok {
			out = append(out, fmt.Sprintf("map %s: pinned, not in this build", name))
		}
	}
	return out
}

// lineDiff names the lines of two descriptors that differ.
func lineDiff(old, new string) string {
	ol, nl := strings.Split(old, "\n"), strings.Split(new, "\n")
	var parts []string
	for _, l := range nl {
		if !slices.Contains(ol, l) {
			parts = append(parts, "this build has "+l)
		}
	}
	for _, l := range ol {
		if !slices.Contains(nl, l) {
			parts = append(parts, "pinned has "+l)
		}
	}
	return strings.Join(parts, "; ")
}

// BuildLayout is this build's layout.
func BuildLayout() (Layout, error) {
	spec, err := loadXlb()
	if err != nil {
		return nil, fmt.Errorf("load pipeline spec: %w", err)
	}
	return layoutOf(spec)
}

func layoutOf(spec *ebpf.CollectionSpec) (Layout, error) {
	l := Layout{}
	for name, ms := range spec.Maps {
		if !isPipelineMap(name) || slices.Contains(freshMaps, name) || slices.Contains(optionalMaps, name) {
			continue
		}
		d, err := describeMap(ms, !slices.Contains(sizedMaps, name))
		if err != nil {
			return nil, fmt.Errorf("describe map %s: %w", name, err)
		}
		l[name] = d
	}
	d, err := describeMap(ownerSpec(), true)
	if err != nil {
		return nil, err
	}
	l[ownerMap] = d
	return l, nil
}

// isPipelineMap tells the object's own maps from the sections the
// compiler makes for globals (.rodata, .bss), which are never pinned.
func isPipelineMap(name string) bool { return strings.HasPrefix(name, "xlb_") }

// describeMap writes a map's descriptor: a first line with the map's
// shape, then one line per named type its key and value use.
func describeMap(ms *ebpf.MapSpec, withSize bool) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s key %s value %s flags %#x", ms.Type, typeRef(ms.Key, ms.KeySize), typeRef(ms.Value, ms.ValueSize), ms.Flags)
	if withSize {
		fmt.Fprintf(&b, " entries %d", ms.MaxEntries)
	}
	if ms.InnerMap != nil {
		inner, err := describeMap(ms.InnerMap, true)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, " inner {%s}", strings.ReplaceAll(inner, "\n", "; "))
	}
	defs := map[string]string{}
	for _, t := range []btf.Type{ms.Key, ms.Value} {
		if t != nil {
			if err := collectDefs(t, defs); err != nil {
				return "", err
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(defs)) {
		b.WriteString("\n" + defs[k])
	}
	return b.String(), nil
}

// typeRef names a type as a member or map refers to it: integers by
// signedness and size, typedefs and qualifiers resolved, structs by name.
func typeRef(t btf.Type, size uint32) string {
	if t == nil {
		return fmt.Sprintf("[%d]byte", size)
	}
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Int:
		sign := "u"
		if t.Encoding&btf.Signed != 0 {
			sign = "s"
		}
		return fmt.Sprintf("%s%d", sign, 8*t.Size)
	case *btf.Struct:
		return "struct " + t.Name
	case *btf.Union:
		return "union " + t.Name
	case *btf.Enum:
		return fmt.Sprintf("enum %s(%d)", t.Name, t.Size)
	case *btf.Array:
		return fmt.Sprintf("[%d]%s", t.Nelems, typeRef(t.Type, 0))
	case *btf.Pointer:
		return "ptr"
	default:
		return fmt.Sprintf("%T", t)
	}
}

// collectDefs adds the definitions of the structs and unions t uses.
func collectDefs(t btf.Type, defs map[string]string) error {
	switch t := btf.UnderlyingType(t).(type) {
	case *btf.Array:
		return collectDefs(t.Type, defs)
	case *btf.Struct:
		return collectMembers("struct "+t.Name, t.Size, t.Members, defs)
	case *btf.Union:
		return collectMembers("union "+t.Name, t.Size, t.Members, defs)
	}
	return nil
}

func collectMembers(name string, size uint32, members []btf.Member, defs map[string]string) error {
	if _, ok := defs[name]; ok {
		return nil
	}
	defs[name] = "" // cycles end here
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s{", name)
	for i, m := range members {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %s @%d", cmp.Or(m.Name, "_"), typeRef(m.Type, 0), m.Offset/8)
		if m.Offset%8 != 0 {
			fmt.Fprintf(&b, ".%d", m.Offset%8)
		}
		if m.BitfieldSize > 0 {
			fmt.Fprintf(&b, ":%d", m.BitfieldSize)
		}
		if err := collectDefs(m.Type, defs); err != nil {
			return err
		}
	}
	fmt.Fprintf(&b, "} size %d", size)
	defs[name] = b.String()
	return nil
}
