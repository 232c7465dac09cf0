// Package plugins is xlb's backend selection policy plugin API, shared by
// the host (xlbd) and the plugins.
//
// A policy plugin is a separate program served through hashicorp/go-plugin
// in gRPC mode. It is never asked per packet: given a service's backends,
// their states and (if it asks for them) their live load figures it returns
// a Selection (a mode and a table of backend indexes), which xlbd writes into
// the BPF maps read by the kernel's select stage.
//
// A policy's main is one call:
//
//	func main() { plugins.Serve(plugins.Info{Name: "mine", Version: "0.1.0"}, myPolicy{}) }
//
// The host starts one with Launch and asks it with Client.Select. The
// protocol and the modes are described in docs/policy-plugins.md.
package plugins

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/hashicorp/go-plugin"

	policypb "github.com/xlb-project/xlb/plugins/proto"
)

// ProtocolVersion is the newest version of the policy plugin API: the
// highest protocol version the go-plugin handshake negotiates, and the
// APIVersion a plugin reports in Info. Version 2 added Info.Needs,
// Backend.State and the "no backend" answer (ErrNoBackends); version 3
// added Backend.Health. A host and a plugin built with this SDK also speak
// the older versions with older peers. It is raised only by a change that
// old hosts or plugins cannot ignore, or whose zero value a new peer could
// not tell from an old peer's silence.
const ProtocolVersion = 3

// MinProtocolVersion is the oldest API version this SDK speaks.
const MinProtocolVersion = 1

// PluginName is the name under which a policy is served and dispensed.
const PluginName = "policy"

// Handshake is the go-plugin handshake shared by xlbd and every policy
// plugin. The magic cookie only keeps a policy binary from doing anything
// when it is run by hand; it is not a security measure. The protocol version
// is negotiated among MinProtocolVersion..ProtocolVersion (see Serve and
// Launch).
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "XLB_POLICY_PLUGIN",
	MagicCookieValue: "9b1f3c2e6a4d4f0e8c7b5a3d1e2f4a6c",
}

// Limits of the kernel's select stage.
const (
	// MaxTableLen is the longest table the select stage accepts.
	MaxTableLen = 65537
	// MaxCandidates is the largest candidate set of ModeLeastConn.
	MaxCandidates = 64
)

// Errors of this package, checked with errors.Is.
var (
	// ErrInvalidSelection: a Selection the select stage cannot use.
	ErrInvalidSelection = errors.New("invalid selection")
	// ErrNoBackends: no backend of the request may take new connections
	// (none is up with a weight above 0). A policy returns it as its "no
	// backend" answer; the host then stops new connections to the service.
	ErrNoBackends = errors.New("no backend may take new connections")
	// ErrChecksumMismatch: the plugin binary's SHA-256 is not the pinned one.
	ErrChecksumMismatch = errors.New("checksum mismatch")
	// ErrIncompatible: the plugin speaks another API version.
	ErrIncompatible = errors.New("incompatible plugin API version")
	// ErrExited: the plugin process has exited.
	ErrExited = errors.New("plugin process exited")
	// ErrHung: the plugin did not answer a call within its deadline; the
	// client has killed the process.
	ErrHung = errors.New("plugin hung")
	// ErrNotExecutable: Resolve found a file that is not an executable.
	ErrNotExecutable = errors.New("not an executable file")
	// ErrBadPolicyName: CheckPolicy refused a policy's form.
	ErrBadPolicyName = errors.New("not a policy name nor an absolute path")
)

// Mode tells the kernel's select stage how to pick from a Selection's table.
// Its values are the protocol's enum Mode (plugins/proto/policy.proto), which
// are the data path's enum xlb_sel_mode (a test in internal/policy proves the
// two agree).
type Mode policypb.Mode

// The modes of the select stage.
const (
	// ModeRandom picks table[(prandom × len) >> 32]. A weighted random policy
	// lists each backend in proportion to its weight.
	ModeRandom = Mode(policypb.Mode_MODE_RANDOM)
	// ModeHash picks table[(hash(client ip, vip, client port, vport, proto)
	// × len) >> 32], for example a Maglev lookup table.
	ModeHash = Mode(policypb.Mode_MODE_HASH)
	// ModeLeastConn treats the table as a candidate set (at most 64 distinct
	// entries) and picks the candidate with the lowest active/weight, from
	// connection counts the data path keeps itself.
	ModeLeastConn = Mode(policypb.Mode_MODE_LEAST_CONN)
	// ModeRoundRobin picks table[per-CPU counter++ % len].
	ModeRoundRobin = Mode(policypb.Mode_MODE_ROUND_ROBIN)
)

// String returns the mode's name, as used in logs and configuration: the
// protocol's name without "MODE_", in lower case with dashes ("least-conn").
func (m Mode) String() string {
	if !m.Valid() {
		return fmt.Sprintf("mode(%d)", int32(m))
	}
	return enumName(policypb.Mode(m).String(), "MODE_")
}

// Valid reports whether m is one of the select stage's modes.
func (m Mode) Valid() bool {
	_, ok := policypb.Mode_name[int32(m)]
	return ok && m != Mode(policypb.Mode_MODE_UNSPECIFIED)
}

// BackendState is a backend's state (API version 2). Its values are the
// protocol's enum BackendState; the zero value is StateUp.
type BackendState policypb.BackendState

// The backend states. Only an up backend may take new connections; the
// established connections of every backend keep flowing until they end.
const (
	// StateUp: may take new connections.
	StateUp = BackendState(policypb.BackendState_BACKEND_STATE_UP)
	// StateDown: must take no new connections, for example because its
	// next hop does not answer ARP.
	StateDown = BackendState(policypb.BackendState_BACKEND_STATE_DOWN)
	// StateDraining: takes no new connections on purpose.
	StateDraining = BackendState(policypb.BackendState_BACKEND_STATE_DRAINING)
)

// String returns the state's name: "up", "down" or "draining".
func (s BackendState) String() string {
	if _, ok := policypb.BackendState_name[int32(s)]; !ok {
		return fmt.Sprintf("state(%d)", int32(s))
	}
	return enumName(policypb.BackendState(s).String(), "BACKEND_STATE_")
}

// Health is what a backend's health check finds (API version 3). Its
// values are the protocol's enum BackendHealth; the zero value is
// HealthNone.
type Health policypb.BackendHealth

// The health verdicts. Health is separate from State: with the service's
// all-down use-all, a backend whose check fails is up when no backend of
// the service passes.
const (
	// HealthNone: the backend has no health check (or the host speaks an
	// API version older than 3: see Request.APIVersion).
	HealthNone = Health(policypb.BackendHealth_BACKEND_HEALTH_NONE)
	// HealthUnchecked: no check has finished yet.
	HealthUnchecked = Health(policypb.BackendHealth_BACKEND_HEALTH_UNCHECKED)
	// HealthPassing: the check passes.
	HealthPassing = Health(policypb.BackendHealth_BACKEND_HEALTH_PASSING)
	// HealthFailing: the check fails.
	HealthFailing = Health(policypb.BackendHealth_BACKEND_HEALTH_FAILING)
)

// String returns the verdict's name: "none", "unchecked", "passing" or
// "failing".
func (h Health) String() string {
	if _, ok := policypb.BackendHealth_name[int32(h)]; !ok {
		return fmt.Sprintf("health(%d)", int32(h))
	}
	return enumName(policypb.BackendHealth(h).String(), "BACKEND_HEALTH_")
}

// enumName turns a protocol enum value's name into the lower-case, dashed
// form used in logs: "MODE_LEAST_CONN" is "least-conn".
func enumName(name, prefix string) string {
	return strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(name, prefix)), "_", "-")
}

// DefaultRefreshInterval is how often a policy that reads live load is
// asked again when it names no interval, and how often a version 1 plugin
// is asked.
const DefaultRefreshInterval = time.Second

// Limits of Needs.RefreshInterval.
const (
	MinRefreshInterval = 100 * time.Millisecond
	MaxRefreshInterval = time.Minute
)

// Needs says what a policy reads, and so when the host asks it (API
// version 2). The zero value is a policy that reads no live load: it is
// asked only when a service's backends, weights, states or policy change.
type Needs struct {
	// LiveLoad: the policy reads Backend.Active and Backend.NewPerSec. The
	// host fills them in and asks again every RefreshInterval. Without it
	// both are sent as 0.
	LiveLoad bool
	// RefreshInterval is how often a LiveLoad policy is asked, between
	// MinRefreshInterval and MaxRefreshInterval; 0 means
	// DefaultRefreshInterval.
	RefreshInterval time.Duration
}

// Interval returns how often the policy is asked again with fresh load: 0
// (only on change) without LiveLoad, else RefreshInterval clamped to its
// limits, DefaultRefreshInterval when unset.
func (n Needs) Interval() time.Duration {
	switch {
	case !n.LiveLoad:
		return 0
	case n.RefreshInterval == 0:
		return DefaultRefreshInterval
	}
	return min(max(n.RefreshInterval, MinRefreshInterval), MaxRefreshInterval)
}

// String describes when the policy is asked: "on change" or "live load
// every 1s".
func (n Needs) String() string {
	if !n.LiveLoad {
		return "on change"
	}
	return "live load every " + n.Interval().String()
}

// v1Needs is what the host assumes of a version 1 plugin: it reads live
// load and is asked every second, as version 1 hosts did.
var v1Needs = Needs{LiveLoad: true, RefreshInterval: DefaultRefreshInterval}

// Backend is one backend of a service with its state and live load
// figures.
type Backend struct {
	// Address is the backend's IP address and port.
	Address netip.AddrPort
	// Weight is the backend's relative capacity. 0 means no new connections.
	Weight uint32
	// Active is the number of connections the data path counts as open (0
	// unless the policy's Needs ask for live load).
	Active uint64
	// NewPerSec is the recent rate of new connections to this backend (0
	// unless the policy's Needs ask for live load).
	NewPerSec float64
	// State is the backend's state; only StateUp may take new connections.
	State BackendState
	// Health is what its health check finds (API version 3).
	Health Health
}

// Eligible reports whether b may be given new connections: it is up and
// its weight is above zero.
func (b Backend) Eligible() bool { return b.State == StateUp && b.Weight > 0 }

// Request asks a policy for the selection state of one service.
type Request struct {
	// Service is the virtual IP and port.
	Service netip.AddrPort
	// Backends are the service's backends; a Selection's table holds
	// indexes into this slice.
	Backends []Backend
	// APIVersion is the version negotiated with the host (set by Serve on
	// the plugin side): below 3, Backend.Health is always HealthNone.
	APIVersion int
}

// Eligible returns the indexes of the backends that may take new
// connections, in request order.
func (r Request) Eligible() []int {
	var idx []int
	for i, b := range r.Backends {
		if b.Eligible() {
			idx = append(idx, i)
		}
	}
	return idx
}

// Selection is a policy's answer: the state the select stage applies.
type Selection struct {
	Mode  Mode
	Table []uint32
}

// Validate checks s against the select stage's limits for a request with
// nBackends backends: a known mode, 1..65537 entries, each an index below
// nBackends, and for ModeLeastConn at most 64 distinct candidates. Errors
// wrap ErrInvalidSelection.
func (s Selection) Validate(nBackends int) error {
	if !s.Mode.Valid() {
		return fmt.Errorf("%w: unknown mode %s", ErrInvalidSelection, s.Mode)
	}
	if len(s.Table) == 0 {
		return fmt.Errorf("%w: empty table", ErrInvalidSelection)
	}
	if len(s.Table) > MaxTableLen {
		return fmt.Errorf("%w: table has %d entries, at most %d allowed", ErrInvalidSelection, len(s.Table), MaxTableLen)
	}
	for i, idx := range s.Table {
		if uint64(idx) >= uint64(max(nBackends, 0)) {
			return fmt.Errorf("%w: table entry %d is backend %d, the request has %d backends", ErrInvalidSelection, i, idx, nBackends)
		}
	}
	if s.Mode == ModeLeastConn {
		if len(s.Table) > MaxCandidates {
			return fmt.Errorf("%w: %s has %d candidates, at most %d allowed", ErrInvalidSelection, s.Mode, len(s.Table), MaxCandidates)
		}
		seen := make(map[uint32]int, len(s.Table))
		for i, idx := range s.Table {
			if j, dup := seen[idx]; dup {
				return fmt.Errorf("%w: %s candidate %d repeats backend %d (entry %d)", ErrInvalidSelection, s.Mode, i, idx, j)
			}
			seen[idx] = i
		}
	}
	return nil
}

// ValidateFor is Validate for the request's backends, and also refuses a
// table that picks a backend that is not up or has weight 0: such a backend
// must get no new connections.
func (s Selection) ValidateFor(backends []Backend) error {
	if err := s.Validate(len(backends)); err != nil {
		return err
	}
	for i, idx := range s.Table {
		b := backends[idx]
		switch {
		case b.State != StateUp:
			return fmt.Errorf("%w: table entry %d picks backend %d (%s), which is %s", ErrInvalidSelection, i, idx, b.Address, b.State)
		case b.Weight == 0:
			return fmt.Errorf("%w: table entry %d picks backend %d (%s), which has weight 0", ErrInvalidSelection, i, idx, b.Address)
		}
	}
	return nil
}

// Policy computes selection state. Select is called when a service's
// backends, weights, states or policy change, and every
// Needs.RefreshInterval for a policy that reads live load; never per
// packet. It must not return a Selection that fails
// ValidateFor(req.Backends); when no backend may take new connections it
// returns ErrNoBackends (the "no backend" answer).
type Policy interface {
	Select(ctx context.Context, req Request) (Selection, error)
}

// Info describes a policy plugin.
type Info struct {
	// Name is the policy's short name, for example "random".
	Name string
	// Version is the plugin's own version, free form.
	Version string
	// APIVersion is the plugin API version spoken. A plugin sets the newest
	// it implements, or leaves it 0 for ProtocolVersion; Serve then serves
	// every version from MinProtocolVersion up to it, and Info reports the
	// one the handshake negotiated.
	APIVersion int
	// Needs says what the policy reads (API version 2). A host assumes a
	// version 1 plugin reads live load, every second.
	Needs Needs
}
