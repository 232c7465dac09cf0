package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/xlb-project/xlb/internal/control"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
}

func printStatus(w io.Writer, st control.Status) {
	fmt.Fprintf(w, "interface %s (%s), source addresses %s, ports %s\n", st.Iface, st.XDPMode, strings.Join(st.SourceAddresses, ","), st.SourcePorts)
	if r := st.LastReload; r != nil {
		at := r.At.Local().Format(time.DateTime)
		if r.OK {
			fmt.Fprintf(w, "last reload %s: applied (took %s)\n", at, r.Took)
		} else {
			fmt.Fprintf(w, "last reload %s: failed: %s\n", at, firstLine(r.Error))
		}
	}
	if s := st.State; s.PinPath != "" {
		how := "started afresh"
		if a := s.Adopted; a != nil {
			how = fmt.Sprintf("adopted at start: %d services, %d backend ids (%d retired), %d connections, addresses added: %d", a.Services, a.BackendIDs, a.Retired, a.Connections, a.Addresses)
		}
		fmt.Fprintf(w, "state pinned at %s (layout %s), %s\n", s.PinPath, s.Layout, how)
		if s.VIPFilter == "" {
			fmt.Fprintln(w, "vip filter: off")
		} else {
			fmt.Fprintf(w, "vip filter: %s on %s\n", s.VIPFilter, strings.Join(s.VIPFilterAddr, ","))
		}
	}
	tw := newTable(w)
	for _, s := range st.Services {
		fmt.Fprintf(tw, "service %s/%s\tpolicy %s\tmanage-vip %v\n", s.VIP, s.Protocol, s.Policy, s.ManageVIP)
		for _, b := range s.Backends {
			fmt.Fprintf(tw, "  backend %s\t%s\tweight %d\tactive %d\thalf-open %d\tnew/s %.1f\tports %d used %d resting of %d\trefused %d\tnext hop: %s\n",
				b.Address, b.State, b.Weight, b.Active, b.HalfOpen, b.NewPerSec, b.PortsUsed, b.PortsHeld, b.PortPool, b.NoPort, b.NextHop)
		}
	}
	tw.Flush()
	for _, p := range st.Policies {
		pid := "down"
		if p.Pid > 0 {
			pid = fmt.Sprintf("pid %d, api %d, asked %s", p.Pid, p.APIVersion, p.Asked)
		}
		fmt.Fprintf(tw, "policy plugin %s\t%s\trestarts %d\t%s\n", p.Name, pid, p.Restarts, p.Path)
	}
	tw.Flush()
	fmt.Fprintln(w, "counters:")
	printCounters(w, st.Counters, func(v uint64) string { return fmt.Sprint(v) }, true)
}

// firstLine is s up to its first newline, marked when cut.
func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}

// printCounters prints counters by name; nonZero leaves zeros out.
func printCounters[V uint64 | float64](w io.Writer, counters map[string]V, format func(V) string, nonZero bool) {
	for _, n := range slices.Sorted(maps.Keys(counters)) {
		if v := counters[n]; !nonZero || v != 0 {
			fmt.Fprintf(w, "  %-18s %s\n", n, format(v))
		}
	}
}

func printConns(w io.Writer, cs []control.Conn) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "PROTO\tCLIENT\tVIP\tSOURCE\tBACKEND\tSTATE\tIDLE")
	for _, x := range cs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.Protocol, x.Client, x.VIP, x.Source, x.Backend, x.State, time.Duration(x.IdleMS)*time.Millisecond)
	}
	return tw.Flush()
}

func printChain(w io.Writer, ms []control.ChainMember) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "PRIORITY\tNAME\tPROGRAM\tCONTINUE-ON\tOBJECT\tMAPS")
	for _, m := range ms {
		obj := m.Object
		if m.Builtin {
			obj = "(xlb pipeline)"
		}
		maps := m.PinPath
		if len(m.Maps) > 0 {
			maps += "/{" + strings.Join(m.Maps, ",") + "}"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", m.Priority, m.Name, m.Program, strings.Join(m.ContinueOn, ","), obj, maps)
	}
	return tw.Flush()
}

// column is how `xlbctl stats` shows a per-backend figure: its heading,
// and its heading as a rate. Figures xlbd reports that are not listed
// here are shown after these, headed by their names.
type column struct {
	key, heading, rateHeading string
}

// columns are the per-backend figures in the order shown, named as
// ipvsadm names them.
var columns = []column{
	{"active", "ActiveConn", "ActiveConn"},
	{"new_conns", "Conns", "CPS"},
	{"half_open", "HalfOpen", "HalfOpen"},
	{"no_port", "NoPort", "NoPort/s"},
	{"ports_used", "PortsUsed", "PortsUsed"},
	{"ports_held", "PortsResting", "PortsResting"},
	{"port_pool", "PortPool", "PortPool"},
	{"packets_in", "InPkts", "InPPS"},
	{"packets_out", "OutPkts", "OutPPS"},
	{"bytes_in", "InBytes", "InBPS"},
	{"bytes_out", "OutBytes", "OutBPS"},
}

// figures lists the keys present in st, known ones first in their
// order, then the rest by name; each with whether it is a gauge.
func figures(st control.Stats) (keys []string, gauge map[string]bool) {
	gauge = map[string]bool{}
	var other []string
	for _, s := range st.Services {
		for _, b := range s.Backends {
			for k := range b.Gauges {
				gauge[k] = true
			}
			for k := range b.Counters {
				gauge[k] = false
			}
		}
	}
	for _, c := range columns {
		if _, ok := gauge[c.key]; ok {
			keys = append(keys, c.key)
		}
	}
	for k := range gauge {
		if !slices.ContainsFunc(columns, func(c column) bool { return c.key == k }) {
			other = append(other, k)
		}
	}
	slices.Sort(other)
	return append(keys, other...), gauge
}

func heading(key string, rate bool) string {
	for _, c := range columns {
		if c.key == key {
			if rate {
				return c.rateHeading
			}
			return c.heading
		}
	}
	if rate {
		return key + "/s"
	}
	return key
}

// value is a backend's figure as a number.
func value(b control.BackendStats, key string) float64 {
	if v, ok := b.Gauges[key]; ok {
		return float64(v)
	}
	return float64(b.Counters[key])
}

func printStats(w io.Writer, st control.Stats) error {
	keys, _ := figures(st)
	tw := newTable(w)
	head := []string{"Prot LocalAddress:Port", "Policy"}
	for _, k := range keys {
		head = append(head, heading(k, false))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t")+"\t")
	// Empty cells keep the columns aligned across this line.
	fmt.Fprintln(tw, "  -> RemoteAddress:Port\t"+strings.Repeat("\t", len(keys)+1))
	for _, s := range st.Services {
		sums := make([]string, len(keys))
		for i, k := range keys {
			var sum float64
			for _, b := range s.Backends {
				sum += value(b, k)
			}
			sums[i] = fmt.Sprintf("%.0f", sum)
		}
		fmt.Fprintf(tw, "%s  %s\t%s\t%s\t\n", protoColumn(s.Protocol), s.VIP, s.Policy, strings.Join(sums, "\t"))
		for _, b := range s.Backends {
			vals := make([]string, len(keys))
			for i, k := range keys {
				vals[i] = fmt.Sprintf("%.0f", value(b, k))
			}
			fmt.Fprintf(tw, "  -> %s\t\t%s\t\n", b.Address, strings.Join(vals, "\t"))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	p := st.Ports
	share := 0.0
	if p.Capacity > 0 {
		share = 100 * float64(p.Used+p.Held) / float64(p.Capacity)
	}
	fmt.Fprintf(w, "\nsource-port ways: %d used, %d held for backends' TIME_WAIT, of %d (%.1f%%)\n", p.Used, p.Held, p.Capacity, share)
	fmt.Fprintln(w, "counters:")
	printCounters(w, st.Counters, func(v uint64) string { return fmt.Sprint(v) }, false)
	return nil
}

// Rates are per-second rates between two readings of Stats.
type Rates struct {
	Interval float64 `json:"interval_seconds"`
	// Counters are the data path's counters per second.
	Counters map[string]float64 `json:"counters_per_second"`
	Services []ServiceRates     `json:"services"`
}

// ServiceRates are a service's backends' rates.
type ServiceRates struct {
	VIP      string         `json:"vip"`
	Protocol string         `json:"protocol"`
	Policy   string         `json:"policy"`
	Backends []BackendRates `json:"backends"`
}

// BackendRates are a backend's gauges at the second reading and its
// counters per second; a backend that was not there at the first reading
// has no rates.
type BackendRates struct {
	Address string             `json:"address"`
	Gauges  map[string]int64   `json:"gauges"`
	Rates   map[string]float64 `json:"per_second"`
}

func rates(a, b control.Stats, dt time.Duration) Rates {
	secs := dt.Seconds()
	r := Rates{Interval: secs, Counters: map[string]float64{}}
	for n, v := range b.Counters {
		r.Counters[n] = float64(v-min(v, a.Counters[n])) / secs
	}
	before := map[string]control.BackendStats{}
	for _, s := range a.Services {
		for _, bk := range s.Backends {
			before[s.VIP+"/"+s.Protocol+" "+bk.Address] = bk
		}
	}
	for _, s := range b.Services {
		sr := ServiceRates{VIP: s.VIP, Protocol: s.Protocol, Policy: s.Policy}
		for _, bk := range s.Backends {
			br := BackendRates{Address: bk.Address, Gauges: bk.Gauges}
			if old, ok := before[s.VIP+"/"+s.Protocol+" "+bk.Address]; ok {
				br.Rates = map[string]float64{}
				for k, v := range bk.Counters {
					br.Rates[k] = float64(v-min(v, old.Counters[k])) / secs
				}
			}
			sr.Backends = append(sr.Backends, br)
		}
		r.Services = append(r.Services, sr)
	}
	return r
}

func printRates(w io.Writer, r Rates) error {
	// The same columns as printStats, from the second reading.
	var st control.Stats
	for _, s := range r.Services {
		ss := control.ServiceStats{VIP: s.VIP, Protocol: s.Protocol}
		for _, b := range s.Backends {
			cb := control.BackendStats{Gauges: b.Gauges, Counters: map[string]uint64{}}
			for k := range b.Rates {
				cb.Counters[k] = 0
			}
			ss.Backends = append(ss.Backends, cb)
		}
		st.Services = append(st.Services, ss)
	}
	keys, gauge := figures(st)
	tw := newTable(w)
	head := []string{"Prot LocalAddress:Port", "Policy"}
	for _, k := range keys {
		head = append(head, heading(k, !gauge[k]))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t")+"\t")
	// Empty cells keep the columns aligned across this line.
	fmt.Fprintln(tw, "  -> RemoteAddress:Port\t"+strings.Repeat("\t", len(keys)+1))
	cell := func(b BackendRates, k string) (float64, bool) {
		if gauge[k] {
			return float64(b.Gauges[k]), true
		}
		v, ok := b.Rates[k]
		return v, ok
	}
	for _, s := range r.Services {
		sums := make([]string, len(keys))
		for i, k := range keys {
			var sum float64
			for _, b := range s.Backends {
				v, _ := cell(b, k)
				sum += v
			}
			sums[i] = formatRate(sum, gauge[k])
		}
		fmt.Fprintf(tw, "%s  %s\t%s\t%s\t\n", protoColumn(s.Protocol), s.VIP, s.Policy, strings.Join(sums, "\t"))
		for _, b := range s.Backends {
			vals := make([]string, len(keys))
			for i, k := range keys {
				if v, ok := cell(b, k); ok {
					vals[i] = formatRate(v, gauge[k])
				} else {
					vals[i] = "-"
				}
			}
			fmt.Fprintf(tw, "  -> %s\t\t%s\t\n", b.Address, strings.Join(vals, "\t"))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\ncounters per second over %.1fs:\n", r.Interval)
	printCounters(w, r.Counters, func(v float64) string { return fmt.Sprintf("%.1f", v) }, false)
	return nil
}

func formatRate(v float64, gauge bool) string {
	if gauge {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

// protoColumn is a service's protocol as ipvsadm shows it: TCP or UDP.
func protoColumn(p string) string {
	if p == "" {
		return "TCP"
	}
	return strings.ToUpper(p)
}
