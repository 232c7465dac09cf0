// Package xdp names the XDP verdicts (the kernel's enum xdp_action) once,
// for the data path's loader, the chain and the configuration.
// TestVerdictsMatchKernel checks them against the kernel's BTF.
package xdp

import (
	"errors"
	"fmt"
	"strings"
)

// Verdict is an XDP action.
type Verdict uint32

// The XDP actions.
const (
	Aborted  Verdict = 0
	Drop     Verdict = 1
	Pass     Verdict = 2
	TX       Verdict = 3
	Redirect Verdict = 4
)

// ErrBadVerdict: a name that is no XDP verdict.
var ErrBadVerdict = errors.New("unknown xdp verdict")

var names = []string{"aborted", "drop", "pass", "tx", "redirect"}

// Names returns the verdicts' names, in the order of their values.
func Names() []string { return append([]string(nil), names...) }

func (v Verdict) String() string {
	if int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("verdict(%d)", uint32(v))
}

// Parse parses a verdict name: aborted, drop, pass, tx or redirect, with
// or without libxdp's XDP_ prefix, in any case.
func Parse(s string) (Verdict, error) {
	n := strings.TrimPrefix(strings.ToLower(s), "xdp_")
	for i, name := range names {
		if n == name {
			return Verdict(i), nil
		}
	}
	return 0, fmt.Errorf("verdict %q: %w", s, ErrBadVerdict)
}
