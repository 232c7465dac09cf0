package preflight

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/testnet"
)

// TestPreflight runs Check in a network namespace with an interface
// carrying 10.77.0.1/24 and another without an address (veths: the dummy
// module is not on every machine).
func TestPreflight(t *testing.T) {
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "preflight")
	err := ns.Do(func() error {
		for _, name := range []string{"dummy0", "bare0"} {
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
				return err
			}
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		l, err := netlink.LinkByName("dummy0")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr("10.77.0.1/24")
		if err := netlink.AddrAdd(l, a); err != nil {
			return err
		}
		a6, _ := netlink.ParseAddr("fd00:77::1/64")
		a6.Flags = unix.IFA_F_NODAD
		return netlink.AddrAdd(l, a6)
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := func(edit func(*config.Config)) *config.Config {
		c := config.Default()
		c.Iface = "dummy0"
		c.Services = []config.Service{{
			VIP:      netip.MustParseAddrPort("10.77.0.1:80"),
			Policy:   "random",
			Backends: []config.Backend{{Address: netip.MustParseAddrPort("10.77.0.2:8080"), Weight: 1}},
		}}
		if edit != nil {
			edit(c)
		}
		return c
	}
	tests := []struct {
		name string
		cfg  *config.Config
		want string // "" for no error
	}{
		{"good", cfg(nil), ""},
		{"good with the ports beyond the ephemeral range", cfg(func(c *config.Config) { c.SourcePorts = config.PortRange{Lo: 61000, Hi: 65535} }), ""},
		{"overlap not checked for a source address not the host's", cfg(func(c *config.Config) {
			c.SourceAddresses = config.AddrPool{netip.MustParsePrefix("10.77.0.9/32")}
			c.SourcePorts = config.PortRange{Lo: 30000, Hi: 40000}
		}), ""},
		{"no such interface", cfg(func(c *config.Config) { c.Iface = "nosuch0" }), `iface: no interface "nosuch0" on this host`},
		{"loopback", cfg(func(c *config.Config) { c.Iface = "lo" }), "iface: lo is the loopback interface"},
		{"no IPv4 address", cfg(func(c *config.Config) { c.Iface = "bare0" }), "iface: bare0 has no IPv4 address: give it one, or set an IPv4 address in source-addresses"},
		{"no IPv4 address but source-addresses", cfg(func(c *config.Config) {
			c.Iface = "bare0"
			c.SourceAddresses = config.AddrPool{netip.MustParsePrefix("10.77.0.9/32")}
		}), ""},
		{"ephemeral overlap", cfg(func(c *config.Config) { c.SourcePorts = config.PortRange{Lo: 30000, Hi: 40000} }),
			"source-ports: source ports overlap the kernel's ephemeral ports: source-ports 30000-40000 on 10.77.0.1, ephemeral 32768-60999"},
		{"vip port in the source ports", cfg(func(c *config.Config) { c.Services[0].VIP = netip.MustParseAddrPort("10.77.0.1:10000") }),
			"services[0].vip: port 10000 of the source address 10.77.0.1 is inside source-ports 10000-32767"},
		{"vip port in the source ports of another address is fine", cfg(func(c *config.Config) { c.Services[0].VIP = netip.MustParseAddrPort("10.77.0.5:10000") }), ""},
		{"vip port in the source ports of a service's own source address", cfg(func(c *config.Config) {
			c.Services[0].SourceAddresses = config.AddrPool{netip.MustParsePrefix("10.77.0.20/32")}
			c.Services = append(c.Services, config.Service{VIP: netip.MustParseAddrPort("10.77.0.20:12000"), Policy: "random",
				Backends: []config.Backend{{Address: netip.MustParseAddrPort("10.77.0.3:80"), Weight: 1}}})
		}), "services[1].vip: port 12000 of the source address 10.77.0.20 is inside source-ports 10000-32767"},
		{"auto ports on the host's address: 10000-32767, clear of the ephemeral ports", cfg(func(c *config.Config) { c.SourcePorts = config.PortRange{} }), ""},
		{"backend on this host", cfg(func(c *config.Config) {
			c.Services[0].Backends = append(c.Services[0].Backends, config.Backend{Address: netip.MustParseAddrPort("10.77.0.1:8080"), Weight: 1})
		}), "services[0].backends[1]: 10.77.0.1:8080 is an address of this host"},
		{"backend on a vip", cfg(func(c *config.Config) {
			c.Services[0].VIP = netip.MustParseAddrPort("10.77.0.50:80")
			c.Services[0].Backends[0].Address = netip.MustParseAddrPort("10.77.0.50:8080")
		}), "services[0].backends[0]: 10.77.0.50:8080 is a VIP's address"},
	}
	v6 := func(edit func(*config.Config)) *config.Config {
		return cfg(func(c *config.Config) {
			c.Services[0].VIP = netip.MustParseAddrPort("[fd00:77::50]:80")
			c.Services[0].Backends[0].Address = netip.MustParseAddrPort("[fd00:77::2]:8080")
			if edit != nil {
				edit(c)
			}
		})
	}
	tests = append(tests, []struct {
		name string
		cfg  *config.Config
		want string
	}{
		{"ipv6 service from the interface's ipv6 address", v6(nil), ""},
		{"ipv6 service, interface without a global ipv6 address", v6(func(c *config.Config) {
			c.Iface = "bare0"
			c.SourceAddresses = config.AddrPool{netip.MustParsePrefix("10.77.0.9/32")}
		}), "iface: bare0 has no global IPv6 address (or it is still tentative) for the IPv6 services"},
		{"ipv6 service, interface without one but an ipv6 source address", v6(func(c *config.Config) {
			c.Iface = "bare0"
			c.SourceAddresses = config.AddrPool{netip.MustParsePrefix("10.77.0.9/32"), netip.MustParsePrefix("fd00:77::9/128")}
		}), ""},
		{"ipv6 vip port in the source ports", v6(func(c *config.Config) { c.Services[0].VIP = netip.MustParseAddrPort("[fd00:77::1]:10000") }),
			"services[0].vip: port 10000 of the source address fd00:77::1 is inside source-ports 10000-32767"},
		{"ipv6 backend on this host", v6(func(c *config.Config) {
			c.Services[0].Backends[0].Address = netip.MustParseAddrPort("[fd00:77::1]:8080")
		}),
			"services[0].backends[0]: [fd00:77::1]:8080 is an address of this host"},
	}...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got error
			if err := ns.Do(func() error { got = Check(tt.cfg); return nil }); err != nil {
				t.Fatal(err)
			}
			switch {
			case tt.want == "" && got != nil:
				t.Errorf("Check: %v, want no error", got)
			case tt.want != "" && (got == nil || !strings.Contains(got.Error(), tt.want)):
				t.Errorf("Check: %v, want %q", got, tt.want)
			}
		})
	}
}
