package main

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/xlb-project/xlb/plugins"
)

func TestSequence(t *testing.T) {
	for _, tc := range []struct {
		weights []uint64
		want    []int
	}{
		{[]uint64{5, 1, 1}, []int{0, 0, 1, 0, 2, 0, 0}}, // nginx's a a b a c a a
		{[]uint64{10, 2, 2}, []int{0, 0, 1, 0, 2, 0, 0}},
		{[]uint64{1, 1, 1}, []int{0, 1, 2}},
		{[]uint64{2, 1}, []int{0, 1, 0}},
		{[]uint64{4}, []int{0}},
	} {
		if got := Sequence(tc.weights); !slices.Equal(got, tc.want) {
			t.Errorf("Sequence(%v) = %v, want %v", tc.weights, got, tc.want)
		}
	}
	// Capped: the cycle fits the table and every backend is in it.
	got := Sequence([]uint64{1 << 40, 3, 1})
	if len(got) > plugins.MaxTableLen || !slices.Contains(got, 1) || !slices.Contains(got, 2) {
		t.Errorf("capped sequence: %d entries, has 1: %v, has 2: %v", len(got), slices.Contains(got, 1), slices.Contains(got, 2))
	}
}

func TestSelect(t *testing.T) {
	req := plugins.Request{
		Service: netip.MustParseAddrPort("192.0.2.1:80"),
		Backends: []plugins.Backend{
			{Address: netip.MustParseAddrPort("10.0.0.1:80"), Weight: 5},
			{Address: netip.MustParseAddrPort("10.0.0.2:80"), Weight: 9, State: plugins.StateDown},
			{Address: netip.MustParseAddrPort("10.0.0.3:80"), Weight: 1},
			{Address: netip.MustParseAddrPort("10.0.0.4:80"), Weight: 1},
		},
	}
	sel, err := wrr{}.Select(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeRoundRobin || !slices.Equal(sel.Table, []uint32{0, 0, 2, 0, 3, 0, 0}) {
		t.Errorf("Select = %+v", sel)
	}
	if err := sel.ValidateFor(req.Backends); err != nil {
		t.Error(err)
	}
	req.Backends = req.Backends[1:2]
	if _, err := (wrr{}).Select(context.Background(), req); !errors.Is(err, plugins.ErrNoBackends) {
		t.Errorf("only a backend that is down: err = %v, want ErrNoBackends", err)
	}
}

// TestLaunch builds this example and runs it as xlbd would.
func TestLaunch(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("no go command to build the example: %v", err)
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "xlb-policy-wrr")
	if out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	path, err := plugins.Resolve("wrr", dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info != (plugins.Info{Name: "wrr", Version: "0.2.0", APIVersion: plugins.ProtocolVersion}) {
		t.Errorf("Info = %+v", info)
	}
	sel, err := c.Select(ctx, plugins.Request{
		Service: netip.MustParseAddrPort("[2001:db8::80]:80"),
		Backends: []plugins.Backend{
			{Address: netip.MustParseAddrPort("[2001:db8::1]:80"), Weight: 5},
			{Address: netip.MustParseAddrPort("[2001:db8::2]:80"), Weight: 1},
			{Address: netip.MustParseAddrPort("[2001:db8::3]:80"), Weight: 1},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeRoundRobin || !slices.Equal(sel.Table, []uint32{0, 0, 1, 0, 2, 0, 0}) {
		t.Errorf("Select = %+v", sel)
	}
}
