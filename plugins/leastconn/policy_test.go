package leastconn_test

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/leastconn"
)

func backend(i int, weight uint32, active uint64) plugins.Backend {
	return plugins.Backend{
		Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), 80),
		Weight:  weight,
		Active:  active,
	}
}

func TestCandidates(t *testing.T) {
	few := []plugins.Backend{
		backend(0, 1, 500),
		backend(1, 0, 0), // weight 0: out
		backend(2, 3, 9000),
		backend(3, 1, 0),
		backend(4, 1, 0),
	}
	few[3].State = plugins.StateDraining // draining: out, however idle
	few[4].State = plugins.StateDown     // down: out, however idle

	// 100 eligible backends: weight 1..4, active chosen so that
	// Active/Weight is known; the 64 lowest must be chosen.
	var many []plugins.Backend
	var wantMany []uint32
	for i := range 100 {
		w := uint32(1 + i%4)
		load := uint64((i * 37) % 100) // a permutation of 0..99
		many = append(many, backend(i, w, load*uint64(w)))
		if load < 64 {
			wantMany = append(wantMany, uint32(i))
		}
	}
	// Ties at the cut: 70 backends all equally loaded, lower index wins.
	var ties []plugins.Backend
	var wantTies []uint32
	for i := range 70 {
		ties = append(ties, backend(i, 2, 10))
		if i < 64 {
			wantTies = append(wantTies, uint32(i))
		}
	}
	// Huge counts and weights compare exactly.
	huge := []plugins.Backend{backend(0, ^uint32(0), ^uint64(0)), backend(1, ^uint32(0)-1, ^uint64(0)-1)}

	for _, tc := range []struct {
		name     string
		backends []plugins.Backend
		want     []uint32
	}{
		{"all eligible", few, []uint32{0, 2}},
		{"64 least loaded of 100", many, wantMany},
		{"ties by index", ties, wantTies},
		{"exactly 64", ties[:64], wantTies},
		{"huge", huge, []uint32{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := leastconn.Candidates(tc.backends)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("candidates = %v, want %v", got, tc.want)
			}
			sel := plugins.Selection{Mode: plugins.ModeLeastConn, Table: got}
			if err := sel.ValidateFor(tc.backends); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestSelect(t *testing.T) {
	bs := []plugins.Backend{backend(0, 1, 0), backend(1, 1, 0)}
	sel, err := leastconn.Policy{}.Select(context.Background(), plugins.Request{Backends: bs})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeLeastConn || !slices.Equal(sel.Table, []uint32{0, 1}) {
		t.Errorf("selection = %+v", sel)
	}
	bs = append(bs, backend(2, 1, 0))
	bs[0].State, bs[1].Weight, bs[2].State = plugins.StateDraining, 0, plugins.StateDown
	if _, err := (leastconn.Policy{}).Select(context.Background(), plugins.Request{Backends: bs}); !errors.Is(err, plugins.ErrNoBackends) {
		t.Errorf("no eligible backend: err = %v, want ErrNoBackends", err)
	}
}
