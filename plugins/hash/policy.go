// Package hash is xlb's Maglev consistent hashing policy (Eisenbud et al.,
// "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016).
// It returns a ModeHash selection whose table is the Maglev lookup table:
// the select stage picks table[(hash(5-tuple) × len) >> 32], so a client
// keeps its backend while the table holds it, and adding or removing a
// backend moves few other clients.
//
// The table depends only on the set of eligible backends (up, weight above
// 0: address, port and weight), not on their order in the request nor on
// the host, so two load balancers with the same backends and the same states
// compute the same table.
//
// The library is pure and is served by cmd/xlb-policy-hash.
package hash

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/xlb-project/xlb/plugins"
)

// Name and Version of the policy, as reported by Info.
const (
	Name    = "hash"
	Version = "1.1.0"
)

// Needs: the table depends only on the backends, their weights and states,
// so the policy is asked only when those change.
var Needs = plugins.Needs{}

// MinTableSize is the smallest Maglev table; SlotsPerBackend the number of
// slots aimed at per backend.
const (
	MinTableSize    = 1021
	SlotsPerBackend = 100
)

// Policy is the Maglev policy.
type Policy struct{}

// Select returns a ModeHash selection built by Table.
func (Policy) Select(_ context.Context, req plugins.Request) (plugins.Selection, error) {
	t, err := Table(req.Backends)
	if err != nil {
		return plugins.Selection{}, fmt.Errorf("policy %s: %w", Name, err)
	}
	return plugins.Selection{Mode: plugins.ModeHash, Table: t}, nil
}

// TableSize returns the Maglev table size for n backends: the smallest
// prime at least max(MinTableSize, SlotsPerBackend*n), capped at 65537 (the
// select stage's limit, itself a prime).
func TableSize(n int) int {
	want := max(MinTableSize, SlotsPerBackend*n)
	if want >= plugins.MaxTableLen {
		return plugins.MaxTableLen
	}
	for m := want; ; m++ {
		if isPrime(m) {
			return m
		}
	}
}

// Table returns the Maglev lookup table of the eligible backends (up,
// weight above 0), as indexes into backends. Backends are ordered
// by address first, so the order of the request does not matter. Each
// backend's permutation of the slots starts at offset h1 % M and steps by
// skip h2 % (M-1) + 1, h1 and h2 two independent 64-bit hashes of its
// address and port (the first and second 8 bytes of SHA-256 over the
// 16-byte address and the 2-byte port). Slots are filled in rounds in which
// a backend takes slots in proportion to its weight (the heaviest exactly
// one per round), so a backend's share of the table is about its share of
// the total weight.
func Table(backends []plugins.Backend) ([]uint32, error) {
	type entry struct {
		idx          int
		b            plugins.Backend
		offset, skip uint64
		next         uint64 // position in its permutation
		credit       uint64
	}
	var es []*entry
	for i, b := range backends {
		if b.Eligible() {
			es = append(es, &entry{idx: i, b: b})
		}
	}
	if len(es) == 0 {
		return nil, plugins.ErrNoBackends
	}
	if len(es) > plugins.MaxTableLen {
		return nil, fmt.Errorf("%d eligible backends, a table holds at most %d", len(es), plugins.MaxTableLen)
	}
	slices.SortFunc(es, func(a, b *entry) int { return a.b.Address.Compare(b.b.Address) })
	for i := 1; i < len(es); i++ {
		if es[i].b.Address == es[i-1].b.Address {
			return nil, fmt.Errorf("backends %d and %d have the same address %s", es[i-1].idx, es[i].idx, es[i].b.Address)
		}
	}

	m := uint64(TableSize(len(es)))
	var wmax uint64
	for _, e := range es {
		h1, h2 := addrHashes(e.b)
		e.offset = h1 % m
		e.skip = h2%(m-1) + 1
		wmax = max(wmax, uint64(e.b.Weight))
	}

	const empty = ^uint32(0)
	table := make([]uint32, m)
	for i := range table {
		table[i] = empty
	}
	var filled uint64
	for {
		for _, e := range es {
			e.credit += uint64(e.b.Weight)
			for e.credit >= wmax {
				e.credit -= wmax
				slot := (e.offset + e.next*e.skip) % m
				for table[slot] != empty {
					e.next++
					slot = (e.offset + e.next*e.skip) % m
				}
				table[slot] = uint32(e.idx)
				e.next++
				filled++
				if filled == m {
					return table, nil
				}
			}
		}
	}
}

// addrHashes returns two independent hashes of a backend's address and port.
func addrHashes(b plugins.Backend) (h1, h2 uint64) {
	var buf [18]byte
	a := b.Address.Addr().Unmap().As16()
	copy(buf[:16], a[:])
	binary.BigEndian.PutUint16(buf[16:], b.Address.Port())
	sum := sha256.Sum256(buf[:])
	return binary.BigEndian.Uint64(sum[0:8]), binary.BigEndian.Uint64(sum[8:16])
}

func isPrime(n int) bool {
	if n < 2 {
		return false
	}
	for d := 2; d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}
