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

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printProtoJSON prints an answer of xlbd in the protobuf JSON mapping,
// with the field names of control.proto and every field (64-bit numbers
// are strings there).
func printProtoJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
}

func printStatus(w io.Writer, st *controlpb.Status) {
	fmt.Fprintf(w, "interface %s (%s), source addresses %s, ports %s\n", st.GetIface(), st.GetXdpMode(), strings.Join(st.GetSourceAddresses(), ","),
		st.GetSourcePorts())
	if r := st.GetLastReload(); r != nil {
		at := r.GetAt().AsTime().Local().Format(time.DateTime)
		if r.GetOk() {
			fmt.Fprintf(w, "last reload %s: applied (took %s)\n", at, roundTook(r.GetTook()))
		} else {
			fmt.Fprintf(w, "last reload %s: failed: %s\n", at, firstLine(r.GetError()))
		}
	}
	if s := st.GetState(); s.GetPinPath() != "" {
		how := "started afresh"
		if a := s.GetAdopted(); a != nil {
			how = fmt.Sprintf("adopted at start: %d services, %d backend ids (%d retired), %d connections, addresses added: %d",
				a.GetServices(), a.GetBackendIds(), a.GetRetired(), a.GetConnections(), a.GetAddresses())
		}
		fmt.Fprintf(w, "state pinned at %s (layout %s), %s\n", s.GetPinPath(), s.GetLayout(), how)
		if s.GetVipFilter() == "" {
			fmt.Fprintln(w, "vip filter: off")
		} else {
			fmt.Fprintf(w, "vip filter: %s on %s\n", s.GetVipFilter(), strings.Join(s.GetVipFilterAddresses(), ","))
		}
	}
	tw := newTable(w)
	for _, s := range st.GetServices() {
		line := fmt.Sprintf("service %s/%s", s.GetVip(), s.GetProtocol())
		switch {
		case s.GetRemoved():
			line += "\tremoved"
		default:
			line += "\tpolicy " + s.GetPolicy() + "\thealth " + describeCheck(s.GetHealth()) + "\tall-down " + s.GetAllDown() +
				fmt.Sprintf("\tmanage-vip %v", s.GetManageVip())
			if s.GetUsingAll() {
				line += "\tEVERY BACKEND DOWN: using all"
			}
			if s.GetLive() {
				line += "\t(live)"
			}
		}
		fmt.Fprintln(tw, line)
		for _, b := range s.GetBackends() {
			since := ""
			if t := b.GetStateSince(); t != nil {
				since = " since " + t.AsTime().Local().Format(time.TimeOnly)
			}
			cols := []string{"  backend " + b.GetAddress(), b.GetState() + since, fmt.Sprintf("weight %d", b.GetWeight()),
				fmt.Sprintf("active %d", b.GetActive()), fmt.Sprintf("half-open %d", b.GetHalfOpen()), fmt.Sprintf("new/s %.1f", b.GetNewPerSec()),
				fmt.Sprintf("ports %d used %d resting of %d", b.GetPortsUsed(), b.GetPortsHeld(), b.GetPortPool()), fmt.Sprintf("refused %d", b.GetNoPort()),
				"health " + describeHealth(b.GetHealth()), "next hop: " + b.GetNextHop()}
			if b.GetState() == "removed" {
				cols = []string{"  backend " + b.GetAddress(), b.GetState() + since, fmt.Sprintf("active %d", b.GetActive()),
					fmt.Sprintf("half-open %d", b.GetHalfOpen())}
			}
			if b.GetLive() {
				cols = append(cols, "(live)")
			}
			if r := b.GetReason(); r != "" && b.GetState() != "removed" && !strings.HasPrefix(r, "health check") && r != "weight 0" {
				cols = append(cols, "("+r+")")
			}
			fmt.Fprintln(tw, strings.Join(cols, "\t"))
		}
	}
	tw.Flush()
	for _, p := range st.GetPolicies() {
		pid := "down"
		if p.GetPid() > 0 {
			pid = fmt.Sprintf("pid %d, api %d, asked %s", p.GetPid(), p.GetApiVersion(), p.GetAsked())
		}
		fmt.Fprintf(tw, "policy plugin %s\t%s\trestarts %d\t%s\n", p.GetName(), pid, p.GetRestarts(), p.GetPath())
	}
	tw.Flush()
	fmt.Fprintln(w, "counters:")
	printCounters(w, st.GetCounters(), func(v uint64) string { return fmt.Sprint(v) }, true)
}

// describeCheck is a health check's settings on one line: "http /healthz
// every 2s, timeout 1s, rise 2, fall 3", or "none".
func describeCheck(h *controlpb.HealthCheck) string {
	if h == nil || h.GetCheck() == "" || h.GetCheck() == "none" {
		return "none"
	}
	what := h.GetCheck()
	if what == "http" {
		what += " " + h.GetHttpPath()
		if h.GetHttpHost() != "" {
			what += " host " + h.GetHttpHost()
		}
		what += fmt.Sprintf(" expect %d", h.GetHttpExpectStatus())
	}
	what += fmt.Sprintf(" every %s, timeout %s, rise %d, fall %d", h.GetInterval().AsDuration(), h.GetTimeout().AsDuration(), h.GetRise(), h.GetFall())
	if h.GetResetEstablished() {
		what += ", reset-established"
	}
	return what
}

// describeHealth is a backend's check result on one line: "passing
// (connected in 1ms at 12:00:01)", "failing since 12:00:05 (HTTP 503, want
// 200)", or "none".
func describeHealth(h *controlpb.Health) string {
	if h == nil || h.GetResult() == "none" || h.GetResult() == "" {
		return "none"
	}
	out := h.GetResult()
	if t := h.GetSince(); t != nil && h.GetResult() != "unchecked" {
		out += " since " + t.AsTime().Local().Format(time.TimeOnly)
	}
	if last := h.GetLastResult(); last != "" {
		out += " (last: " + last
		if t := h.GetLastCheck(); t != nil {
			out += " at " + t.AsTime().Local().Format(time.TimeOnly)
		}
		out += ")"
	}
	return out
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

func printConns(w io.Writer, cs []*controlpb.Conn) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "PROTO\tCLIENT\tVIP\tSOURCE\tBACKEND\tSTATE\tIDLE")
	for _, x := range cs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.GetProtocol(), x.GetClient(), x.GetVip(), x.GetSource(), x.GetBackend(), x.GetState(),
			time.Duration(x.GetIdleMs())*time.Millisecond)
	}
	return tw.Flush()
}

func printChain(w io.Writer, ms []*controlpb.ChainMember) error {
	tw := newTable(w)
	fmt.Fprintln(tw, "PRIORITY\tNAME\tPROGRAM\tCONTINUE-ON\tOBJECT\tMAPS\tLIVE")
	for _, m := range ms {
		obj := m.GetObject()
		if m.GetBuiltin() {
			obj = "(xlb pipeline)"
		}
		maps := m.GetPinPath()
		if len(m.GetMaps()) > 0 {
			maps += "/{" + strings.Join(m.GetMaps(), ",") + "}"
		}
		liveMark := ""
		if m.GetLive() {
			liveMark = "live"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", m.GetPriority(), m.GetName(), m.GetProgram(), strings.Join(m.GetContinueOn(), ","), obj, maps,
			liveMark)
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
func figures(st *controlpb.Stats) (keys []string, gauge map[string]bool) {
	gauge = map[string]bool{}
	var other []string
	for _, s := range st.GetServices() {
		for _, b := range s.GetBackends() {
			for k := range b.GetGauges() {
				gauge[k] = true
			}
			for k := range b.GetCounters() {
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
func value(b *controlpb.BackendStats, key string) float64 {
	if v, ok := b.GetGauges()[key]; ok {
		return float64(v)
	}
	return float64(b.GetCounters()[key])
}

func printStats(w io.Writer, st *controlpb.Stats) error {
	keys, _ := figures(st)
	tw := newTable(w)
	head := []string{"Prot LocalAddress:Port", "Policy"}
	for _, k := range keys {
		head = append(head, heading(k, false))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t")+"\t")
	// Empty cells keep the columns aligned across this line.
	fmt.Fprintln(tw, "  -> RemoteAddress:Port\t"+strings.Repeat("\t", len(keys)+1))
	for _, s := range st.GetServices() {
		sums := make([]string, len(keys))
		for i, k := range keys {
			var sum float64
			for _, b := range s.GetBackends() {
				sum += value(b, k)
			}
			sums[i] = fmt.Sprintf("%.0f", sum)
		}
		fmt.Fprintf(tw, "%s  %s\t%s\t%s\t\n", protoColumn(s.GetProtocol()), s.GetVip(), s.GetPolicy(), strings.Join(sums, "\t"))
		for _, b := range s.GetBackends() {
			vals := make([]string, len(keys))
			for i, k := range keys {
				vals[i] = fmt.Sprintf("%.0f", value(b, k))
			}
			fmt.Fprintf(tw, "  -> %s\t\t%s\t\n", b.GetAddress(), strings.Join(vals, "\t"))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	p := st.GetPorts()
	share := 0.0
	if p.GetCapacity() > 0 {
		share = 100 * float64(p.GetUsed()+p.GetHeld()) / float64(p.GetCapacity())
	}
	fmt.Fprintf(w, "\nsource-port ways: %d used, %d held for backends' TIME_WAIT, of %d (%.1f%%)\n", p.GetUsed(), p.GetHeld(), p.GetCapacity(), share)
	fmt.Fprintln(w, "counters:")
	printCounters(w, st.GetCounters(), func(v uint64) string { return fmt.Sprint(v) }, false)
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

func rates(a, b *controlpb.Stats, dt time.Duration) Rates {
	secs := dt.Seconds()
	r := Rates{Interval: secs, Counters: map[string]float64{}}
	for n, v := range b.GetCounters() {
		r.Counters[n] = float64(v-min(v, a.GetCounters()[n])) / secs
	}
	before := map[string]*controlpb.BackendStats{}
	for _, s := range a.GetServices() {
		for _, bk := range s.GetBackends() {
			before[s.GetVip()+"/"+s.GetProtocol()+" "+bk.GetAddress()] = bk
		}
	}
	for _, s := range b.GetServices() {
		sr := ServiceRates{VIP: s.GetVip(), Protocol: s.GetProtocol(), Policy: s.GetPolicy()}
		for _, bk := range s.GetBackends() {
			br := BackendRates{Address: bk.GetAddress(), Gauges: bk.GetGauges()}
			if old, ok := before[s.GetVip()+"/"+s.GetProtocol()+" "+bk.GetAddress()]; ok {
				br.Rates = map[string]float64{}
				for k, v := range bk.GetCounters() {
					br.Rates[k] = float64(v-min(v, old.GetCounters()[k])) / secs
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
	st := &controlpb.Stats{}
	for _, s := range r.Services {
		ss := &controlpb.ServiceStats{Vip: s.VIP, Protocol: s.Protocol}
		for _, b := range s.Backends {
			cb := &controlpb.BackendStats{Gauges: b.Gauges, Counters: map[string]uint64{}}
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
