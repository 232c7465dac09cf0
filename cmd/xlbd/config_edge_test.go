package main

import (
	"fmt"
	"strings"
	"testing"
)

// TestConfigEdgeCases runs xlbd with the broken configurations of issue
// 13 (§7) that used to exit with status 1, or be accepted, or be reported
// unclearly: each must exit with status 2, before the host is touched,
// with a message that names the key and says what is wrong. The checks
// that need the host (the interface, the ephemeral ports, the host's own
// addresses, the policy plugin's handshake) run before anything is loaded.
func TestConfigEdgeCases(t *testing.T) {
	ct := newConfigTopo(t, "generic")
	vip, a := ct.vip.String(), addr(ct.ba, backendPort)
	service := func(vip string, backends ...string) string {
		return fmt.Sprintf("services:\n  - vip: %s\n    backends: [%s]\n", vip, strings.Join(backends, ", "))
	}
	good := "iface: eth0\n" + service(vip, a)
	tests := []struct {
		name    string
		file    string
		env     []string
		flags   []string
		wantMsg []string
	}{
		// Exit status 1 before: the host checks ran after loading.
		{name: "source ports overlapping ip_local_port_range", file: good + "source-ports: 30000-40000\n",
			wantMsg: []string{"source-ports: source ports overlap the kernel's ephemeral ports: source-ports 30000-40000 on " + ct.lb.IP.String() + ", ephemeral 32768-60999 (net.ipv4.ip_local_port_range)", "choose a range outside it"}},
		{name: "vip port inside the source-port range", file: "iface: eth0\n" + service(fmt.Sprintf("%s:12000", ct.lb.IP), a),
			wantMsg: []string{fmt.Sprintf("services[0].vip: port 12000 of the source address %s is inside source-ports 10000-32767", ct.lb.IP)}},
		{name: "nonexistent interface by flag", file: service(vip, a), flags: []string{"--iface", "nosuch0"},
			wantMsg: []string{`iface: no interface "nosuch0" on this host`}},
		{name: "nonexistent interface by environment", file: service(vip, a), env: []string{"XLB_IFACE=nosuch1"},
			wantMsg: []string{`iface: no interface "nosuch1" on this host`}},
		{name: "loopback interface", file: "iface: lo\n" + service(vip, a),
			wantMsg: []string{"iface: lo is the loopback interface"}},
		{name: "/bin/true as the policy", file: "iface: eth0\n" + service(vip, a) + "    policy: /bin/true\n",
			wantMsg: []string{"services[0].policy: plugin /bin/true did not start"}},
		{name: "/bin/true as the second service's policy", file: good + "  - vip: " + ct.lb.IP.String() + ":81\n    backends: [" + a + "]\n    policy: /bin/true\n",
			wantMsg: []string{"services[1].policy: plugin /bin/true did not start"}},
		// Accepted before.
		{name: "max-entries 1024.7", file: good + "conntrack: {max-entries: 1024.7}\n",
			wantMsg: []string{"conntrack.max-entries: want a whole number, got 1024.7"}},
		{name: "max-entries 1.5e6", file: good + "conntrack: {max-entries: 1.5e6}\n",
			wantMsg: []string{"conntrack.max-entries: want a whole number, got 1.5e+06"}},
		{name: "vip 127.0.0.1", file: "iface: eth0\n" + service("127.0.0.1:80", a),
			wantMsg: []string{"services[0].vip: 127.0.0.1:80 is a loopback address"}},
		{name: "backend on the load balancer itself", file: "iface: eth0\n" + service(vip, a, addr(ct.lb, 8080)),
			wantMsg: []string{fmt.Sprintf("services[0].backends[1]: %s:8080 is an address of this host", ct.lb.IP)}},
		{name: "backend on another service's vip", file: "iface: eth0\n" + service(vip, a) + "  - vip: " + ct.lan.AddrInSubnet(100).String() + ":80\n    backends: [" + ct.lan.AddrInSubnet(100).String() + ":8080]\n",
			wantMsg: []string{"services[1].backends[0]: " + ct.lan.AddrInSubnet(100).String() + ":8080 is a VIP's address"}},
		// Unclear before.
		{name: "huge max-entries", file: good + "conntrack: {max-entries: 99999999999999999999}\n",
			wantMsg: []string{"conntrack.max-entries: 1e+20 is too large"}},
		{name: "unquoted all-digit sha-256", file: good + "plugin-sha256: {random: " + strings.Repeat("1", 64) + "}\n",
			wantMsg: []string{"plugin-sha256[random]: want text, got the number 1.1111111111111112e+63", "write the value in quotes"}},
		{name: "unquoted sha-256 of zeros", file: good + "plugin-sha256: {random: " + strings.Repeat("0", 64) + "}\n",
			wantMsg: []string{"plugin-sha256[random]: want text, got the number 0"}},
	}
	before := lbState(t, ct.lb)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ct.checkRefused(t, before, tt.file, tt.env, tt.flags, 2, tt.wantMsg...)
		})
	}
}
