// Package leastconn is xlb's least-connections policy. It returns a
// ModeLeastConn selection: a candidate set from which the select stage picks,
// for every new connection, the candidate with the lowest active/weight,
// using connection counts the data path keeps itself (counted when a
// connection is created, uncounted when it closes or expires). The choice
// therefore follows bursts between two plugin calls; the plugin only decides
// who competes.
//
// The library is pure and is served by cmd/xlb-policy-least-conn.
package leastconn

import (
	"context"
	"fmt"
	"math/bits"
	"slices"
	"time"

	"github.com/xlb-project/xlb/plugins"
)

// Name and Version of the policy, as reported by Info.
const (
	Name    = "least-conn"
	Version = "1.1.0"
)

// Needs: with more than 64 eligible backends the candidates are the least
// loaded, so the policy reads live load, every second.
var Needs = plugins.Needs{LiveLoad: true, RefreshInterval: time.Second}

// Policy is the least-connections policy.
type Policy struct{}

// Select returns a ModeLeastConn selection built by Candidates.
func (Policy) Select(_ context.Context, req plugins.Request) (plugins.Selection, error) {
	t, err := Candidates(req.Backends)
	if err != nil {
		return plugins.Selection{}, fmt.Errorf("policy %s: %w", Name, err)
	}
	return plugins.Selection{Mode: plugins.ModeLeastConn, Table: t}, nil
}

// Candidates returns the candidate set, in ascending index order: every
// backend that is up and has a weight above 0, or when there are
// more than plugins.MaxCandidates (64) of them, the 64 with the lowest
// Active/Weight (ties: lower index first).
func Candidates(backends []plugins.Backend) ([]uint32, error) {
	var idx []int
	for i, b := range backends {
		if b.Eligible() {
			idx = append(idx, i)
		}
	}
	if len(idx) == 0 {
		return nil, plugins.ErrNoBackends
	}
	if len(idx) > plugins.MaxCandidates {
		slices.SortStableFunc(idx, func(a, b int) int {
			return compareLoad(backends[a], backends[b])
		})
		idx = idx[:plugins.MaxCandidates]
		slices.Sort(idx)
	}
	table := make([]uint32, len(idx))
	for i, j := range idx {
		table[i] = uint32(j)
	}
	return table, nil
}

// compareLoad compares a.Active/a.Weight with b.Active/b.Weight exactly, as
// a.Active*b.Weight against b.Active*a.Weight in 128 bits.
func compareLoad(a, b plugins.Backend) int {
	ah, al := bits.Mul64(a.Active, uint64(b.Weight))
	bh, bl := bits.Mul64(b.Active, uint64(a.Weight))
	switch {
	case ah < bh || (ah == bh && al < bl):
		return -1
	case ah > bh || (ah == bh && al > bl):
		return 1
	}
	return 0
}
