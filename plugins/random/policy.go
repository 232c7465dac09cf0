// Package random is xlb's weighted random policy: a ModeRandom table in
// which every eligible backend (up, weight above 0) appears in proportion to
// its weight, so that the select stage's table[(prandom × len) >> 32] picks
// backends with probability weight / total weight.
//
// The library is pure and is served by cmd/xlb-policy-random.
package random

import (
	"context"
	"fmt"
	"slices"

	"github.com/xlb-project/xlb/plugins"
)

// Name and Version of the policy, as reported by Info.
const (
	Name    = "random"
	Version = "1.1.0"
)

// Needs: the table depends only on the backends, their weights and states,
// so the policy is asked only when those change.
var Needs = plugins.Needs{}

// Policy is the weighted random policy.
type Policy struct{}

// Select returns a ModeRandom selection built by Table.
func (Policy) Select(_ context.Context, req plugins.Request) (plugins.Selection, error) {
	t, err := Table(req.Backends)
	if err != nil {
		return plugins.Selection{}, fmt.Errorf("policy %s: %w", Name, err)
	}
	return plugins.Selection{Mode: plugins.ModeRandom, Table: t}, nil
}

// Table returns the weighted random table of backends: each backend that is
// up and has a weight above 0 appears weight/g times, g being the
// greatest common divisor of those weights, the entries of one backend next
// to each other (order does not matter to a random pick). When that is more
// than plugins.MaxTableLen entries, the table has exactly MaxTableLen and
// each backend a share rounded from its weight (largest remainder), but at
// least one entry.
func Table(backends []plugins.Backend) ([]uint32, error) {
	var idx []int
	var units []uint64
	var g uint64
	for i, b := range backends {
		if !b.Eligible() {
			continue
		}
		idx = append(idx, i)
		units = append(units, uint64(b.Weight))
		g = gcd(g, uint64(b.Weight))
	}
	if len(idx) == 0 {
		return nil, plugins.ErrNoBackends
	}
	if len(idx) > plugins.MaxTableLen {
		return nil, fmt.Errorf("%d eligible backends, a table holds at most %d", len(idx), plugins.MaxTableLen)
	}
	var total uint64
	for i := range units {
		units[i] /= g
		total += units[i]
	}
	counts := make([]uint64, len(units))
	if total <= plugins.MaxTableLen {
		copy(counts, units)
	} else {
		counts = Apportion(units, plugins.MaxTableLen)
	}
	var n uint64
	for _, c := range counts {
		n += c
	}
	table := make([]uint32, 0, n)
	for i, c := range counts {
		for range c {
			table = append(table, uint32(idx[i]))
		}
	}
	return table, nil
}

// Apportion divides size seats among parties in proportion to their
// weights, each party getting at least one seat: the largest remainder
// method, then (when the minimum of one seat overshot) seats taken back
// from the most over-served parties. It needs 1 <= len(weights) <= size and
// every weight above 0; the result sums to size.
func Apportion(weights []uint64, size int) []uint64 {
	var total uint64
	for _, w := range weights {
		total += w
	}
	L := uint64(size)
	seats := make([]uint64, len(weights))
	rem := make([]uint64, len(weights))
	var sum uint64
	for i, w := range weights {
		// w < 2^32 and L <= 2^17 in use here, so w*L does not overflow.
		seats[i] = w * L / total
		rem[i] = w * L % total
		if seats[i] == 0 {
			seats[i] = 1
			rem[i] = 0
		}
		sum += seats[i]
	}
	order := make([]int, len(weights))
	for i := range order {
		order[i] = i
	}
	switch {
	case sum < L:
		// Fewer than len(weights) seats are left: one more each to the
		// largest remainders.
		slices.SortStableFunc(order, func(a, b int) int {
			switch {
			case rem[a] > rem[b]:
				return -1
			case rem[a] < rem[b]:
				return 1
			}
			return 0
		})
		for _, i := range order[:L-sum] {
			seats[i]++
		}
	case sum > L:
		// Minimum seats overshot: take back from those most above their
		// exact share, one seat each per pass.
		over := func(i int) float64 {
			return float64(seats[i]) - float64(weights[i])*float64(L)/float64(total)
		}
		slices.SortStableFunc(order, func(a, b int) int {
			oa, ob := over(a), over(b)
			switch {
			case oa > ob:
				return -1
			case oa < ob:
				return 1
			}
			return 0
		})
		for sum > L {
			for _, i := range order {
				if sum == L {
					break
				}
				if seats[i] > 1 {
					seats[i]--
					sum--
				}
			}
		}
	}
	return seats
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
