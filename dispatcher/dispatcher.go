// Package dispatcher loads xlb's XDP pipeline (a dispatcher program that
// tail-calls the parse, conntrack, select and rewrite stages), owns its
// program array and maps, attaches it to an interface and gives the control
// plane typed access to its maps.
//
// It needs Linux 6.1 or later with BTF, bpf_fib_lookup, bpf_jiffies64,
// 32-bit atomics and mmapable arrays; it is developed and tested on 6.18.
package dispatcher

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Stage is a slot of the program array (enum xlb_stage in
// programs/include/xlb_consts.h).
type Stage = xlbXlbStage

// The stage slots.
const (
	StageParse     = xlbXlbStageXLB_STAGE_PARSE
	StageConntrack = xlbXlbStageXLB_STAGE_CONNTRACK
	StageSelect    = xlbXlbStageXLB_STAGE_SELECT
	StageRewrite   = xlbXlbStageXLB_STAGE_REWRITE
	// The IPv6 stages (parse is shared).
	StageConntrack6 = xlbXlbStageXLB_STAGE_CONNTRACK6
	StageSelect6    = xlbXlbStageXLB_STAGE_SELECT6
	StageRewrite6   = xlbXlbStageXLB_STAGE_REWRITE6
	numStages       = xlbXlbStageXLB_STAGE_MAX
)

// Mode is how the select stage indexes a service's selection table.
type Mode uint8

// The selection modes (enum xlb_sel_mode).
const (
	ModeRandom     = Mode(xlbXlbSelModeXLB_SEL_RANDOM)
	ModeHash       = Mode(xlbXlbSelModeXLB_SEL_HASH)
	ModeLeastConn  = Mode(xlbXlbSelModeXLB_SEL_LEAST_CONN)
	ModeRoundRobin = Mode(xlbXlbSelModeXLB_SEL_ROUND_ROBIN)
)

func (m Mode) String() string {
	switch m {
	case ModeRandom:
		return "random"
	case ModeHash:
		return "hash"
	case ModeLeastConn:
		return "least-conn"
	case ModeRoundRobin:
		return "round-robin"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Limits of the data path's maps (enum xlb_limit).
const (
	MaxServices   = int(xlbXlbLimitXLB_MAX_SERVICES)
	MaxBackends   = int(xlbXlbLimitXLB_MAX_BACKENDS)
	MaxTable      = int(xlbXlbLimitXLB_MAX_SEL_TABLE)  // selection table entries
	MaxCandidates = int(xlbXlbLimitXLB_MAX_CANDIDATES) // least-conn candidate set
	MaxSources    = int(xlbXlbLimitXLB_MAX_SOURCES)    // source addresses
	// PortWays is how many backends can hold the same source port of
	// one source address at once: a backend always uses the way its
	// hash picks.
	PortWays = int(xlbXlbLimitXLB_PORT_WAYS)
)

const (
	portWaysLog2 = uint32(xlbXlbLimitXLB_PORT_WAYS_LOG2)
	ctWays       = uint32(xlbXlbLimitXLB_CT_WAYS)
	srcSlots     = uint32(xlbXlbLimitXLB_SRC_SLOTS)
	xlbVipMulti  = uint32(xlbXlbLimitXLB_VIP_MULTI)
)

// Errors returned by Pipeline methods.
var (
	ErrBadTable   = errors.New("bad selection table")
	ErrOutOfRange = errors.New("id out of range")
)

// Options tune Load.
type Options struct {
	// ConntrackSize is how many connections the table is sized for; it
	// gets twice as many slots, rounded up to a power of two, so that a
	// flow's 8-slot window is rarely full (a full window evicts its least
	// recently seen connection). 0 means 131072.
	ConntrackSize uint32
	// PortLo and PortHi are the source-port range the return table is
	// sized for (PortWays entries per port and source address); zero
	// keeps the compiled-in 10000-32767. SetSettings must use the same
	// range.
	PortLo, PortHi uint16
	// Sources is how many IPv4 source addresses the return table is
	// sized for, 1 to MaxSources; 0 means 1.
	Sources int
	// Sources6 is how many IPv6 source addresses the IPv6 return table
	// is sized for, 0 to MaxSources. With 0 the IPv6 tables are not
	// sized (a few entries) and no IPv6 service can be set; otherwise
	// the IPv6 connection table is sized as the IPv4 one (ConntrackSize).
	Sources6 int

	// PinPath, when set, is a bpffs directory where every map is pinned
	// (see pin.go), so the data path outlives the process.
	PinPath string
	// Adopt takes the maps pinned under PinPath by an earlier run instead
	// of creating them; ReadPinned must have found them and the sizes above
	// must be theirs. The ISN and cookie secrets are read back from the
	// pinned settings.
	Adopt bool

	// noTraffic leaves each backend's traffic uncounted, for the
	// benchmark that measures what counting costs.
	noTraffic bool
}

// Pipeline holds the loaded programs and maps. The program array is held
// for the Pipeline's lifetime (the kernel empties an unreferenced one).
type Pipeline struct {
	objs      xlbObjects
	spec      *ebpf.CollectionSpec
	owner     *ebpf.Map   // xlb_bk_owner
	pinPath   string      // "" when nothing is pinned
	adopted   bool        // the maps are an earlier run's
	oldProgs  []*ebpf.Map // program arrays pinned by an earlier run, held until Attach
	bkStats   []byte      // mmap of xlb_bk_stats
	t4, t6    table       // the IPv4 and IPv6 connection tables and port ways
	portLo    uint16
	nports    uint32
	sources   int       // IPv4 source addresses SetSettings wrote
	sources6  int       // IPv6 source addresses SetSettings wrote
	keys      [4]uint32 // the ISN and cookie secrets, drawn at load
	statNames []string
	tick      time.Duration // one jiffy: the data path's clock unit
}

// ConntrackSlots is the number of slots of the connection table Load
// makes for Options.ConntrackSize connections (of each family's table).
func ConntrackSlots(size uint32) uint32 {
	if size == 0 {
		size = 131072
	}
	return max(uint32(1)<<bits.Len32(2*size-1), ctWays)
}

// Load loads the pipeline into the kernel and fills its program array.
func Load(opts Options) (_ *Pipeline, err error) {
	spec, err := loadXlb()
	if err != nil {
		return nil, fmt.Errorf("load pipeline spec: %w", err)
	}
	slots := ConntrackSlots(opts.ConntrackSize)
	spec.Maps["xlb_conns"].MaxEntries = slots
	if opts.PortLo == 0 && opts.PortHi == 0 {
		opts.PortLo, opts.PortHi = 10000, 32767
	}
	if opts.PortLo == 0 || opts.PortHi < opts.PortLo {
		return nil, fmt.Errorf("source ports %d-%d: bad range", opts.PortLo, opts.PortHi)
	}
	nports := uint32(opts.PortHi) - uint32(opts.PortLo) + 1
	if opts.Sources == 0 {
		opts.Sources = 1
	}
	if opts.Sources < 0 || opts.Sources > MaxSources {
		return nil, fmt.Errorf("%d source addresses: want 1 to %d", opts.Sources, MaxSources)
	}
	if opts.Sources6 < 0 || opts.Sources6 > MaxSources {
		return nil, fmt.Errorf("%d IPv6 source addresses: want 0 to %d", opts.Sources6, MaxSources)
	}
	nsrc, nsrc6 := uint32(opts.Sources), uint32(opts.Sources6)
	spec.Maps["xlb_ports"].MaxEntries = nsrc * nports * uint32(PortWays)
	spec.Maps["xlb_ct_busy"].MaxEntries = (slots + 63) / 64
	spec.Maps["xlb_port_busy"].MaxEntries = (nsrc*nports*uint32(PortWays) + 63) / 64
	slots6 := spec.Maps["xlb_conns6"].MaxEntries // a few, unless sized
	if nsrc6 > 0 {
		slots6 = slots
		spec.Maps["xlb_conns6"].MaxEntries = slots
		spec.Maps["xlb_ports6"].MaxEntries = nsrc6 * nports * uint32(PortWays)
		spec.Maps["xlb_ct6_busy"].MaxEntries = (slots + 63) / 64
		spec.Maps["xlb_port6_busy"].MaxEntries = (nsrc6*nports*uint32(PortWays) + 63) / 64
	}
	if opts.noTraffic {
		if err := spec.Variables["xlb_count_traffic"].Set(uint32(0)); err != nil {
			return nil, fmt.Errorf("turn traffic counting off: %w", err)
		}
	}
	names, err := statNames(spec.Types)
	if err != nil {
		return nil, err
	}
	tick, err := jiffy()
	if err != nil {
		return nil, err
	}
	p := &Pipeline{statNames: names, tick: tick, portLo: opts.PortLo, nports: nports, spec: spec, pinPath: opts.PinPath,
		t4: table{layout: &layout4, ctMask: slots - 1, nsrc: nsrc, nports: nports, portLo: opts.PortLo},
		t6: table{layout: &layout6, ctMask: slots6 - 1, nsrc: nsrc6, nports: nports, portLo: opts.PortLo},
	}
	var adopted map[string]*ebpf.Map
	if opts.Adopt {
		if opts.PinPath == "" {
			return nil, errors.New("load pipeline: adopt without a pin path")
		}
		if adopted, err = adoptMaps(spec, opts.PinPath); err != nil {
			return nil, err
		}
		defer func() {
			for _, m := range adopted {
				m.Close() // the collection holds clones
			}
		}()
		if p.owner, err = ebpf.LoadPinnedMap(filepath.Join(opts.PinPath, ownerMap), nil); err != nil {
			return nil, fmt.Errorf("adopt map %s: %w", ownerMap, err)
		}
		p.adopted = true
	} else if p.owner, err = ebpf.NewMap(ownerSpec()); err != nil {
		return nil, fmt.Errorf("create map %s: %w", ownerMap, err)
	}
	if err := spec.LoadAndAssign(&p.objs, &ebpf.CollectionOptions{MapReplacements: adopted}); err != nil {
		p.owner.Close()
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load pipeline: %+v", verr)
		}
		return nil, fmt.Errorf("load pipeline: %w", err)
	}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if err := p.secrets(); err != nil {
		return nil, err
	}
	for slot := range numStages {
		prog := p.Stage(slot)
		if err := p.objs.XlbProgs.Put(uint32(slot), prog); err != nil {
			return nil, fmt.Errorf("put stage %d in program array: %w", slot, err)
		}
	}
	size := int(p.objs.XlbBkStats.MaxEntries()) * int(unsafe.Sizeof(xlbXlbBackendStats{}))
	p.bkStats, err = unix.Mmap(p.objs.XlbBkStats.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap backend stats: %w", err)
	}
	for _, m := range []struct {
		m    *ebpf.Map
		to   *[]byte
		size uintptr
		name string
	}{
		{p.objs.XlbPorts, &p.t4.ports, layout4.portSize, "source ports"},
		{p.objs.XlbConns, &p.t4.conns, layout4.connSize, "connection table"},
		{p.objs.XlbCtBusy, &p.t4.ctBusy, 8, "connection table bitmap"},
		{p.objs.XlbPortBusy, &p.t4.portBusy, 8, "source port bitmap"},
		{p.objs.XlbPorts6, &p.t6.ports, layout6.portSize, "IPv6 source ports"},
		{p.objs.XlbConns6, &p.t6.conns, layout6.connSize, "IPv6 connection table"},
		{p.objs.XlbCt6Busy, &p.t6.ctBusy, 8, "IPv6 connection table bitmap"},
		{p.objs.XlbPort6Busy, &p.t6.portBusy, 8, "IPv6 source port bitmap"},
	} {
		*m.to, err = unix.Mmap(m.m.FD(), 0, int(m.m.MaxEntries())*int(m.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return nil, fmt.Errorf("mmap %s: %w", m.name, err)
		}
	}
	if p.pinPath != "" {
		if err := p.pin(adopted); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// secrets draws the ISN and cookie secrets, or reads them back: from the
// adopted settings (a restart keeping the data path must not change the
// ISNs that running connections' ports will be reused with, nor the
// cookies in flight), else from the secrets pin an earlier pipeline left
// under the pin path. The pin outlives a full stop (RemovePins leaves it):
// a backend holds TIME_WAIT for 60 s on each four-tuple the last xlbd
// used, and accepts a new SYN on one only if its sequence number lies
// after the old connection's; with the same secret the clock-driven ISN
// does (RFC 6528), with a new one half of them would not, and each such
// connection would wait for the client's SYN retransmissions. See
// SecretsPin.
func (p *Pipeline) secrets() error {
	if p.adopted {
		var v xlbXlbCfg
		if err := p.objs.XlbSettings.Lookup(uint32(0), &v); err != nil {
			return fmt.Errorf("read pinned secrets: %w", err)
		}
		p.keys = [4]uint32{v.IsnKey[0], v.IsnKey[1], v.CookieKey[0], v.CookieKey[1]}
		return p.keepSecrets(true)
	}
	if p.pinPath != "" {
		keys, err := ReadSecrets(p.pinPath)
		if err == nil {
			p.keys = keys
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	var seed [16]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return fmt.Errorf("draw secrets: %w", err)
	}
	for i := range p.keys {
		p.keys[i] = binary.LittleEndian.Uint32(seed[4*i:])
	}
	return p.keepSecrets(false)
}

// keepSecrets pins p.keys as SecretsPin under the pin path, unless there
// is no pin path or (onlyIfMissing) a secrets pin is there already.
func (p *Pipeline) keepSecrets(onlyIfMissing bool) error {
	if p.pinPath == "" {
		return nil
	}
	path := filepath.Join(p.pinPath, SecretsPin)
	if _, err := os.Stat(path); err == nil && onlyIfMissing {
		return nil
	}
	if err := os.MkdirAll(p.pinPath, 0o700); err != nil {
		return fmt.Errorf("create pin directory: %w", err)
	}
	m, err := ebpf.NewMap(secretsSpec())
	if err != nil {
		return fmt.Errorf("create map %s: %w", SecretsPin, err)
	}
	defer m.Close()
	if err := m.Put(uint32(0), p.keys); err != nil {
		return fmt.Errorf("write %s: %w", SecretsPin, err)
	}
	return pinReplace(m, path)
}

// Close releases the programs and maps. An attachment made from the
// pipeline must be closed first or it keeps the programs alive. What is
// pinned stays (Unpin removes it).
func (p *Pipeline) Close() error {
	for _, m := range []*[]byte{&p.bkStats, &p.t4.ports, &p.t4.conns, &p.t4.ctBusy, &p.t4.portBusy,
		&p.t6.ports, &p.t6.conns, &p.t6.ctBusy, &p.t6.portBusy} {
		if *m != nil {
			unix.Munmap(*m)
			*m = nil
		}
	}
	if len(p.oldProgs) > 0 {
		// Never put in force: the link still runs the pinned array.
		_ = os.Remove(filepath.Join(p.pinPath, progsNext))
	}
	for _, m := range p.oldProgs {
		m.Close()
	}
	p.oldProgs = nil
	if p.owner != nil {
		p.owner.Close()
		p.owner = nil
	}
	return p.objs.Close()
}

// Entry is the program to attach: the dispatcher.
func (p *Pipeline) Entry() *ebpf.Program { return p.objs.XlbDispatch }

// Stage returns a stage's program, for tests that run one stage alone.
func (p *Pipeline) Stage(s Stage) *ebpf.Program {
	switch s {
	case StageParse:
		return p.objs.XlbParse
	case StageConntrack:
		return p.objs.XlbConntrack
	case StageSelect:
		return p.objs.XlbSelect
	case StageRewrite:
		return p.objs.XlbRewrite
	case StageConntrack6:
		return p.objs.XlbConntrack6
	case StageSelect6:
		return p.objs.XlbSelect6
	case StageRewrite6:
		return p.objs.XlbRewrite6
	}
	return nil
}

// ProgArray is the stage program array, for chaining and tests.
func (p *Pipeline) ProgArray() *ebpf.Map { return p.objs.XlbProgs }

// Timeouts are the idle timeouts per TCP state, and the source ports'
// hold.
type Timeouts struct {
	// SYN applies to half-open connections: the client's SYN seen, and
	// maybe the backend's SYN-ACK, but not the client's ACK of it.
	SYN         time.Duration
	Established time.Duration
	FIN         time.Duration
	Closed      time.Duration
	// UDP applies to UDP flows.
	UDP time.Duration
	// TimeWait is how long a source port rests after its connection
	// ended before another connection may take it; 0 means 2s. The
	// backend-side ISN makes a backend still in TIME_WAIT for the port
	// accept the next connection, so the hold only has to outlast the
	// last packets of the old connection.
	TimeWait time.Duration
}

func (t Timeouts) hold() time.Duration {
	if t.TimeWait <= 0 {
		return 2 * time.Second
	}
	return t.TimeWait
}

func (t Timeouts) byState(s uint32) time.Duration {
	switch s {
	case uint32(xlbXlbCtStateXLB_CT_SYN), uint32(xlbXlbCtStateXLB_CT_SYN_RECV):
		return t.SYN
	case uint32(xlbXlbCtStateXLB_CT_ESTABLISHED):
		return t.Established
	case uint32(xlbXlbCtStateXLB_CT_FIN):
		return t.FIN
	case uint32(xlbXlbCtStateXLB_CT_UDP):
		return t.UDP
	}
	return t.Closed
}

// SYNMode is the SYN flood defence's mode (enum xlb_syn_mode).
type SYNMode uint32

// The SYN flood defence's modes.
const (
	// SYNOff never challenges a SYN.
	SYNOff = SYNMode(xlbXlbSynModeXLB_SYN_OFF)
	// SYNAuto challenges SYNs from sources not validated recently while
	// the chosen backend has at least SYNDefence.HalfOpen half-open
	// connections.
	SYNAuto = SYNMode(xlbXlbSynModeXLB_SYN_AUTO)
	// SYNOn always challenges SYNs from sources not validated recently.
	SYNOn = SYNMode(xlbXlbSynModeXLB_SYN_ON)
)

// SYNDefence configures the SYN flood defence (programs/include/xlb_syn.h).
type SYNDefence struct {
	Mode SYNMode
	// HalfOpen is the number of half-open connections of a backend from
	// which SYNAuto challenges; 0 means 1000.
	HalfOpen uint32
	// TrustFor is how long a source that answered a challenge skips
	// further ones; 0 means 10 minutes.
	TrustFor time.Duration
}

// Settings are the data path's runtime settings.
type Settings struct {
	// SourceAddresses are the IPv4 addresses used towards IPv4
	// backends, by index (SetService names them by index): 1 to
	// Options.Sources.
	SourceAddresses []netip.Addr
	// SourceAddresses6 are the IPv6 addresses used towards IPv6
	// backends: 0 to Options.Sources6.
	SourceAddresses6 []netip.Addr
	PortLo, PortHi   uint16 // source port range, inclusive
	ConntrackTimeout Timeouts
	SYN              SYNDefence
}

// NextHopTTL is how long a next hop from bpf_fib_lookup is used before
// the data path asks the FIB again.
const NextHopTTL = time.Second

// jiffy returns the kernel's tick, the unit of bpf_jiffies64: the
// resolution of the coarse clocks is exactly one tick.
func jiffy() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGetres(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		return 0, fmt.Errorf("read the kernel tick: %w", err)
	}
	d := time.Duration(ts.Nano())
	if d <= 0 || d > 100*time.Millisecond {
		return 0, fmt.Errorf("read the kernel tick: implausible %v", d)
	}
	return d, nil
}

// jiffies converts a duration to ticks, rounding up.
func (p *Pipeline) jiffies(d time.Duration) uint64 {
	return uint64((d + p.tick - 1) / p.tick)
}

// now reads the data path's clock (bpf_jiffies64) by running xlb_clock.
func (p *Pipeline) now() (uint64, error) {
	if _, err := p.objs.XlbClock.Run(&ebpf.RunOptions{Data: make([]byte, 64)}); err != nil {
		return 0, fmt.Errorf("read data path clock: %w", err)
	}
	var j uint64
	if err := p.objs.XlbNow.Lookup(uint32(0), &j); err != nil {
		return 0, fmt.Errorf("read data path clock: %w", err)
	}
	return j, nil
}

// isnPerSecond is the ISN clock's rate: about 4 per microsecond, as
// RFC 6528 suggests and Linux uses (a wrap in about 4.5 minutes).
const isnPerSecond = 1 << 22

// SetSettings writes the runtime settings.
func (p *Pipeline) SetSettings(s Settings) error {
	if n := len(s.SourceAddresses); n == 0 || uint32(n) > p.t4.nsrc {
		return fmt.Errorf("%d IPv4 source addresses: the pipeline was loaded for 1 to %d", n, p.t4.nsrc)
	}
	if n := len(s.SourceAddresses6); uint32(n) > p.t6.nsrc {
		return fmt.Errorf("%d IPv6 source addresses: the pipeline was loaded for 0 to %d", n, p.t6.nsrc)
	}
	srcs, mult, slots, err := sourceTable(s.SourceAddresses, false)
	if err != nil {
		return err
	}
	srcs6, mult6, slots6, err := sourceTable(s.SourceAddresses6, true)
	if err != nil {
		return err
	}
	if s.PortLo != p.portLo || uint32(s.PortHi)-uint32(s.PortLo)+1 != p.nports || s.PortHi < s.PortLo {
		return fmt.Errorf("source ports %d-%d: the pipeline was loaded for %d-%d", s.PortLo, s.PortHi,
			p.portLo, uint32(p.portLo)+p.nports-1)
	}
	switch s.SYN.Mode {
	case SYNOff, SYNAuto, SYNOn:
	default:
		return fmt.Errorf("syn defence mode %d: unknown", s.SYN.Mode)
	}
	halfOpen := s.SYN.HalfOpen
	if halfOpen == 0 {
		halfOpen = 1000
	}
	trust := s.SYN.TrustFor
	if trust <= 0 {
		trust = 10 * time.Minute
	}
	v := xlbXlbCfg{
		PortLo:      s.PortLo,
		PortHi:      s.PortHi,
		Nports:      p.nports,
		CtMask:      p.t4.ctMask,
		Ct6Mask:     p.t6.ctMask,
		Src0:        word(srcs[0], 0),
		SrcMult:     mult,
		Src6Mult:    mult6,
		IsnKey:      [2]uint32{p.keys[0], p.keys[1]},
		CookieKey:   [2]uint32{p.keys[2], p.keys[3]},
		IsnPerJ:     uint32(isnPerSecond * p.tick / time.Second),
		HoldJ:       uint32(p.jiffies(s.ConntrackTimeout.hold())),
		SynMode:     uint32(s.SYN.Mode),
		SynHalfOpen: halfOpen,
		SynOkJ:      uint32(p.jiffies(trust)),
		CookieShift: uint32(bits.Len64(p.jiffies(time.Second))),
		NhTtlJ:      p.jiffies(NextHopTTL),
	}
	if len(srcs6) > 0 {
		v.Src60 = words6(srcs6[0])
	}
	for st := range v.TimeoutJ {
		v.TimeoutJ[st] = p.jiffies(s.ConntrackTimeout.byState(uint32(st)))
	}
	for i, a := range srcs {
		if err := p.objs.XlbSrc.Put(uint32(i), word(a, 0)); err != nil {
			return fmt.Errorf("write source address %d: %w", i, err)
		}
	}
	for i, a := range srcs6 {
		if err := p.objs.XlbSrc6.Put(uint32(i), &xlbXlbSrc6Slot{Addr: words6(a), Idx: uint32(i) + 1}); err != nil {
			return fmt.Errorf("write IPv6 source address %d: %w", i, err)
		}
	}
	for k := range srcSlots {
		var (
			v4 xlbXlbSrcSlot
			v6 xlbXlbSrc6Slot
		)
		if i := slots[k]; i > 0 {
			v4 = xlbXlbSrcSlot{Addr: word(srcs[i-1], 0), Idx: i}
		}
		if i := slots6[k]; i > 0 {
			v6 = xlbXlbSrc6Slot{Addr: words6(srcs6[i-1]), Idx: i}
		}
		if err := p.objs.XlbSrcSlots.Put(k, &v4); err != nil {
			return fmt.Errorf("write source address slot %d: %w", k, err)
		}
		if err := p.objs.XlbSrc6Slots.Put(k, &v6); err != nil {
			return fmt.Errorf("write IPv6 source address slot %d: %w", k, err)
		}
	}
	if err := p.objs.XlbSettings.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	p.sources, p.sources6 = len(srcs), len(srcs6)
	return nil
}

// sourceTable checks a family's source addresses and places them in the
// slots the data path finds them by (source_index(), source_index6()):
// slot (key * mult) >> 26 holds index + 1, key being the address's word,
// or its addr6_fold(). One address needs no slots (mult 0: the data path
// compares the first address directly).
func sourceTable(addrs []netip.Addr, v6 bool) (raw [][]byte, mult uint32, slots []uint32, err error) {
	family := "IPv4"
	if v6 {
		family = "IPv6"
	}
	keys := make([]uint32, 0, len(addrs))
	for _, a := range addrs {
		if a.Is4() == v6 || a.Is4In6() {
			return nil, 0, nil, fmt.Errorf("source address %s: not %s", a, family)
		}
		b := a.AsSlice()
		for _, o := range raw {
			if string(o) == string(b) {
				return nil, 0, nil, fmt.Errorf("source address %s: listed twice", a)
			}
		}
		raw = append(raw, b)
		keys = append(keys, hashWord(b))
	}
	slots = make([]uint32, srcSlots)
	if len(keys) < 2 {
		return raw, 0, slots, nil
	}
	for mult = 0x9e3779b1; mult != 0x9e3779b1+2*4096; mult += 2 {
		clear(slots)
		ok := true
		for i, k := range keys {
			n := (k * mult) >> 26
			if slots[n] != 0 {
				ok = false
				break
			}
			slots[n] = uint32(i) + 1
		}
		if ok {
			return raw, mult, slots, nil
		}
	}
	return nil, 0, nil, fmt.Errorf("%d %s source addresses: no collision-free slots", len(addrs), family)
}

// words6 is an IPv6 address's bytes as the data path's four words.
func words6(b []byte) [4]uint32 { return [4]uint32{word(b, 0), word(b, 1), word(b, 2), word(b, 3)} }

// Protocols a service may balance.
const (
	TCP = unix.IPPROTO_TCP
	UDP = unix.IPPROTO_UDP
)

// SetService maps a VIP and protocol (TCP or UDP) to a service id whose
// connections use the source addresses of the given indexes (into
// Settings.SourceAddresses, or SourceAddresses6 for an IPv6 VIP).
func (p *Pipeline) SetService(id uint32, vip netip.AddrPort, proto uint8, sources []int) error {
	if id >= uint32(MaxServices) {
		return fmt.Errorf("service %d: %w", id, ErrOutOfRange)
	}
	if proto != TCP && proto != UDP {
		return fmt.Errorf("vip %s: protocol %d is neither TCP nor UDP", vip, proto)
	}
	have := p.sources
	if v6 := !vip.Addr().Is4(); v6 {
		if vip.Addr().Is4In6() || !vip.Addr().Is6() {
			return fmt.Errorf("vip %s: neither IPv4 nor IPv6", vip)
		}
		have = p.sources6
	}
	var mask uint32
	for _, i := range sources {
		if i < 0 || i >= have {
			return fmt.Errorf("service %s: source address %d: %w", vip, i, ErrOutOfRange)
		}
		mask |= 1 << i
	}
	if mask == 0 {
		return fmt.Errorf("service %s: no source address", vip)
	}
	if err := p.objs.XlbSvcSrc.Put(id, mask); err != nil {
		return fmt.Errorf("write source addresses of service %s: %w", vip, err)
	}
	var err error
	if vip.Addr().Is4() {
		k := vipKey(vip, proto)
		err = p.objs.XlbServices.Put(&k, &xlbXlbService{Id: id})
	} else {
		k := vipKey6(vip, proto)
		err = p.objs.XlbServices6.Put(&k, &xlbXlbService{Id: id})
	}
	if err != nil {
		return fmt.Errorf("write service %s: %w", vip, err)
	}
	return p.syncVIPPort(vip, proto)
}

// DeleteService removes a VIP's service of a protocol. Existing
// connections keep flowing.
func (p *Pipeline) DeleteService(vip netip.AddrPort, proto uint8) error {
	var err error
	if vip.Addr().Is4() {
		k := vipKey(vip, proto)
		err = p.objs.XlbServices.Delete(&k)
	} else {
		k := vipKey6(vip, proto)
		err = p.objs.XlbServices6.Delete(&k)
	}
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %s: %w", vip, err)
	}
	return p.syncVIPPort(vip, proto)
}

// syncVIPPort rewrites the xlb_vip_ports (or xlb_vip_ports6) entry of the
// VIP's port from xlb_services (xlb_services6): none, the one VIP using
// it (its service found without a hash lookup), or XLB_VIP_MULTI.
func (p *Pipeline) syncVIPPort(vip netip.AddrPort, proto uint8) error {
	type use struct {
		addr netip.Addr
		id   uint32
	}
	var (
		uses []use
		v    xlbXlbService
		err  error
	)
	port := vip.Port()
	if vip.Addr().Is4() {
		var k xlbXlbVip
		it := p.objs.XlbServices.Iterate()
		for it.Next(&k, &v) {
			if k.Port == portBE(port) && k.Proto == proto {
				uses = append(uses, use{addrFromBE(k.Addr), v.Id})
			}
		}
		err = it.Err()
	} else {
		var k xlbXlbVip6
		it := p.objs.XlbServices6.Iterate()
		for it.Next(&k, &v) {
			if k.Port == portBE(port) && k.Proto == proto {
				uses = append(uses, use{addr6FromWords(k.Addr), v.Id})
			}
		}
		err = it.Err()
	}
	if err != nil {
		return fmt.Errorf("read services: %w", err)
	}
	var svc uint32
	var addr netip.Addr
	switch len(uses) {
	case 0:
	case 1:
		svc, addr = uses[0].id+1, uses[0].addr
	default:
		svc = xlbVipMulti
	}
	key := uint32(port)
	if proto == UDP {
		key |= 0x10000 // vip_port_key() in programs/include/xlb_common.h
	}
	if vip.Addr().Is4() {
		entry := xlbXlbVipPort{Svc: svc}
		if addr.IsValid() {
			entry.Addr = addrBE(addr)
		}
		err = p.objs.XlbVipPorts.Put(key, &entry)
	} else {
		entry := xlbXlbVipPort6{Svc: svc}
		if addr.IsValid() {
			entry.Addr = words6(addr.AsSlice())
		}
		err = p.objs.XlbVipPorts6.Put(key, &entry)
	}
	if err != nil {
		return fmt.Errorf("write vip port %d: %w", port, err)
	}
	return nil
}

// SetBackend writes a backend's address and weight, in its family's
// table (the other family's entry of the id is cleared). Weight 0 makes
// it unselectable; its established connections keep flowing.
func (p *Pipeline) SetBackend(id uint32, addr netip.AddrPort, weight uint16) error {
	if id >= uint32(MaxBackends) {
		return fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	a := addr.Addr()
	if a.Is4In6() || (!a.Is4() && !a.Is6()) || a.Zone() != "" {
		return fmt.Errorf("backend %s: neither IPv4 nor IPv6", addr)
	}
	var v4 xlbXlbBackend
	var v6 xlbXlbBackend6
	if a.Is4() {
		v4 = xlbXlbBackend{Addr: addrBE(a), Port: portBE(addr.Port()), Weight: weight}
	} else {
		v6 = xlbXlbBackend6{Addr: words6(a.AsSlice()), Port: portBE(addr.Port()), Weight: weight}
	}
	// The family the backend is not in first: a packet never finds the
	// id in both.
	first, second := func() error { return p.objs.XlbBackends6.Put(id, &v6) }, func() error { return p.objs.XlbBackends.Put(id, &v4) }
	if !a.Is4() {
		first, second = second, first
	}
	if err := first(); err != nil {
		return fmt.Errorf("write backend %s: %w", addr, err)
	}
	if err := second(); err != nil {
		return fmt.Errorf("write backend %s: %w", addr, err)
	}
	return nil
}

// BackendStats are a backend's connection counts as the data path keeps them.
type BackendStats struct {
	Active   int64  // open connections
	HalfOpen int64  // connections whose handshake is not complete
	NewConns uint64 // connections created, ever
	NoPort   uint64 // SYNs refused for want of a free source port, ever
}

func (p *Pipeline) bkStat(id uint32) *xlbXlbBackendStats {
	off := uintptr(id) * unsafe.Sizeof(xlbXlbBackendStats{})
	return (*xlbXlbBackendStats)(unsafe.Pointer(&p.bkStats[off]))
}

// BackendStats reads a backend's counts.
func (p *Pipeline) BackendStats(id uint32) (BackendStats, error) {
	if id >= uint32(MaxBackends) {
		return BackendStats{}, fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	s := p.bkStat(id)
	return BackendStats{
		Active:   atomic.LoadInt64(&s.Active),
		HalfOpen: atomic.LoadInt64(&s.HalfOpen),
		NewConns: atomic.LoadUint64(&s.NewConns),
		NoPort:   atomic.LoadUint64(&s.NoPort),
	}, nil
}

// Traffic is a backend's packets and bytes (IPv4 total lengths), each
// way, summed over CPUs.
type Traffic struct {
	ToBackendPackets, ToBackendBytes     uint64
	FromBackendPackets, FromBackendBytes uint64
}

// BackendTraffic reads every backend's traffic, by backend id (ids with
// none are left out), in one batch.
func (p *Pipeline) BackendTraffic() (map[uint32]Traffic, error) {
	keys := make([]uint32, MaxBackends)
	vals := make([]xlbXlbTraffic, MaxBackends*p.cpus())
	var cursor ebpf.MapBatchCursor
	n, err := p.objs.XlbBkCtr.BatchLookup(&cursor, keys, vals, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read backend traffic: %w", err)
	}
	out := make(map[uint32]Traffic)
	ncpu := p.cpus()
	for i := range n {
		var t Traffic
		for _, v := range vals[i*ncpu : (i+1)*ncpu] {
			t.ToBackendPackets += v.Packets[0]
			t.ToBackendBytes += v.Bytes[0]
			t.FromBackendPackets += v.Packets[1]
			t.FromBackendBytes += v.Bytes[1]
		}
		if t != (Traffic{}) {
			out[keys[i]] = t
		}
	}
	return out, nil
}

// cpus is the number of possible CPUs: the number of values of a per-CPU
// map entry.
func (p *Pipeline) cpus() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// ResetBackendStats zeroes a backend's counts, for a newly allocated id.
func (p *Pipeline) ResetBackendStats(id uint32) error {
	if id >= uint32(MaxBackends) {
		return fmt.Errorf("backend %d: %w", id, ErrOutOfRange)
	}
	s := p.bkStat(id)
	atomic.StoreInt64(&s.Active, 0)
	atomic.StoreInt64(&s.HalfOpen, 0)
	atomic.StoreUint64(&s.NewConns, 0)
	atomic.StoreUint64(&s.NoPort, 0)
	atomic.StoreUint64(&s.NhJ, 0)
	if err := p.objs.XlbBkCtr.Put(id, make([]xlbXlbTraffic, p.cpus())); err != nil {
		return fmt.Errorf("reset traffic of backend %d: %w", id, err)
	}
	return nil
}

// uncount takes a connection that ends out of its backend's counts, as
// backend_account() in programs/include/xlb_conn.h does.
func (p *Pipeline) uncount(id, flags uint32) {
	if id >= uint32(MaxBackends) {
		return
	}
	s := p.bkStat(id)
	if !connClosed(flags) {
		atomic.AddInt64(&s.Active, -1)
	}
	if connHalfOpen(flags) {
		atomic.AddInt64(&s.HalfOpen, -1)
	}
}

// SetSelection installs a service's selection table: a fresh map is
// filled and then swapped in with one update, so no packet sees half of
// it. backends holds backend ids.
func (p *Pipeline) SetSelection(svc uint32, mode Mode, backends []uint32) error {
	if svc >= uint32(MaxServices) {
		return fmt.Errorf("service %d: %w", svc, ErrOutOfRange)
	}
	n := len(backends)
	switch {
	case n == 0 || n > MaxTable:
		return fmt.Errorf("%w: %d entries", ErrBadTable, n)
	case mode == ModeLeastConn && n > MaxCandidates:
		return fmt.Errorf("%w: %d least-conn candidates, at most %d", ErrBadTable, n, MaxCandidates)
	case mode < ModeRandom || mode > ModeRoundRobin:
		return fmt.Errorf("%w: unknown mode %d", ErrBadTable, mode)
	}
	for _, id := range backends {
		if id >= uint32(MaxBackends) {
			return fmt.Errorf("%w: backend id %d", ErrBadTable, id)
		}
	}
	// Every table has the template's size, so the data path's lookups
	// are inlined; only the first n+1 entries are written.
	inner, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "xlb_sel_table",
		Type:       ebpf.Array,
		KeySize:    4,
		ValueSize:  4,
		MaxEntries: uint32(MaxTable) + 1,
	})
	if err != nil {
		return fmt.Errorf("create selection table: %w", err)
	}
	defer inner.Close()
	keys := make([]uint32, n+1)
	vals := make([]uint32, n+1)
	for i := range keys {
		keys[i] = uint32(i)
	}
	vals[0] = uint32(mode) | uint32(n)<<8
	copy(vals[1:], backends)
	if _, err := inner.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("fill selection table: %w", err)
	}
	if err := p.objs.XlbSel.Put(svc, inner); err != nil {
		return fmt.Errorf("install selection table of service %d: %w", svc, err)
	}
	return nil
}

// ClearSelection removes a service's table; its SYNs are then dropped.
func (p *Pipeline) ClearSelection(svc uint32) error {
	if err := p.objs.XlbSel.Delete(svc); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("clear selection of service %d: %w", svc, err)
	}
	return nil
}

func vipKey(vip netip.AddrPort, proto uint8) xlbXlbVip {
	return xlbXlbVip{Addr: addrBE(vip.Addr()), Port: portBE(vip.Port()), Proto: proto}
}

func vipKey6(vip netip.AddrPort, proto uint8) xlbXlbVip6 {
	return xlbXlbVip6{Addr: words6(vip.Addr().AsSlice()), Port: portBE(vip.Port()), Proto: proto}
}

// addr6FromWords is an IPv6 address from the data path's four words.
func addr6FromWords(w [4]uint32) netip.Addr {
	var b [16]byte
	for i, x := range w {
		binary.LittleEndian.PutUint32(b[4*i:], x)
	}
	return netip.AddrFrom16(b)
}

// addrBE returns an IPv4 address as the kernel stores it (network order
// in host memory).
func addrBE(a netip.Addr) uint32 {
	b := a.As4()
	return *(*uint32)(unsafe.Pointer(&b))
}

func addrFromBE(v uint32) netip.Addr {
	return netip.AddrFrom4(*(*[4]byte)(unsafe.Pointer(&v)))
}

func portBE(p uint16) uint16 { return p<<8 | p>>8 }
