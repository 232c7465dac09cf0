package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

// dialResult dials addr from host h and says what happened: "connected",
// "refused", or the error.
func dialResult(h *testnet.Host, addr netip.AddrPort) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := h.NS.Dial(ctx, "tcp", addr.String())
	switch {
	case err == nil:
		conn.Close()
		return "connected"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	}
	return err.Error()
}

// TestVIPOtherPorts: a VIP xlbd adds answers only its services' ports.
// The load balancer host listens on 0.0.0.0:2222; a client reaches it on
// the host's own address (also a VIP, of a service on port 80: the host's
// address stays the host's), but on the added VIP port 2222 is refused
// by the VIP filter, while the VIP's port 80 is served and it answers
// ping. With vip-filter: false the host's listener answers on the VIP.
func TestVIPOtherPorts(t *testing.T) {
	ct := newConfigTopo(t, "native")
	vip := ct.lan.AddrInSubnet(100)
	ct.lb.NS.ServeHTTP(t, "0.0.0.0:2222", "lb-host")
	yaml := fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s:80\n    backends: [%s]\n  - vip: %s:80\n    backends: [%s]\n",
		vip, addr(ct.ba, backendPort), ct.lb.IP, addr(ct.bb, backendPort))
	check := func(t *testing.T, want2222 string) {
		t.Helper()
		c := ct.c1.NS.HTTPClient(false)
		if b, err := testnet.Get(t.Context(), c, fmt.Sprintf("http://%s:80/", vip)); err != nil || b != "backend-a" {
			t.Errorf("vip %s:80: %q, %v", vip, b, err)
		}
		if got := dialResult(ct.c1, netip.AddrPortFrom(vip, 2222)); got != want2222 {
			t.Errorf("vip %s:2222: %s, want %s", vip, got, want2222)
		}
		if got := dialResult(ct.c1, netip.AddrPortFrom(ct.lb.IP, 2222)); got != "connected" {
			t.Errorf("the host's own address %s:2222: %s, want connected", ct.lb.IP, got)
		}
		if out, err := ct.c1.NS.ExecErr("ping", "-c", "1", "-W", "2", vip.String()); err != nil {
			t.Errorf("ping %s: %v\n%s", vip, err, out)
		}
	}
	t.Run("vip-filter true (default)", func(t *testing.T) {
		ct.start(t, yaml)
		check(t, "refused")
		out, err := exec.Command(filepath.Join(ct.d.Dir, "xlbctl"), "--socket", ct.d.Socket, "status").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "vip filter: nftables table inet xlb_eth0 on "+vip.String()+"\n") {
			t.Errorf("xlbctl status: %v\n%s", err, out)
		}
		if strings.Contains(string(out), ct.lb.IP.String()+"\n") {
			t.Errorf("the host's own address is in the vip filter:\n%s", out)
		}
		ct.d.Stop()
	})
	t.Run("vip-filter false", func(t *testing.T) {
		ct.start(t, yaml, "--vip-filter=false")
		check(t, "connected")
		st, err := ct.d.Client().Status(context.Background())
		if err != nil || st.GetState().GetVipFilter() != "" {
			t.Errorf("status: vip filter %q, %v; want none", st.GetState().GetVipFilter(), err)
		}
		ct.d.Stop()
	})
}

// TestDuplicateVIPRefused: another host of the LAN holds the VIP. xlbd,
// about to add it, probes it with ARP, hears the other host and refuses
// the service, naming the other host's MAC and the way out, and leaves the
// host as it was. With manage-vip: false it leaves the address alone and
// starts.
func TestDuplicateVIPRefused(t *testing.T) {
	ct := newConfigTopo(t, "native")
	vip := ct.lan.AddrInSubnet(100)
	ct.bc.NS.Exec(t, "ip", "addr", "add", vip.String()+"/32", "dev", "eth0")
	yaml := fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s:80\n    backends: [%s]\n", vip, addr(ct.ba, backendPort))
	before := lbState(t, ct.lb)
	ct.writeConfig(t, yaml)
	code, out := runXlbd(t, ct.lb.NS, nil, "--config", ct.file)
	t.Logf("xlbd with a VIP another host holds: %s", strings.TrimSpace(out))
	if code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	for _, want := range []string{"address in use by another host", ct.bc.MAC.String(), "manage-vip: false"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if after := lbState(t, ct.lb); !after.equal(before) {
		t.Errorf("lb host changed:\n  before %v\n  after  %v", before, after)
	}

	ct.start(t, strings.Replace(yaml, "    backends:", "    manage-vip: false\n    backends:", 1))
	if slices.Contains(lbState(t, ct.lb).Addrs, vip.String()+"/32") {
		t.Errorf("xlbd added %s with manage-vip: false", vip)
	}
}
