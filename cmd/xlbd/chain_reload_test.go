package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// TestChainReload changes the chain through the configuration file and
// SIGHUP: a member is removed, then added back after xlb, while load
// balancing goes on.
func TestChainReload(t *testing.T) {
	testnet.RequirePrivileged(t)
	if _, err := os.Stat(xdpFilterIP); err != nil {
		t.Fatalf("xdp-filter's program (package xdp-tools): %v", err)
	}
	pinPath := xlbtest.TempDir(t, "/sys/fs/bpf", "xlb-chain-reload-")
	cfgFile := filepath.Join(t.TempDir(), "xlbd.yaml")
	write := func(yaml string) {
		if err := os.WriteFile(cfgFile, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	member := func(prio string) string {
		return "chain:\n  - name: filter\n    object: " + xdpFilterIP + "\n    program: xdpfilt_alw_ip\n" + prio
	}
	write(member(""))
	tp := newTopo(t, "native", "--config", cfgFile, "--pin-path", pinPath)
	c := tp.c1.NS.HTTPClient(false)
	order := func() string {
		ms, err := tp.d.Client().ChainList(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		s := ""
		for _, m := range ms {
			s += fmt.Sprintf("%s@%d ", m.Name, m.Priority)
		}
		return s
	}
	reload := func(yaml, want string) {
		t.Helper()
		write(yaml)
		if err := tp.d.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for order() != want {
			if time.Now().After(deadline) {
				t.Fatalf("chain after reload: %q, want %q\n%s", order(), want, tp.d.Output())
			}
			time.Sleep(50 * time.Millisecond)
		}
		for i := 0; i < 10; i++ {
			if _, err := testnet.Get(t.Context(), c, "http://"+tp.vip.String()+"/"); err != nil {
				t.Fatalf("request after reload to %q: %v", want, err)
			}
		}
	}
	if got, want := order(), "filter@10 xlb@50 "; got != want {
		t.Fatalf("chain at start: %q, want %q", got, want)
	}

	// A priority change keeps the member's maps: client2, denied by the
	// filter, stays denied.
	filterMap := filepath.Join(pinPath, "chain", "filter", "filter_ipv4")
	denyClient2(t, filterMap, tp.c2)
	idBefore := xlbtest.PinnedMapID(t, filterMap)
	if err := tp.reaches(tp.c2); err == nil {
		t.Fatal("client2 reached the VIP through a filter that denies it")
	}
	reload(member("    priority: 20\n"), "filter@20 xlb@50 ")
	if id := xlbtest.PinnedMapID(t, filterMap); id != idBefore {
		t.Errorf("filter's map is %d after a priority change, was %d: recreated", id, idBefore)
	}
	if err := tp.reaches(tp.c2); err == nil {
		t.Error("client2 reached the VIP after the filter's priority changed: its block list was lost")
	}

	reload("", "xlb@50 ")
	if err := tp.reaches(tp.c2); err != nil {
		t.Errorf("client2 after the filter left: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(pinPath, "chain", "filter")); len(ents) != 0 {
		t.Errorf("removed member's pins are left: %v", ents)
	}
	reload(member("    priority: 60\n"), "xlb@50 filter@60 ")
}

// denyClient2 denies h's source address in xdp-filter's pinned IPv4 map,
// as `xdp-filter ip ADDR --mode src` does: a per-CPU hash from IPv4
// address to flags.
func denyClient2(t *testing.T, pin string, h *testnet.Host) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a := h.IP.As4()
	vals := make([]uint64, ebpf.MustPossibleCPU())
	for i := range vals {
		vals[i] = xdpFilterSrc
	}
	if err := m.Put(binary.NativeEndian.Uint32(a[:]), vals); err != nil {
		t.Fatal(err)
	}
}
