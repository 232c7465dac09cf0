package dispatcher

import (
	"fmt"
	"strings"

	"github.com/cilium/ebpf/btf"
)

// statNames reads the counter names from the enum xlb_stat in the
// object's BTF, so they can never drift from the C definition.
func statNames(types *btf.Spec) ([]string, error) {
	var e *btf.Enum
	if err := types.TypeByName("xlb_stat", &e); err != nil {
		return nil, fmt.Errorf("find enum xlb_stat: %w", err)
	}
	names := make([]string, 0, len(e.Values))
	for _, v := range e.Values {
		if v.Name == "XLB_STAT_MAX" {
			continue
		}
		if int(v.Value) != len(names) {
			return nil, fmt.Errorf("enum xlb_stat: %s is %d, want %d", v.Name, v.Value, len(names))
		}
		names = append(names, strings.ToLower(strings.TrimPrefix(v.Name, "XLB_STAT_")))
	}
	return names, nil
}

// StatNames lists the counters in index order, such as "drop_no_conn".
func (p *Pipeline) StatNames() []string { return p.statNames }

// Stats returns every counter summed over CPUs, by name.
func (p *Pipeline) Stats() (map[string]uint64, error) {
	out := make(map[string]uint64, len(p.statNames))
	var per []uint64
	for i, name := range p.statNames {
		if err := p.objs.XlbStats.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[name] = sum
	}
	return out, nil
}
