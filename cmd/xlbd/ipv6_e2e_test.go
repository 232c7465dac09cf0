package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

// TestIPv6EndToEnd runs xlbd with an IPv6 service beside an IPv4 one, on
// the demo's LAN (every host has an IPv4 and an IPv6 address). The IPv6
// VIP is not the load balancer's own address, so xlbd adds it (a /128 the
// host answers neighbour solicitations for); the IPv6 source address is
// the interface's own, found by xlbd since none is configured. HTTP over
// IPv6 reaches both backends, two clients with one source port stay
// apart, thousands of short connections complete, the IPv4 service keeps
// working beside it, and stopping xlbd undoes every change, IPv6
// forwarding included.
func TestIPv6EndToEnd(t *testing.T) {
	ct := newConfigTopo(t, "native")
	for _, h := range []*testnet.Host{ct.ba, ct.bb} {
		h.NS.ServeHTTP(t, netip.AddrPortFrom(h.IP6, backendPort).String(), h.Name+"-v6")
	}
	before := lbState(t, ct.lb)
	vip6 := netip.AddrPortFrom(ct.lan.AddrInSubnet6(50), 80)
	ct.start(t, fmt.Sprintf(`
iface: eth0
services:
  - vip: "%s"
    backends: ["%s", "%s"]
  - vip: %s
    backends: [%s, %s]
`, vip6, netip.AddrPortFrom(ct.ba.IP6, backendPort), netip.AddrPortFrom(ct.bb.IP6, backendPort),
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))

	running := lbState(t, ct.lb)
	if !slices.Contains(running.Addrs, vip6.Addr().String()+"/128") || running.Forward6 != "1" || running.Forwarding != "1" {
		t.Fatalf("while running: %v; want %s/128 added and forwarding on in both families", running, vip6.Addr())
	}
	st, err := ct.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(st.SourceAddresses, ct.lb.IP6.String()) || !slices.Contains(st.SourceAddresses, ct.lb.IP.String()) {
		t.Errorf("source addresses %v, want the interface's IPv4 %s and IPv6 %s", st.SourceAddresses, ct.lb.IP, ct.lb.IP6)
	}

	url6 := "http://" + vip6.String() + "/"
	t.Run("both backends answer over IPv6", func(t *testing.T) {
		seen := ct.split(t, url6, 40)
		if seen["backend-a-v6"] == 0 || seen["backend-b-v6"] == 0 || len(seen) != 2 {
			t.Errorf("answers by backend %v, want both IPv6 backends and nothing else", seen)
		}
	})
	t.Run("the IPv4 service beside it", func(t *testing.T) {
		seen := ct.split(t, "http://"+ct.vip.String()+"/", 20)
		if seen["backend-a"] == 0 || seen["backend-b"] == 0 || len(seen) != 2 {
			t.Errorf("answers by backend %v, want both IPv4 backends", seen)
		}
	})
	t.Run("same source port from two clients", func(t *testing.T) {
		cs := ct.sharedPortConns(t, vip6, true)
		clients := map[string]string{}
		for _, c := range cs {
			clients[c.Client] = c.Backend + " from " + c.Source
			if !strings.HasPrefix(c.Source, "["+ct.lb.IP6.String()+"]:") {
				t.Errorf("connection of %s leaves from %s, want the interface's IPv6 address %s", c.Client, c.Source, ct.lb.IP6)
			}
		}
		if len(clients) != 2 {
			t.Errorf("established IPv6 connections from port %d: %v, want one per client", sharedPort, clients)
		}
	})
	t.Run("thousands of short connections", func(t *testing.T) {
		start := time.Now()
		seen := ct.split(t, url6, 2000)
		t.Logf("2000 IPv6 connections in %v: %v", time.Since(start), seen)
	})
	t.Run("no unexpected drops", func(t *testing.T) {
		c := ct.counters(t)
		for name, v := range c {
			if strings.HasPrefix(name, "drop_") && name != "drop_no_conn" && v > 0 {
				t.Errorf("counter %s = %d", name, v)
			}
		}
		if c["new_conn"] < 2060 {
			t.Errorf("counters show %d new connections, want at least 2060: %v", c["new_conn"], c)
		}
	})
	if err := ct.d.Stop(); err != nil {
		t.Fatal(err)
	}
	if after := lbState(t, ct.lb); !after.equal(before) {
		t.Errorf("after SIGTERM: %v\nbefore xlbd:  %v", after, before)
	}
}

// TestPathMTUIPv6 is TestPathMTU over IPv6: a router with a 1280-byte link
// (IPv6's minimum) between the load balancer and the backend answers the
// client's full-size segments with ICMPv6 "packet too big" to the load
// balancer's source address; xlb translates it back to the client, whose
// path MTU to the VIP drops, and a 4 MiB upload and download complete
// byte-exact. Routers never fragment IPv6: without the translation the
// upload stalls.
func TestPathMTUIPv6(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"client1", "lb", "router"}, NativePeerXDP: true})
	c1, lb, router := lan.Host("client1"), lan.Host("lb"), lan.Host("router")
	far := testnet.NewNS(t, "far")
	farNet := netip.MustParsePrefix("fd00:201::/64")
	testnet.Link(t, router.NS, far, "narrow", 1280, netip.MustParsePrefix("fd00:201::1/64"), netip.MustParsePrefix("fd00:201::2/64"))
	router.NS.Sysctl(t, "net.ipv6.conf.all.forwarding", "1")
	far.Exec(t, "ip", "-6", "route", "add", "default", "via", "fd00:201::1", "advmss", "1440")
	lb.NS.Exec(t, "ip", "-6", "route", "add", farNet.String(), "via", router.IP6.String())
	backend := netip.AddrPortFrom(netip.MustParseAddr("fd00:201::2"), 9000)

	vip := netip.AddrPortFrom(lb.IP6, 80)
	pmtuTransfer(t, lan, c1, lb, far, vip, backend)
	route := c1.NS.Exec(t, "ip", "-6", "route", "get", vip.Addr().String())
	if !strings.Contains(route, "mtu 1280") {
		t.Errorf("client's route to the VIP %q: want its path MTU lowered to 1280", route)
	}
}
