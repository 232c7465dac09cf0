package vipfilter

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/testnet"
)

func TestTable(t *testing.T) {
	for iface, want := range map[string]string{"eth0": "xlb_eth0", "bond0.100": "xlb_bond0_100", "br-lan": "xlb_br_lan"} {
		if got := Table(iface); got != want {
			t.Errorf("Table(%q) = %q, want %q", iface, got, want)
		}
	}
}

// TestFilter installs, changes and removes the table in a network
// namespace and checks what nft lists, for IPv4 and IPv6 VIPs.
func TestFilter(t *testing.T) {
	testnet.RequirePrivileged(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatalf("nft (package nftables): %v", err)
	}
	ns := testnet.NewNS(t, "vipfilter")
	ctx := context.Background()
	a, b := netip.MustParseAddr("10.9.0.1"), netip.MustParseAddr("10.9.0.2")
	a6 := netip.MustParseAddr("fd09::1")
	f := New("eth0")
	err := ns.Do(func() error {
		if err := f.Set(ctx, nil); err != nil || f.Installed() {
			t.Errorf("no VIP: installed %v, %v", f.Installed(), err)
		}
		if err := f.Set(ctx, []netip.Addr{b, a6, a, b}); err != nil {
			return err
		}
		out, err := exec.Command("nft", "list", "table", "inet", "xlb_eth0").CombinedOutput()
		if err != nil {
			return err
		}
		for _, want := range []string{"elements = { 10.9.0.1, 10.9.0.2 }", "elements = { fd09::1 }", "hook input", "ip daddr @vips ip protocol icmp accept",
			"ip daddr @vips ct state established,related accept", "ip daddr @vips meta l4proto tcp reject with tcp reset", "ip daddr @vips reject with icmp port-unreachable",
			"ip6 daddr @vips6 meta l4proto ipv6-icmp accept", "ip6 daddr @vips6 ct state established,related accept",
			"ip6 daddr @vips6 meta l4proto tcp reject with tcp reset", "ip6 daddr @vips6 reject with icmpv6 port-unreachable"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("table lacks %q:\n%s", want, out)
			}
		}
		if err := f.Set(ctx, []netip.Addr{b}); err != nil {
			return err
		}
		out, _ = exec.Command("nft", "list", "set", "inet", "xlb_eth0", "vips").CombinedOutput()
		if !strings.Contains(string(out), "elements = { 10.9.0.2 }") {
			t.Errorf("after Set(b):\n%s", out)
		}
		if err := f.Remove(ctx); err != nil {
			return err
		}
		if ok, err := Exists(ctx, "xlb_eth0"); ok || err != nil {
			t.Errorf("after Remove: exists %v, %v", ok, err)
		}
		return Remove(ctx, "xlb_eth0") // nothing there: no error
	})
	if err != nil {
		t.Fatal(err)
	}
}
