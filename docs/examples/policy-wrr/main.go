// Command policy-wrr is an example third-party xlb policy plugin, written
// against the plugins SDK only: smooth weighted round robin, as nginx does
// it. It returns a ModeRoundRobin table holding one whole smooth WRR cycle,
// so the select stage's per-CPU table[counter++ % len] hands out backends
// interleaved (weights 5, 1, 1 give a a b a c a a) rather than in bursts.
//
// Build it and point xlbd at it:
//
//	go build -o /usr/local/lib/xlb/plugins/xlb-policy-wrr ./docs/examples/policy-wrr
//
// See docs/policy-plugins.md for the walk-through.
package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/xlb-project/xlb/plugins"
)

func main() {
	// Needs{}: the table depends only on the backends, their weights and
	// states, so xlbd asks again only when those change.
	plugins.Serve(plugins.Info{Name: "wrr", Version: "0.2.0", Needs: plugins.Needs{}}, wrr{})
}

// wrr is the policy. It keeps no state: every Select computes the table
// from the request alone.
type wrr struct{}

func (wrr) Select(ctx context.Context, req plugins.Request) (plugins.Selection, error) {
	var idx []uint32
	var weights []uint64
	for i, b := range req.Backends {
		// Backends that are not up (down, draining) and weight 0 must get
		// no new connections: the host refuses a table that picks them.
		if b.Eligible() {
			idx = append(idx, uint32(i))
			weights = append(weights, uint64(b.Weight))
		}
	}
	if len(idx) == 0 {
		// The "no backend" answer: xlbd stops new connections to the
		// service.
		return plugins.Selection{}, plugins.ErrNoBackends
	}
	if len(idx) > plugins.MaxTableLen {
		return plugins.Selection{}, fmt.Errorf("wrr: %d backends, at most %d", len(idx), plugins.MaxTableLen)
	}
	order := Sequence(weights)
	table := make([]uint32, len(order))
	for i, j := range order {
		table[i] = idx[j]
	}
	// Serve set slog's default logger up to reach the host's log.
	slog.DebugContext(ctx, "wrr table", "service", req.Service.String(), "backends", len(idx), "table_len", len(table))
	return plugins.Selection{Mode: plugins.ModeRoundRobin, Table: table}, nil
}

// Sequence returns one cycle of smooth weighted round robin over weights
// (all above 0), as indexes into weights. The weights are first divided by
// their greatest common divisor, and halved (rounding up) while their sum
// exceeds the longest table; the cycle is as long as their sum. Each step
// adds every weight to its backend's current value, picks the largest
// (lowest index on a tie) and takes the sum of the weights off it.
func Sequence(weights []uint64) []int {
	w := reduce(weights)
	var total int64
	for _, x := range w {
		total += int64(x)
	}
	current := make([]int64, len(w))
	seq := make([]int, 0, total)
	for range total {
		best := 0
		for i := range w {
			current[i] += int64(w[i])
			if current[i] > current[best] {
				best = i
			}
		}
		current[best] -= total
		seq = append(seq, best)
	}
	return seq
}

// reduce divides the weights by their gcd, then halves them while their
// sum exceeds plugins.MaxTableLen.
func reduce(weights []uint64) []uint64 {
	var g uint64
	for _, x := range weights {
		for y := x; y != 0; {
			g, y = y, g%y
		}
	}
	w := make([]uint64, len(weights))
	var total uint64
	for i, x := range weights {
		w[i] = x / g
		total += w[i]
	}
	for total > plugins.MaxTableLen {
		total = 0
		for i := range w {
			w[i] = (w[i] + 1) / 2
			total += w[i]
		}
	}
	return w
}
