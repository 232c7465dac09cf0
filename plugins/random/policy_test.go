package random_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/random"
)

func backends(weights ...uint32) []plugins.Backend {
	bs := make([]plugins.Backend, len(weights))
	for i, w := range weights {
		bs[i] = plugins.Backend{
			Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 8080),
			Weight:  w,
		}
	}
	return bs
}

func counts(table []uint32) map[uint32]int {
	c := map[uint32]int{}
	for _, i := range table {
		c[i]++
	}
	return c
}

func TestTableExactProportions(t *testing.T) {
	for _, tc := range []struct {
		name     string
		weights  []uint32
		draining []int
		want     map[uint32]int
	}{
		{"equal", []uint32{7, 7, 7}, nil, map[uint32]int{0: 1, 1: 1, 2: 1}},
		{"gcd 2", []uint32{2, 4, 6}, nil, map[uint32]int{0: 1, 1: 2, 2: 3}},
		{"gcd 1", []uint32{3, 5, 1}, nil, map[uint32]int{0: 3, 1: 5, 2: 1}},
		{"zero weight and draining left out", []uint32{10, 0, 30, 20}, []int{3}, map[uint32]int{0: 1, 2: 3}},
		{"down and draining left out", []uint32{10, 10, 30, 20}, []int{0, 3}, map[uint32]int{1: 1, 2: 3}},
		{"one backend", []uint32{1000}, nil, map[uint32]int{0: 1}},
		{"large gcd", []uint32{1 << 31, 1 << 30}, nil, map[uint32]int{0: 2, 1: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bs := backends(tc.weights...)
			for j, i := range tc.draining {
				// Every state but up is left out: alternate them.
				bs[i].State = []plugins.BackendState{plugins.StateDraining, plugins.StateDown}[j%2]
			}
			table, err := random.Table(bs)
			if err != nil {
				t.Fatal(err)
			}
			got := counts(table)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("counts = %v, want %v (table %v)", got, tc.want, table)
			}
		})
	}
}

func TestTableCapped(t *testing.T) {
	for _, tc := range []struct {
		name    string
		weights []uint32
	}{
		{"two large coprime", []uint32{65536, 65535, 1}},
		{"one huge, many tiny", append([]uint32{^uint32(0)}, make1s(1000)...)},
		{"many tiny, minimum overshoots", append([]uint32{^uint32(0), ^uint32(0) - 1}, make1s(40000)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bs := backends(tc.weights...)
			table, err := random.Table(bs)
			if err != nil {
				t.Fatal(err)
			}
			if len(table) != plugins.MaxTableLen {
				t.Fatalf("len = %d, want %d", len(table), plugins.MaxTableLen)
			}
			c := counts(table)
			var total float64
			for _, w := range tc.weights {
				total += float64(w)
			}
			// Backends whose exact share is below one entry get one all the
			// same; the heaviest backends pay for that.
			var bumped float64
			for _, w := range tc.weights {
				if float64(w)/total*plugins.MaxTableLen < 1 {
					bumped++
				}
			}
			for i, w := range tc.weights {
				n := c[uint32(i)]
				if n < 1 {
					t.Fatalf("backend %d (weight %d) has no entry", i, w)
				}
				ideal := float64(w) / total * plugins.MaxTableLen
				if ideal >= 1 && (float64(n) > ideal+1 || float64(n) < ideal-1-bumped) {
					t.Errorf("backend %d (weight %d): %d entries, ideal %.2f", i, w, n, ideal)
				}
			}
			if err := (plugins.Selection{Mode: plugins.ModeRandom, Table: table}).ValidateFor(bs); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func make1s(n int) []uint32 {
	s := make([]uint32, n)
	for i := range s {
		s[i] = 1
	}
	return s
}

func TestApportion(t *testing.T) {
	got := random.Apportion([]uint64{1, 1, 1}, 10)
	if fmt.Sprint(got) != "[4 3 3]" {
		t.Errorf("Apportion(1,1,1 into 10) = %v, want [4 3 3]", got)
	}
	got = random.Apportion([]uint64{100, 1, 1}, 5)
	if fmt.Sprint(got) != "[3 1 1]" {
		t.Errorf("Apportion(100,1,1 into 5) = %v, want [3 1 1]", got)
	}
}

func TestSelect(t *testing.T) {
	bs := backends(1, 2)
	bs = append(bs, plugins.Backend{Address: netip.MustParseAddrPort("[2001:db8::1]:80"), Weight: 3, State: plugins.StateDown})
	sel, err := random.Policy{}.Select(context.Background(), plugins.Request{Service: netip.MustParseAddrPort("192.0.2.1:80"), Backends: bs})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeRandom {
		t.Errorf("mode = %s, want random", sel.Mode)
	}
	if err := sel.ValidateFor(bs); err != nil {
		t.Error(err)
	}
	_, err = random.Policy{}.Select(context.Background(), plugins.Request{Backends: backends(0, 0)})
	if !errors.Is(err, plugins.ErrNoBackends) {
		t.Errorf("all weights 0: err = %v, want ErrNoBackends", err)
	}
}
