package main

import (
	"context"
	"fmt"
	"slices"
	"testing"
)

// TestSourceAddress runs xlbd with a source address that is none of the
// host's: xlbd adds it so backends' replies to it reach the load
// balancer, connections leave from it, and it is gone after xlbd stops.
func TestSourceAddress(t *testing.T) {
	ct := newConfigTopo(t, "native")
	src := ct.lan.AddrInSubnet(140)
	ct.start(t, fmt.Sprintf("iface: eth0\nsource-address: %s\nservices:\n  - vip: %s\n    backends: [%s, %s]\n",
		src, ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	if !slices.Contains(lbState(t, ct.lb).Addrs, src.String()+"/32") {
		t.Fatalf("source address %s not added to eth0: %v", src, lbState(t, ct.lb))
	}
	c := ct.c1.NS.HTTPClient(false)
	for i := 0; i < 20; i++ {
		if _, err := get(t, c, "http://"+ct.vip.String()+"/"); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	conn := ct.topo.open(t, ct.c2)
	cs, err := ct.d.Client().Conns(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, x := range cs {
		if x.Client == conn.conn.LocalAddr().String() {
			found = true
			if want := src.String() + ":"; len(x.Source) < len(want) || x.Source[:len(want)] != want {
				t.Errorf("connection leaves from %s, want %s", x.Source, src)
			}
		}
	}
	if !found {
		t.Fatalf("connection of %s not tracked: %v", conn.conn.LocalAddr(), cs)
	}
	conn.conn.Close()
	if err := ct.d.Stop(); err != nil {
		t.Fatalf("xlbd exited with %v", err)
	}
	if slices.Contains(lbState(t, ct.lb).Addrs, src.String()+"/32") {
		t.Errorf("source address %s left on eth0 after xlbd stopped", src)
	}
}
