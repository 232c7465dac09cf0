package main

import (
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

// TestReloadRemovesAddedVIP: a VIP that is no interface address is added
// to eth0 for its service and removed again when a reload drops the
// service, while xlbd keeps running; the VIP on eth0's own address stays.
func TestReloadRemovesAddedVIP(t *testing.T) {
	ct := newConfigTopo(t, "native")
	extra := ct.lan.AddrInSubnet(120)
	own := fmt.Sprintf("  - vip: %s\n    backends: [%s]\n", ct.vip, addr(ct.ba, backendPort))
	other := fmt.Sprintf("  - vip: %s:80\n    backends: [%s]\n", extra, addr(ct.bb, backendPort))
	ct.start(t, "iface: eth0\nservices:\n"+own+other)
	vipOnEth0 := func() bool { return slices.Contains(lbState(t, ct.lb).Addrs, extra.String()+"/32") }
	if !vipOnEth0() {
		t.Fatalf("vip %s not added to eth0: %v", extra, lbState(t, ct.lb))
	}
	if b, err := testnet.Get(t.Context(), ct.c1.NS.HTTPClient(false), fmt.Sprintf("http://%s:80/", extra)); err != nil || b != "backend-b" {
		t.Fatalf("request to %s: %q, %v", extra, b, err)
	}
	ct.writeConfig(t, "iface: eth0\nservices:\n"+own)
	if err := ct.d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for vipOnEth0() {
		if time.Now().After(deadline) {
			t.Fatalf("vip %s still on eth0 after the reload dropped its service: %v\n%s", extra, lbState(t, ct.lb), ct.d.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if b, err := testnet.Get(t.Context(), ct.c1.NS.HTTPClient(false), "http://"+ct.vip.String()+"/"); err != nil || b != "backend-a" {
		t.Fatalf("request to %s after the reload: %q, %v", ct.vip, b, err)
	}
}
