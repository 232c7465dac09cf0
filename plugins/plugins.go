// Package plugins is xlb's backend selection policy plugin API, shared by
// the host (xlbd) and the plugins.
//
// A policy plugin is a separate program served through hashicorp/go-plugin
// in gRPC mode. It is never asked per packet: given a service's backends and
// their live load figures it returns a Selection (a mode and a table of
// backend indexes), which xlbd writes into the BPF maps read by the kernel's
// select stage.
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

	"github.com/hashicorp/go-plugin"
)

// ProtocolVersion is the version of the policy plugin API: the protocol
// version of the go-plugin handshake and the APIVersion a plugin reports in
// Info. It is raised only by a change that old hosts or plugins cannot ignore.
const ProtocolVersion = 1

// PluginName is the name under which a policy is served and dispensed.
const PluginName = "policy"

// Handshake is the go-plugin handshake shared by xlbd and every policy
// plugin. The magic cookie only keeps a policy binary from doing anything
// when it is run by hand; it is not a security measure.
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
	// ErrNoBackends: the request has no backend that may take new
	// connections (all are draining or have weight 0).
	ErrNoBackends = errors.New("no backend may take new connections")
	// ErrChecksumMismatch: the plugin binary's SHA-256 is not the pinned one.
	ErrChecksumMismatch = errors.New("checksum mismatch")
	// ErrIncompatible: the plugin speaks another API version.
	ErrIncompatible = errors.New("incompatible plugin API version")
	// ErrExited: the plugin process has exited.
	ErrExited = errors.New("plugin process exited")
	// ErrNotExecutable: Resolve found a file that is not an executable.
	ErrNotExecutable = errors.New("not an executable file")
)

// Mode tells the kernel's select stage how to pick from a Selection's table.
type Mode uint8

// The modes of the select stage. The values are the data path's.
const (
	// ModeRandom picks table[prandom % len]. A weighted random policy lists
	// each backend in proportion to its weight.
	ModeRandom Mode = 1
	// ModeHash picks table[hash(client ip, client port, vip, vport, proto) % len],
	// for example a Maglev lookup table.
	ModeHash Mode = 2
	// ModeLeastConn treats the table as a candidate set (at most 64 distinct
	// entries) and picks the candidate with the lowest active/weight, from
	// connection counts the data path keeps itself.
	ModeLeastConn Mode = 3
	// ModeRoundRobin picks table[per-CPU counter++ % len].
	ModeRoundRobin Mode = 4
)

// String returns the mode's name, as used in logs and configuration.
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
	default:
		return fmt.Sprintf("mode(%d)", uint8(m))
	}
}

// Valid reports whether m is one of the select stage's modes.
func (m Mode) Valid() bool { return m >= ModeRandom && m <= ModeRoundRobin }

// Backend is one backend of a service with its live load figures.
type Backend struct {
	// Address is the backend's IP address and port.
	Address netip.AddrPort
	// Weight is the backend's relative capacity. 0 means no new connections.
	Weight uint32
	// Active is the number of connections the data path counts as open.
	Active uint64
	// NewPerSec is the recent rate of new connections to this backend.
	NewPerSec float64
	// Draining backends keep their established connections and get no new ones.
	Draining bool
}

// Eligible reports whether b may be given new connections: it is not
// draining and its weight is above zero.
func (b Backend) Eligible() bool { return !b.Draining && b.Weight > 0 }

// Request asks a policy for the selection state of one service.
type Request struct {
	// Service is the virtual IP and port.
	Service netip.AddrPort
	// Backends are the service's backends; a Selection's table holds
	// indexes into this slice.
	Backends []Backend
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
// table that picks a draining backend or one of weight 0: such a backend
// must get no new connections.
func (s Selection) ValidateFor(backends []Backend) error {
	if err := s.Validate(len(backends)); err != nil {
		return err
	}
	for i, idx := range s.Table {
		b := backends[idx]
		switch {
		case b.Draining:
			return fmt.Errorf("%w: table entry %d picks backend %d (%s), which is draining", ErrInvalidSelection, i, idx, b.Address)
		case b.Weight == 0:
			return fmt.Errorf("%w: table entry %d picks backend %d (%s), which has weight 0", ErrInvalidSelection, i, idx, b.Address)
		}
	}
	return nil
}

// Policy computes selection state. Select is called when a service's
// backends or load change, never per packet; it must not return a
// Selection that fails ValidateFor(req.Backends).
type Policy interface {
	Select(ctx context.Context, req Request) (Selection, error)
}

// Info describes a policy plugin.
type Info struct {
	// Name is the policy's short name, for example "random".
	Name string
	// Version is the plugin's own version, free form.
	Version string
	// APIVersion is the plugin API version spoken; Serve fills in
	// ProtocolVersion when it is 0.
	APIVersion int
}
