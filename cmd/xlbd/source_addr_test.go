package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"syscall"
	"testing"
)

// TestSourceAddresses runs xlbd with source addresses that are none of the
// host's: xlbd adds them so backends' replies reach the load balancer, the
// default port range is then the whole 1024-65535, a service's
// connections leave from its own addresses, each address gives a backend
// the whole range (two addresses of two ports hold four connections to
// one backend), and the addresses are gone after xlbd stops.
func TestSourceAddresses(t *testing.T) {
	ct := newConfigTopo(t, "native")
	// 10.199.0.140/31: .140 and .141, for the top level; .150 for one
	// service only.
	pool := netip.PrefixFrom(ct.lan.AddrInSubnet(140), 31)
	own := ct.lan.AddrInSubnet(150)
	vip81 := netip.AddrPortFrom(ct.lb.IP, 81)
	ct.start(t, fmt.Sprintf(`
iface: eth0
source-addresses: %s
services:
  - vip: %s
    backends: [%s]
  - vip: %s
    source-addresses: [%s]
    backends: [%s]
`, pool, ct.vip, addr(ct.ba, backendPort), vip81, own, addr(ct.bb, backendPort)))
	srcs := []netip.Addr{pool.Addr(), pool.Addr().Next(), own}
	for _, a := range srcs {
		if !slices.Contains(lbState(t, ct.lb).Addrs, a.String()+"/32") {
			t.Fatalf("source address %s not added to eth0: %v", a, lbState(t, ct.lb))
		}
	}
	st, err := ct.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.SourcePorts != "1024-65535" || len(st.SourceAddresses) != 3 {
		t.Errorf("status: source addresses %v, ports %s; want the three, 1024-65535", st.SourceAddresses, st.SourcePorts)
	}
	for _, s := range st.Services {
		want := 2 * (65535 - 1024 + 1)
		if s.Vip == vip81.String() {
			want /= 2
		}
		if got := int(s.Backends[0].PortPool); got != want {
			t.Errorf("service %s: a backend's pool of %d ports, want %d", s.Vip, got, want)
		}
	}

	// Connections of the first service leave from both pool addresses
	// (the start address is the flow's hash), the second's from its own.
	from := map[netip.AddrPort]map[netip.Addr]bool{ct.vip: {}, vip81: {}}
	for i := range 24 {
		vip := ct.vip
		if i%3 == 2 {
			vip = vip81
		}
		conn, err := ct.c1.NS.Dial(context.Background(), "tcp", vip.String())
		if err != nil {
			t.Fatalf("connection %d to %s: %v", i, vip, err)
		}
		defer conn.Close()
		if x, ok := ct.conn(t, conn.LocalAddr().String()); ok {
			from[vip][netip.MustParseAddrPort(x.Source).Addr()] = true
		}
	}
	if !from[ct.vip][srcs[0]] || !from[ct.vip][srcs[1]] || len(from[ct.vip]) != 2 {
		t.Errorf("connections to %s left from %v, want both pool addresses", ct.vip, from[ct.vip])
	}
	if !from[vip81][own] || len(from[vip81]) != 1 {
		t.Errorf("connections to %s left from %v, want only %s", vip81, from[vip81], own)
	}
	if err := ct.d.Stop(); err != nil {
		t.Fatalf("xlbd exited with %v", err)
	}
	for _, a := range srcs {
		if slices.Contains(lbState(t, ct.lb).Addrs, a.String()+"/32") {
			t.Errorf("source address %s left on eth0 after xlbd stopped", a)
		}
	}
}

// TestSourcePortsPerAddress gives one backend two source addresses of two
// ports each: four connections are held, the fifth is refused.
func TestSourcePortsPerAddress(t *testing.T) {
	ct := newConfigTopo(t, "native")
	pool := netip.PrefixFrom(ct.lan.AddrInSubnet(140), 31)
	ct.start(t, fmt.Sprintf("iface: eth0\nsource-addresses: %s\nsource-ports: 20000-20001\nservices:\n  - vip: %s\n    backends: [%s]\n",
		pool, ct.vip, addr(ct.ba, backendPort)))
	for i := range 4 {
		conn, err := ct.c1.NS.Dial(context.Background(), "tcp", ct.vip.String())
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		defer conn.Close()
		if b, err := request(conn); err != nil || b != "backend-a" {
			t.Fatalf("connection %d: %q, %v", i+1, b, err)
		}
	}
	conn, err := ct.c1.NS.Dial(context.Background(), "tcp", ct.vip.String())
	if err == nil {
		conn.Close()
		t.Fatal("a fifth connection was served with 2 addresses of 2 ports")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("the fifth connection: %v, want refused", err)
	}
}
