package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// exampleFile is the example of docs/configuration.md.
const exampleFile = `
iface: eth0
xdp-mode: native
source-ports: 10000-32767
conntrack:
  max-entries: 65536
  timeouts: {established: 15m}
services:
  - vip: 10.0.0.10:80
    policy: hash
    backends: [10.0.0.2:8080, {address: 10.0.0.3:8080, weight: 3}]
`

// oneService is a minimal valid file.
const oneService = `
iface: eth0
services:
  - vip: 10.0.0.10:80
    backends: [10.0.0.2:8080]
`

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// svc builds a service from backends written "IP:PORT" or "IP:PORT@WEIGHT".
func svc(vip, policy string, backends ...string) Service {
	s := Service{VIP: ap(vip), Protocol: "tcp", Policy: policy, AllDown: AllDownRST}
	for _, b := range backends {
		addr, w, ok := strings.Cut(b, "@")
		weight := uint32(1)
		if ok {
			fmt.Sscan(w, &weight)
		}
		s.Backends = append(s.Backends, Backend{Address: ap(addr), Weight: weight})
	}
	return s
}

func TestParse(t *testing.T) {
	// {{dir}} in file, args and wantErr is replaced by a temporary
	// directory holding the config file (config.yaml) and an object file
	// (prog.o); {{file}} is replaced by the config file's path.
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		file    string
		wantErr string
		// want edits Default() into the expected result.
		want func(c *Config)
	}{
		{
			name: "defaults with a flag service",
			args: []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--backend", "10.0.0.2:80"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:80")}
			},
		},
		{
			name: "file only",
			file: exampleFile,
			want: func(c *Config) {
				c.Iface = "eth0"
				c.SourcePorts = PortRange{Lo: 10000, Hi: 32767}
				c.Conntrack.MaxEntries = 65536
				c.Conntrack.Timeouts.Established = 15 * time.Minute
				c.Services = []Service{svc("10.0.0.10:80", "hash", "10.0.0.2:8080", "10.0.0.3:8080@3")}
			},
		},
		{
			name: "every scalar key in the file",
			file: `
iface: ens1f0
xdp-mode: generic
source-addresses: [192.0.2.1, 192.0.2.8/30]
source-ports: 1024-65535
policy: /usr/lib/xlb/policy-maglev
plugin-dir: /usr/lib/xlb
plugin-sha256:
  hash: 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
  /opt/Policies/custom.bin: 2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824
socket: /tmp/xlbd.sock
pin-path: /sys/fs/bpf/xlb-test
log-level: debug
log-format: json
metrics-address: 127.0.0.1:9190
conntrack:
  max-entries: 1024
  gc-interval: 250ms
  timeouts: {syn: 5s, established: 1h, fin: 30s, closed: 1s, udp: 45s, time-wait: 2m}
services:
  - vip: 10.0.0.10:80
    protocol: tcp
    backends: [10.0.0.2:80]
`,
			want: func(c *Config) {
				c.Iface = "ens1f0"
				c.XDPMode = "generic"
				c.SourceAddresses = AddrPool{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("192.0.2.8/30")}
				c.SourcePorts = PortRange{Lo: 1024, Hi: 65535}
				c.DefaultPolicy = "/usr/lib/xlb/policy-maglev"
				c.PluginDir = "/usr/lib/xlb"
				c.PluginSHA256 = map[string]string{
					"hash":                     "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
					"/opt/Policies/custom.bin": "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
				}
				c.Socket = "/tmp/xlbd.sock"
				c.PinPath = "/sys/fs/bpf/xlb-test"
				c.LogLevel = "debug"
				c.LogFormat = "json"
				c.MetricsAddress = "127.0.0.1:9190"
				c.Conntrack = Conntrack{
					MaxEntries: 1024,
					GCInterval: 250 * time.Millisecond,
					Timeouts:   Timeouts{SYN: 5 * time.Second, Established: time.Hour, FIN: 30 * time.Second, Closed: time.Second, UDP: 45 * time.Second, TimeWait: 2 * time.Minute},
				}
				c.Services = []Service{svc("10.0.0.10:80", "/usr/lib/xlb/policy-maglev", "10.0.0.2:80")}
			},
		},
		{
			name: "backend forms, weights and ports other than the vip's",
			file: `
iface: eth0
services:
  - vip: 10.0.0.10:443
    backends:
      - 10.0.0.2:8443
      - 10.0.0.3:9000@7
      - {address: 10.0.0.4:443, weight: 65535}
      - {address: 10.0.0.5:1}
`,
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{svc("10.0.0.10:443", "random",
					"10.0.0.2:8443", "10.0.0.3:9000@7", "10.0.0.4:443@65535", "10.0.0.5:1")}
			},
		},
		{
			name: "health checks, drained backends, all-down, socket-group",
			file: `
iface: eth0
socket-group: xlb
health-concurrency: 8
services:
  - vip: 10.0.0.10:80
    all-down: use-all
    health: {check: http, interval: 1s, timeout: 500ms, rise: 1, fall: 2, http: {path: /healthz, host: example.org, expect-status: 204}}
    backends:
      - 10.0.0.2:80@0
      - {address: 10.0.0.3:80, weight: 0, health: {check: tcp, reset-established: true}}
`,
			args: []string{"--vip", "10.0.0.11:80", "--backend", "10.0.0.4:80@0"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.SocketGroup = "xlb"
				c.HealthConcurrency = 8
				yes := true
				s := svc("10.0.0.10:80", "random", "10.0.0.2:80@0", "10.0.0.3:80@0")
				s.AllDown = AllDownUseAll
				s.Health = &Health{Check: HealthHTTP, Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 1, Fall: 2,
					HTTP: HTTPCheck{Path: "/healthz", Host: "example.org", ExpectStatus: 204}}
				s.Backends[1].Health = &Health{Check: HealthTCP, ResetEstablished: &yes}
				c.Services = []Service{s, svc("10.0.0.11:80", "random", "10.0.0.4:80@0")}
			},
		},
		{
			name: "log-format from the environment, metrics-address from a flag",
			file: oneService,
			env:  map[string]string{"XLB_LOG_FORMAT": "json", "XLB_METRICS_ADDRESS": "127.0.0.1:1"},
			args: []string{"--metrics-address", ":9100"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.LogFormat = "json"
				c.MetricsAddress = ":9100"
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080")}
			},
		},
		{
			name: "ipv6 services beside ipv4 ones",
			file: "iface: eth0\nsource-addresses: [10.0.0.5, '2001:db8::5']\nservices:\n  - {vip: '[2001:db8::10]:443', backends: ['[2001:db8::2]:8443', '[2001:db8::3]:8443@2']}\n  - {vip: 10.0.0.10:443, backends: [10.0.0.2:443]}\n",
			args: []string{"--vip", "[2001:db8::10]:53", "--protocol", "udp", "--backend", "[2001:db8::2]:53"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.SourceAddresses = AddrPool{netip.MustParsePrefix("10.0.0.5/32"), netip.MustParsePrefix("2001:db8::5/128")}
				dns := svc("[2001:db8::10]:53", "random", "[2001:db8::2]:53")
				dns.Protocol = "udp"
				c.Services = []Service{svc("[2001:db8::10]:443", "random", "[2001:db8::2]:8443", "[2001:db8::3]:8443@2"),
					svc("10.0.0.10:443", "random", "10.0.0.2:443"), dns}
			},
		},
		{
			name: "a tcp and a udp service on one vip and port",
			file: "iface: eth0\nservices:\n  - {vip: 10.0.0.10:53, backends: [10.0.0.2:53]}\n  - {vip: 10.0.0.10:53, protocol: udp, backends: [10.0.0.3:53]}\n",
			args: []string{"--vip", "10.0.0.11:53", "--protocol", "udp", "--backend", "10.0.0.4:53"},
			want: func(c *Config) {
				c.Iface = "eth0"
				udp := func(s Service) Service { s.Protocol = "udp"; return s }
				c.Services = []Service{svc("10.0.0.10:53", "random", "10.0.0.2:53"), udp(svc("10.0.0.10:53", "random", "10.0.0.3:53")),
					udp(svc("10.0.0.11:53", "random", "10.0.0.4:53"))}
			},
		},
		{
			name: "flags override the file",
			file: exampleFile,
			args: []string{"--iface", "eth9", "--xdp-mode", "generic", "--conntrack-max-entries", "2048",
				"--source-ports", "40000-40099", "--log-level", "warn", "--socket", "/run/x.sock",
				"--source-address", "10.9.0.1", "--source-address", "10.9.0.4/31", "--syn-defence", "on"},
			want: func(c *Config) {
				c.Iface = "eth9"
				c.XDPMode = "generic"
				c.SourcePorts = PortRange{Lo: 40000, Hi: 40099}
				c.SourceAddresses = AddrPool{netip.MustParsePrefix("10.9.0.1/32"), netip.MustParsePrefix("10.9.0.4/31")}
				c.SYNDefence.Mode = "on"
				c.LogLevel = "warn"
				c.Socket = "/run/x.sock"
				c.Conntrack.MaxEntries = 2048
				c.Conntrack.Timeouts.Established = 15 * time.Minute
				c.Services = []Service{svc("10.0.0.10:80", "hash", "10.0.0.2:8080", "10.0.0.3:8080@3")}
			},
		},
		{
			name: "flag service replaces the file service with the same vip",
			file: `
iface: eth0
services:
  - vip: 10.0.0.9:80
    backends: [10.0.0.1:80]
  - vip: 10.0.0.10:80
    policy: hash
    backends: [10.0.0.2:8080, 10.0.0.3:8080]
`,
			args: []string{"--vip", "10.0.0.10:80", "--backend", "10.0.0.7:80@5", "--backend", "10.0.0.8:81"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{
					svc("10.0.0.9:80", "random", "10.0.0.1:80"),
					svc("10.0.0.10:80", "random", "10.0.0.7:80@5", "10.0.0.8:81"),
				}
			},
		},
		{
			name: "flag service with another vip is appended",
			file: oneService,
			args: []string{"--vip", "10.0.0.11:443", "--backend", "10.0.0.3:443"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{
					svc("10.0.0.10:80", "random", "10.0.0.2:8080"),
					svc("10.0.0.11:443", "random", "10.0.0.3:443"),
				}
			},
		},
		{
			name: "--policy sets the default policy, not an explicit one",
			file: `
iface: eth0
services:
  - vip: 10.0.0.9:80
    backends: [10.0.0.1:80]
  - vip: 10.0.0.10:80
    policy: hash
    backends: [10.0.0.2:80]
`,
			args: []string{"--policy", "least-conn", "--vip", "10.0.0.11:80", "--backend", "10.0.0.3:80"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.DefaultPolicy = "least-conn"
				c.Services = []Service{
					svc("10.0.0.9:80", "least-conn", "10.0.0.1:80"),
					svc("10.0.0.10:80", "hash", "10.0.0.2:80"),
					svc("10.0.0.11:80", "least-conn", "10.0.0.3:80"),
				}
			},
		},
		{
			name: "env overrides the file",
			file: exampleFile,
			env: map[string]string{
				"XLB_IFACE":                          "eth1",
				"XLB_XDP_MODE":                       "generic",
				"XLB_SOURCE_PORTS":                   "30000-30999",
				"XLB_SOURCE_ADDRESSES":               "10.1.1.1, 10.1.1.2",
				"XLB_POLICY":                         "maglev",
				"XLB_CONNTRACK_MAX_ENTRIES":          "4096",
				"XLB_CONNTRACK_GC_INTERVAL":          "5s",
				"XLB_CONNTRACK_TIMEOUTS_ESTABLISHED": "2h",
				"XLB_CONNTRACK_TIMEOUTS_CLOSED":      "3s",
			},
			want: func(c *Config) {
				c.Iface = "eth1"
				c.XDPMode = "generic"
				c.SourcePorts = PortRange{Lo: 30000, Hi: 30999}
				c.SourceAddresses = AddrPool{netip.MustParsePrefix("10.1.1.1/32"), netip.MustParsePrefix("10.1.1.2/32")}
				c.DefaultPolicy = "maglev"
				c.Conntrack.MaxEntries = 4096
				c.Conntrack.GCInterval = 5 * time.Second
				c.Conntrack.Timeouts.Established = 2 * time.Hour
				c.Conntrack.Timeouts.Closed = 3 * time.Second
				c.Services = []Service{svc("10.0.0.10:80", "hash", "10.0.0.2:8080", "10.0.0.3:8080@3")}
			},
		},
		{
			name: "flags override env",
			file: oneService,
			env:  map[string]string{"XLB_IFACE": "eth1", "XLB_XDP_MODE": "fast", "XLB_CONNTRACK_MAX_ENTRIES": "4096", "XLB_POLICY": "hash"},
			args: []string{"--iface", "eth2", "--xdp-mode", "generic", "--conntrack-max-entries", "8192", "--policy", "random"},
			want: func(c *Config) {
				c.Iface = "eth2"
				c.XDPMode = "generic"
				c.Conntrack.MaxEntries = 8192
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080")}
			},
		},
		{
			name: "env without a file",
			env:  map[string]string{"XLB_IFACE": "eth3", "XLB_LOG_LEVEL": "error", "XLB_PIN_PATH": "/sys/fs/bpf/other"},
			args: []string{"--vip", "10.0.0.10:80", "--backend", "10.0.0.2:80"},
			want: func(c *Config) {
				c.Iface = "eth3"
				c.LogLevel = "error"
				c.PinPath = "/sys/fs/bpf/other"
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:80")}
			},
		},
		{
			name: "null sections keep the defaults",
			file: "iface: eth0\nconntrack:\nplugin-sha256:\nchain:\n" + oneService[len("\niface: eth0\n"):],
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080")}
			},
		},
		{
			name: "chain",
			file: oneService + `
xlb-priority: 40
chain:
  - name: fw
    object: {{dir}}/prog.o
    priority: 10
    continue-on: [pass, tx]
  - name: metrics-1
    object: {{dir}}/prog.o
    program: count
`,
			want: func(c *Config) {
				c.Iface = "eth0"
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080")}
				ten := 10
				c.XLBPriority = 40
				c.Chain = []ChainMember{
					{Name: "fw", Object: "{{dir}}/prog.o", Priority: &ten, ContinueOn: []string{"pass", "tx"}},
					{Name: "metrics-1", Object: "{{dir}}/prog.o", Program: "count"},
				}
			},
		},
		{
			name: "manage-vip and vip-filter",
			file: `
iface: eth0
manage-vip: false
vip-filter: false
services:
  - vip: 10.0.0.10:80
    backends: [10.0.0.2:8080]
  - vip: 10.0.0.11:80
    manage-vip: true
    backends: [10.0.0.2:8080]
`,
			want: func(c *Config) {
				c.Iface = "eth0"
				c.ManageVIP, c.VIPFilter = false, false
				yes := true
				second := svc("10.0.0.11:80", "random", "10.0.0.2:8080")
				second.ManageVIP = &yes
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080"), second}
			},
		},
		{
			name: "manage-vip, vip-filter and fresh-state from flags and env",
			args: []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--backend", "10.0.0.2:80", "--manage-vip=false", "--fresh-state"},
			env:  map[string]string{"XLB_VIP_FILTER": "false"},
			want: func(c *Config) {
				c.Iface = "eth0"
				c.ManageVIP, c.VIPFilter, c.FreshState = false, false, true
				c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:80")}
			},
		},
		{name: "manage-vip not a bool", file: oneService + "manage-vip: sometimes\n", wantErr: "manage-vip"},

		// Flags.
		{name: "help", args: []string{"--help"}, wantErr: "parse flags: pflag: help requested"},
		{name: "unknown flag", args: []string{"--ifcae", "eth0"}, wantErr: "parse flags: unknown flag: --ifcae"},
		{name: "positional argument", args: []string{"eth0"}, wantErr: `parse flags: unexpected argument "eth0"`},
		{name: "backend without vip", file: oneService, args: []string{"--backend", "10.0.0.2:80"}, wantErr: "--backend: needs --vip"},
		{name: "vip without backend", file: oneService, args: []string{"--vip", "10.0.0.11:80"}, wantErr: "--vip 10.0.0.11:80: needs at least one --backend"},
		{
			name:    "bad --vip",
			args:    []string{"--iface", "eth0", "--vip", "10.0.0.10", "--backend", "10.0.0.2:80"},
			wantErr: `--vip: parse address "10.0.0.10": missing port`,
		},
		{
			name:    "bad --backend weight",
			args:    []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--backend", "10.0.0.2:80@heavy"},
			wantErr: `--backend: parse weight "heavy": not a whole number up to 65535`,
		},
		{
			name:    "bad --conntrack-max-entries",
			args:    []string{"--conntrack-max-entries", "lots"},
			wantErr: `invalid argument "lots" for "--conntrack-max-entries"`,
		},

		// Reading the file.
		{name: "missing file", args: []string{"--config", "/nonexistent/xlb.yaml"}, wantErr: "read config: open /nonexistent/xlb.yaml: no such file or directory"},
		{name: "not yaml", file: "iface: [eth0", wantErr: "parse config {{file}}: yaml:"},
		{name: "not a map", file: "- eth0", wantErr: "parse config {{file}}: yaml:"},

		// Unknown keys and misshapen sections.
		{name: "unknown top-level key", file: oneService + "conntrak: {max-entries: 1024}\n", wantErr: `unknown key "conntrak" in {{file}}`},
		{name: "upper-case key", file: oneService + "Log-Level: debug\n", wantErr: `unknown key "Log-Level" in {{file}}`},
		{name: "unknown conntrack key", file: oneService + "conntrack: {max-entry: 1024}\n", wantErr: `unknown key "conntrack.max-entry" in {{file}}`},
		{name: "unknown timeout", file: oneService + "conntrack: {timeouts: {linger: 1s}}\n", wantErr: `unknown key "conntrack.timeouts.linger" in {{file}}`},
		{
			name:    "unknown service key",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    polcy: hash\n    backends: [10.0.0.2:80]\n",
			wantErr: `unknown key "services[0].polcy" in {{file}}`,
		},
		{
			name:    "unknown backend key",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80, {address: 10.0.0.3:80, wieght: 2}]\n",
			wantErr: `unknown key "services[0].backends[1].wieght" in {{file}}`,
		},
		{
			name:    "unknown chain key",
			file:    oneService + "chain:\n  - {name: fw, object: /x.o, prio: 3}\n",
			wantErr: `unknown key "chain[0].prio" in {{file}}`,
		},
		{name: "conntrack not a map", file: oneService + "conntrack: 5\n", wantErr: "conntrack: want a map, got 5 in {{file}}"},
		{name: "services not a list", file: "iface: eth0\nservices: {vip: 10.0.0.10:80}\n", wantErr: "services: want a list, got map[vip:10.0.0.10:80] in {{file}}"},
		{name: "service not a map", file: "iface: eth0\nservices: [10.0.0.10:80]\n", wantErr: "services[0]: want a map, got 10.0.0.10:80 in {{file}}"},

		// Decoding values.
		{
			name:    "backend without port",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.9:80\n    backends: [10.0.0.1:80]\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.3]\n",
			wantErr: `services[1].backends[0]: parse address "10.0.0.3": missing port`,
		},
		{
			name:    "backend map without address",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{weight: 2}]\n",
			wantErr: "services[0].backends[0]: address: missing",
		},
		{
			name:    "backend negative weight",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{address: 10.0.0.2:80, weight: -1}]\n",
			wantErr: `services[0].backends[0]: weight: parse weight "-1": not a whole number up to 65535`,
		},
		{
			name:    "bad vip",
			file:    "iface: eth0\nservices:\n  - vip: www:80\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].vip: parse address "www:80": "www" is not an IP address`,
		},
		{
			name:    "vip port not a number",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:http\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].vip: parse address "10.0.0.10:http": "http" is not a port`,
		},
		{name: "bad source-addresses", file: oneService + "source-addresses: [eth0]\n", wantErr: `source-addresses: parse address "eth0": not an IP address`},
		{name: "bad source prefix", file: oneService + "source-addresses: 10.0.0.0/33\n", wantErr: `source-addresses: parse prefix "10.0.0.0/33": want ADDR/BITS`},
		{name: "the old source-address key", file: oneService + "source-address: 10.0.0.1\n", wantErr: `unknown key "source-address"`},
		{name: "too many source addresses", file: oneService + "source-addresses: [10.0.0.0/28, 10.0.1.1]\n", wantErr: "source-addresses: 17 IPv4 addresses over the top level and the services, at most 16"},
		{name: "too many ipv6 source addresses", file: oneService + "source-addresses: ['2001:db8::/124', '2001:db8:1::1']\n", wantErr: "source-addresses: 17 IPv6 addresses over the top level and the services, at most 16"},
		{name: "too big an ipv6 source prefix", file: oneService + "source-addresses: '2001:db8::/123'\n", wantErr: "source-addresses: 2001:db8::/123 holds more than 16 addresses"},
		{name: "too big a source prefix", file: oneService + "source-addresses: 10.0.0.0/27\n", wantErr: "source-addresses: 10.0.0.0/27 holds more than 16 addresses"},
		{name: "bad duration", file: oneService + "conntrack: {timeouts: {established: 15x}}\n", wantErr: `conntrack.timeouts.established: parse duration "15x": want a number with a unit such as 900s or 15m`},
		{name: "duration without unit", file: oneService + "conntrack: {gc-interval: 5}\n", wantErr: "conntrack.gc-interval: want a duration with a unit such as 900s or 15m, got 5"},
		{name: "bad duration in env", file: oneService, env: map[string]string{"XLB_CONNTRACK_TIMEOUTS_FIN": "soon"}, wantErr: `conntrack.timeouts.fin: parse duration "soon"`},
		{name: "bad max-entries in env", file: oneService, env: map[string]string{"XLB_CONNTRACK_MAX_ENTRIES": "many"}, wantErr: `conntrack.max-entries: "many" is not a valid int`},
		{name: "port range without dash", file: oneService + "source-ports: 20000\n", wantErr: `source-ports: parse port range "20000": want LO-HI`},
		{name: "port range above 65535", file: oneService, env: map[string]string{"XLB_SOURCE_PORTS": "20000-70000"}, wantErr: `source-ports: parse port range "20000-70000": "70000" is not a port`},
		{name: "bad plugin-sha256 value", file: oneService + "plugin-sha256: {hash: [1, 2]}\n", wantErr: "plugin-sha256[hash]: want string, got [1 2]"},

		// Validation.
		{name: "no iface", file: "services:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80]\n", wantErr: "iface: required (set iface in the file, --iface or XLB_IFACE)"},
		{name: "no services", args: []string{"--iface", "eth0"}, wantErr: "services: none defined"},
		{
			name:    "nothing filled in",
			file:    "# everything commented out\n#iface: eth0\n",
			wantErr: "iface: required (set iface in the file, --iface or XLB_IFACE); services: none defined (give them in the config file, or with --vip and --backend)",
		},
		{
			name:    "services do not come from env",
			args:    []string{"--iface", "eth0"},
			env:     map[string]string{"XLB_SERVICES": "- {vip: 10.0.0.10:80, backends: [10.0.0.2:80]}"},
			wantErr: "services: none defined",
		},
		{
			name:    "null backends",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends:\n",
			wantErr: "services[0].backends: none (a service needs at least one)",
		},
		{name: "bad xdp-mode in file", file: oneService + "xdp-mode: fast\n", wantErr: `xdp-mode: "fast" is not native or generic`},
		{name: "bad xdp-mode in flag", file: oneService, args: []string{"--xdp-mode", "offload"}, wantErr: `xdp-mode: "offload" is not native or generic`},
		{name: "bad xdp-mode in env", file: oneService, env: map[string]string{"XLB_XDP_MODE": "skb"}, wantErr: `xdp-mode: "skb" is not native or generic`},
		{name: "port range reversed", file: oneService + "source-ports: 30000-20000\n", wantErr: "source-ports: 30000-20000: low above high"},
		{name: "port range too low", file: oneService, args: []string{"--source-ports", "80-2000"}, wantErr: "source-ports: 80-2000: low below 1024"},
		{
			name:    "duplicate vip",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80]\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.3:80]\n",
			wantErr: "services[1]: duplicate vip 10.0.0.10:80/tcp (also services[0])",
		},
		{
			name:    "duplicate udp vip",
			file:    "iface: eth0\nservices:\n  - {vip: 10.0.0.10:53, protocol: udp, backends: [10.0.0.2:53]}\n  - {vip: 10.0.0.10:53, protocol: udp, backends: [10.0.0.3:53]}\n",
			wantErr: "services[1]: duplicate vip 10.0.0.10:53/udp (also services[0])",
		},
		{
			name:    "unknown protocol",
			file:    "iface: eth0\nservices:\n  - {vip: 10.0.0.10:80, protocol: sctp, backends: [10.0.0.2:80]}\n",
			wantErr: `services[0].protocol: "sctp" is not tcp or udp`,
		},
		{
			name:    "unknown protocol flag",
			args:    []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--protocol", "TCP", "--backend", "10.0.0.2:80"},
			wantErr: `services[0].protocol: "TCP" is not tcp or udp`,
		},
		{
			name:    "same ip, other port is no duplicate but a bad weight is refused",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80]\n  - vip: 10.0.0.10:443\n    backends: [{address: 10.0.0.3:80, weight: 70000}]\n",
			wantErr: "services[1].backends[0]: weight 70000 out of range 0..65535",
		},
		{
			name:    "weight above 65535",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80@65536]\n",
			wantErr: "services[0].backends[0]: weight 65536 out of range 0..65535",
		},
		{
			name:    "unknown health key",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {check: tcp, intreval: 1s}\n    backends: [10.0.0.2:80]\n",
			wantErr: `unknown key "services[0].health.intreval" in {{file}}`,
		},
		{
			name:    "unknown backend health key",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{address: 10.0.0.2:80, health: {http: {code: 200}}}]\n",
			wantErr: `unknown key "services[0].backends[0].health.http.code" in {{file}}`,
		},
		{
			name:    "bad health check",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {check: icmp}\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].health.check: "icmp" is not none, tcp or http`,
		},
		{
			name:    "health interval without unit",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {interval: 2}\n    backends: [10.0.0.2:80]\n",
			wantErr: "services[0].health.interval: want a duration with a unit such as 900s or 15m, got 2",
		},
		{
			name:    "backend health interval too short",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{address: 10.0.0.2:80, health: {interval: 10ms}}]\n",
			wantErr: "services[0].backends[0].health.interval: 10ms out of range 100ms..1h0m0s",
		},
		{
			name:    "backend health duration without unit",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{address: 10.0.0.2:80, health: {timeout: 1}}]\n",
			wantErr: "services[0].backends[0]: health.timeout: want a duration with a unit such as 900s or 15m, got 1",
		},
		{
			name:    "health timeout above interval",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {interval: 1s}\n    backends: [10.0.0.2:80, {address: 10.0.0.3:80, health: {timeout: 2s}}]\n",
			wantErr: "services[0].backends[1]: health check timeout 2s above its interval 1s",
		},
		{
			name:    "bad rise",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {rise: 101}\n    backends: [10.0.0.2:80]\n",
			wantErr: "services[0].health.rise: 101 out of range 1..100",
		},
		{
			name:    "bad http path",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {check: http, http: {path: healthz}}\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].health.http.path: "healthz" is not a path starting with / (without spaces)`,
		},
		{
			name:    "bad expect-status",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    health: {check: http, http: {expect-status: 2000}}\n    backends: [10.0.0.2:80]\n",
			wantErr: "services[0].health.http.expect-status: 2000 out of range 100..599",
		},
		{
			name:    "bad all-down",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    all-down: drop\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].all-down: "drop" is not rst or use-all`,
		},
		{name: "bad socket-group", file: oneService + "socket-group: 'xlb ops'\n", wantErr: `socket-group: "xlb ops" is not a group name or number`},
		{name: "bad health-concurrency", file: oneService, env: map[string]string{"XLB_HEALTH_CONCURRENCY": "0"}, wantErr: "health-concurrency: 0 out of range 1..1024"},
		{
			name:    "duplicate backend",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80, {address: 10.0.0.2:80, weight: 2}]\n",
			wantErr: "services[0].backends[1]: duplicate address 10.0.0.2:80 (also backends[0])",
		},
		{
			name:    "ipv6 vip, ipv4 backend",
			file:    "iface: eth0\nservices:\n  - vip: '[2001:db8::1]:80'\n    backends: [10.0.0.2:80]\n",
			wantErr: "services[0].backends[0]: 10.0.0.2:80 is IPv4, the vip [2001:db8::1]:80 is IPv6: a service balances one family (give each family a service of its own)",
		},
		{
			name:    "ipv4 vip, ipv6 backend",
			args:    []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--backend", "[2001:db8::2]:80"},
			wantErr: "services[0].backends[0]: [2001:db8::2]:80 is IPv6, the vip 10.0.0.10:80 is IPv4",
		},
		{
			name:    "ipv6 loopback backend",
			args:    []string{"--iface", "eth0", "--vip", "[2001:db8::1]:80", "--backend", "[::1]:80"},
			wantErr: "services[0].backends[0]: [::1]:80 is a loopback address",
		},
		{
			name:    "link-local ipv6 backend",
			file:    "iface: eth0\nservices:\n  - {vip: '[2001:db8::1]:80', backends: ['[fe80::2]:80']}\n",
			wantErr: "services[0].backends[0]: [fe80::2]:80 is a link-local address",
		},
		{
			name:    "ipv6 service naming only ipv4 sources",
			file:    "iface: eth0\nservices:\n  - {vip: '[2001:db8::1]:80', source-addresses: [10.0.0.5], backends: ['[2001:db8::2]:80']}\n",
			wantErr: "services[0].source-addresses: none is IPv6, as the vip [2001:db8::1]:80 is",
		},
		{
			name:    "vip port 0",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:0\n    backends: [10.0.0.2:80]\n",
			wantErr: "services[0].vip: 10.0.0.10:0: port 0",
		},
		{
			name:    "service without backends",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n",
			wantErr: "services[0].backends: none (a service needs at least one)",
		},
		{
			name:    "bad service policy",
			file:    "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    policy: plugins/hash\n    backends: [10.0.0.2:80]\n",
			wantErr: `services[0].policy: "plugins/hash" is not a policy name nor an absolute path ([a-z0-9][a-z0-9-]*)`,
		},
		{name: "bad default policy", file: oneService, args: []string{"--policy", "Round Robin"}, wantErr: `policy: "Round Robin" is not a policy name nor an absolute path ([a-z0-9][a-z0-9-]*)`},
		{name: "bad xlb-priority", file: oneService, env: map[string]string{"XLB_XLB_PRIORITY": "2000"}, wantErr: "xlb-priority: 2000 out of range 0..1000"},
		{name: "bad log-level", file: oneService, env: map[string]string{"XLB_LOG_LEVEL": "verbose"}, wantErr: `log-level: "verbose" is not debug, info, warn or error`},
		{name: "bad log-format", file: oneService, args: []string{"--log-format", "logfmt"}, wantErr: `log-format: "logfmt" is not text or json`},
		{name: "bad log-format in env", file: oneService, env: map[string]string{"XLB_LOG_FORMAT": "JSON"}, wantErr: `log-format: "JSON" is not text or json`},
		{name: "metrics-address without port", file: oneService + "metrics-address: 127.0.0.1\n", wantErr: `metrics-address: "127.0.0.1" is not [IP]:PORT`},
		{name: "metrics-address host name", file: oneService, env: map[string]string{"XLB_METRICS_ADDRESS": "localhost:9100"}, wantErr: `metrics-address: "localhost:9100": "localhost" is not an IP address`},
		{name: "metrics-address port 0", file: oneService, args: []string{"--metrics-address", ":0"}, wantErr: `metrics-address: ":0": "0" is not a port from 1 to 65535`},
		{name: "max-entries with a fraction", file: oneService + "conntrack: {max-entries: 1024.7}\n", wantErr: "conntrack.max-entries: want a whole number, got 1024.7 (write it without a decimal point or an exponent)"},
		{name: "max-entries with an exponent", file: oneService + "conntrack: {max-entries: 1.5e6}\n", wantErr: "conntrack.max-entries: want a whole number, got 1.5e+06"},
		{name: "max-entries beyond 64 bits", file: oneService + "conntrack: {max-entries: 99999999999999999999}\n", wantErr: "conntrack.max-entries: 1e+20 is too large"},
		{name: "max-entries with an exponent in env", file: oneService, env: map[string]string{"XLB_CONNTRACK_MAX_ENTRIES": "1.5e6"}, wantErr: `conntrack.max-entries: "1.5e6" is not a valid int`},
		{name: "xlb-priority with a fraction", file: oneService + "xlb-priority: 10.5\n", wantErr: "xlb-priority: want a whole number, got 10.5"},
		{name: "chain priority with a fraction", file: oneService + "chain:\n  - {name: fw, object: {{dir}}/prog.o, priority: 2.5}\n", wantErr: "chain[0].priority: want a whole number, got 2.5"},
		{name: "backend weight with an exponent", file: "iface: eth0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [{address: 10.0.0.2:80, weight: 3e0}]\n", wantErr: "services[0].backends[0]: weight: want a whole number, got 3"},
		{name: "unquoted all-digit sha-256", file: oneService + "plugin-sha256: {hash: " + strings.Repeat("7", 64) + "}\n", wantErr: "plugin-sha256[hash]: want text, got the number 7.777777777777777e+63: YAML reads unquoted digits as a number; write the value in quotes"},
		{name: "numeric interface name", file: "iface: 0\nservices:\n  - vip: 10.0.0.10:80\n    backends: [10.0.0.2:80]\n", wantErr: "iface: want text, got the number 0"},
		{name: "loopback vip", file: "iface: eth0\nservices:\n  - vip: 127.0.0.1:80\n    backends: [10.0.0.2:80]\n", wantErr: "services[0].vip: 127.0.0.1:80 is a loopback address: xlb only sees packets that arrive on iface"},
		{name: "loopback backend", args: []string{"--iface", "eth0", "--vip", "10.0.0.10:80", "--backend", "127.0.0.2:8080"}, wantErr: "services[0].backends[0]: 127.0.0.2:8080 is a loopback address"},
		{name: "loopback source address", file: oneService + "source-addresses: [127.0.0.1]\n", wantErr: "source-addresses: 127.0.0.1/32 is not a unicast address a host can use"},
		{name: "max-entries too small", file: oneService + "conntrack: {max-entries: 100}\n", wantErr: "conntrack.max-entries: 100 out of range 1024..16777216"},
		{name: "gc-interval too short", file: oneService + "conntrack: {gc-interval: 10ms}\n", wantErr: "conntrack.gc-interval: 10ms out of range 100ms..1m0s"},
		{name: "timeout below 1s", file: oneService + "conntrack: {timeouts: {syn: 500ms}}\n", wantErr: "conntrack.timeouts.syn: 500ms below 1s"},
		{name: "bad plugin-sha256 digest", file: oneService + "plugin-sha256: {hash: abc}\n", wantErr: `plugin-sha256["hash"]: "abc" is not 64 hex digits`},
		{
			name:    "missing chain object",
			file:    oneService + "chain:\n  - {name: fw, object: {{dir}}/missing.o}\n",
			wantErr: "chain[0].object: stat {{dir}}/missing.o: no such file or directory",
		},
		{
			name:    "empty chain continue-on",
			file:    oneService + "chain:\n  - {name: fw, object: {{dir}}/prog.o, continue-on: []}\n",
			wantErr: "chain[0].continue-on: empty: the chain would end after this member, so xlb would never see a packet",
		},
		{
			name:    "bad chain verdict",
			file:    oneService + "chain:\n  - {name: fw, object: {{dir}}/prog.o, continue-on: [pass, accept]}\n",
			wantErr: `chain[0].continue-on[1]: "accept" is not one of aborted, drop, pass, tx, redirect`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, key := range envKeys {
				t.Setenv(EnvName(key), "") // empty is unset to viper
			}
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "config.yaml")
			expand := strings.NewReplacer("{{dir}}", dir, "{{file}}", path).Replace
			if err := os.WriteFile(filepath.Join(dir, "prog.o"), []byte("\x7fELF"), 0o644); err != nil {
				t.Fatal(err)
			}
			var args []string
			if tt.file != "" {
				if err := os.WriteFile(path, []byte(expand(tt.file)), 0o644); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", path)
			}
			for _, a := range tt.args {
				args = append(args, expand(a))
			}

			got, err := Parse(args)
			if tt.wantErr != "" {
				if want := expand(tt.wantErr); err == nil || !strings.Contains(err.Error(), want) {
					t.Fatalf("Parse(%q) error = %v, want it to contain %q", args, err, want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", args, err)
			}
			want := Default()
			tt.want(want)
			for i := range want.Chain {
				want.Chain[i].Object = expand(want.Chain[i].Object)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse(%q)\n got %+v\nwant %+v", args, got, want)
			}
		})
	}
}

// TestManagesVIP: a service's own manage-vip wins over the top level's.
func TestManagesVIP(t *testing.T) {
	yes, no := true, false
	c := Default()
	for _, tt := range []struct {
		top  bool
		own  *bool
		want bool
	}{{true, nil, true}, {false, nil, false}, {true, &no, false}, {false, &yes, true}} {
		c.ManageVIP = tt.top
		if got := c.ManagesVIP(Service{ManageVIP: tt.own}); got != tt.want {
			t.Errorf("top %v, own %v: %v, want %v", tt.top, tt.own, got, tt.want)
		}
	}
}

// TestPinPathOf reads only the pin-path of a file (xlbd cleanup), even of
// one that is otherwise incomplete.
func TestPinPathOf(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct{ file, want, wantErr string }{
		{"pin-path: /sys/fs/bpf/xlb-a\n", "/sys/fs/bpf/xlb-a", ""},
		{"iface: eth0\n", "", ""},
		{"pin-path: xlb\n", "", "not an absolute path"},
		{"pin-pth: /x\n", "", `unknown key "pin-pth"`},
	} {
		f := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(f, []byte(tt.file), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := PinPathOf(f)
		if got != tt.want || (err == nil) != (tt.wantErr == "") || err != nil && !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("PinPathOf(%q) = %q, %v; want %q, %q", tt.file, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestParseHelp(t *testing.T) {
	_, err := Parse([]string{"--help"})
	if !errors.Is(err, pflag.ErrHelp) {
		t.Fatalf("Parse(--help) error = %v, want pflag.ErrHelp", err)
	}
}

func TestParseVersion(t *testing.T) {
	_, err := Parse([]string{"--iface", "eth0", "--version"})
	if !errors.Is(err, ErrVersion) {
		t.Fatalf("Parse(--version) error = %v, want ErrVersion", err)
	}
}

func TestNewFlagSet(t *testing.T) {
	fs := NewFlagSet()
	for _, name := range []string{
		"config", "iface", "xdp-mode", "vip", "backend", "policy", "source-address", "source-ports",
		"plugin-dir", "socket", "pin-path", "log-level", "log-format", "metrics-address", "conntrack-max-entries",
	} {
		if fs.Lookup(name) == nil {
			t.Errorf("flag --%s missing", name)
		}
	}
	for name := range flagKeys {
		if fs.Lookup(name) == nil {
			t.Errorf("bound flag --%s missing", name)
		}
	}
}

func TestEnvName(t *testing.T) {
	for key, want := range map[string]string{
		"iface":                          "XLB_IFACE",
		"xdp-mode":                       "XLB_XDP_MODE",
		"conntrack.max-entries":          "XLB_CONNTRACK_MAX_ENTRIES",
		"conntrack.timeouts.established": "XLB_CONNTRACK_TIMEOUTS_ESTABLISHED",
	} {
		if got := EnvName(key); got != want {
			t.Errorf("EnvName(%q) = %q, want %q", key, got, want)
		}
	}
}

// valid returns a configuration that passes Validate.
func valid() *Config {
	c := Default()
	c.Iface = "eth0"
	c.Services = []Service{svc("10.0.0.10:80", "random", "10.0.0.2:8080", "10.0.0.3:8080@3")}
	return c
}

func TestValidate(t *testing.T) {
	obj := filepath.Join(t.TempDir(), "prog.o")
	if err := os.WriteFile(obj, []byte("\x7fELF"), 0o644); err != nil {
		t.Fatal(err)
	}
	intp := func(i int) *int { return &i }
	tests := []struct {
		name    string
		edit    func(c *Config)
		wantErr string // empty: valid
	}{
		{name: "valid", edit: func(*Config) {}},
		{name: "default is invalid without iface", edit: func(c *Config) { *c = *Default() }, wantErr: "iface: required"},
		{name: "long iface", edit: func(c *Config) { c.Iface = "a-very-long-ifname" }, wantErr: `iface: "a-very-long-ifname" is longer than 15 bytes`},
		{name: "iface with slash", edit: func(c *Config) { c.Iface = "eth0/1" }, wantErr: `iface: "eth0/1" is not an interface name`},
		{name: "empty xdp-mode", edit: func(c *Config) { c.XDPMode = "" }, wantErr: `xdp-mode: "" is not native or generic`},
		{name: "ipv6 source address", edit: func(c *Config) { c.SourceAddresses = AddrPool{netip.MustParsePrefix("2001:db8::1/128")} }},
		{name: "16 addresses of each family", edit: func(c *Config) {
			c.SourceAddresses = AddrPool{netip.MustParsePrefix("10.0.0.0/28"), netip.MustParsePrefix("2001:db8::/124")}
		}},
		{name: "link-local ipv6 source address", edit: func(c *Config) { c.SourceAddresses = AddrPool{netip.MustParsePrefix("fe80::1/128")} }, wantErr: "source-addresses: fe80::1/128 is not a unicast address a host can use"},
		{name: "ipv4-mapped source address", edit: func(c *Config) { c.SourceAddresses = AddrPool{netip.MustParsePrefix("::ffff:10.0.0.5/128")} }, wantErr: "source-addresses: ::ffff:10.0.0.5/128 is an IPv4-mapped IPv6 address: write it as IPv4"},
		{name: "unspecified source address", edit: func(c *Config) { c.SourceAddresses = AddrPool{netip.MustParsePrefix("0.0.0.0/32")} }, wantErr: "source-addresses: 0.0.0.0/32 is not a unicast address a host can use"},
		{name: "service source address", edit: func(c *Config) {
			c.Services[0].SourceAddresses = AddrPool{netip.MustParsePrefix("224.0.0.1/32")}
		}, wantErr: "services[0].source-addresses: 224.0.0.1/32 is not a unicast address a host can use"},
		{name: "single source port", edit: func(c *Config) { c.SourcePorts = PortRange{Lo: 5000, Hi: 5000} }},
		{name: "source ports below 1024", edit: func(c *Config) { c.SourcePorts = PortRange{Lo: 1023, Hi: 5000} }, wantErr: "source-ports: 1023-5000: low below 1024"},
		{name: "empty default policy", edit: func(c *Config) { c.DefaultPolicy = "" }, wantErr: `policy: "" is not a policy name`},
		{name: "path policy", edit: func(c *Config) { c.DefaultPolicy = "/usr/lib/xlb/hash" }},
		{name: "relative plugin-dir", edit: func(c *Config) { c.PluginDir = "plugins" }, wantErr: `plugin-dir: "plugins" is not an absolute path`},
		{name: "bad plugin-sha256 name", edit: func(c *Config) { c.PluginSHA256 = map[string]string{"Hash": strings.Repeat("0", 64)} }, wantErr: `plugin-sha256["Hash"]: "Hash" is not a policy name`},
		{name: "plugin-sha256 not hex", edit: func(c *Config) { c.PluginSHA256 = map[string]string{"hash": strings.Repeat("g", 64)} }, wantErr: `plugin-sha256["hash"]: "gggg`},
		{name: "empty socket", edit: func(c *Config) { c.Socket = "" }, wantErr: "socket: empty"},
		{name: "long socket", edit: func(c *Config) { c.Socket = "/" + strings.Repeat("s", 107) }, wantErr: "is longer than 107 bytes"},
		{name: "relative pin-path", edit: func(c *Config) { c.PinPath = "xlb" }, wantErr: `pin-path: "xlb" is not an absolute path`},
		{name: "max-entries too large", edit: func(c *Config) { c.Conntrack.MaxEntries = 1<<24 + 1 }, wantErr: "conntrack.max-entries: 16777217 out of range 1024..16777216"},
		{name: "max-entries at the limits", edit: func(c *Config) { c.Conntrack.MaxEntries = 1 << 24 }},
		{name: "gc-interval too long", edit: func(c *Config) { c.Conntrack.GCInterval = time.Minute + 1 }, wantErr: "conntrack.gc-interval: 1m0.000000001s out of range 100ms..1m0s"},
		{name: "zero established", edit: func(c *Config) { c.Conntrack.Timeouts.Established = 0 }, wantErr: "conntrack.timeouts.established: 0s below 1s"},
		{name: "fin below 1s", edit: func(c *Config) { c.Conntrack.Timeouts.FIN = time.Millisecond }, wantErr: "conntrack.timeouts.fin: 1ms below 1s"},
		{name: "closed below 1s", edit: func(c *Config) { c.Conntrack.Timeouts.Closed = -time.Second }, wantErr: "conntrack.timeouts.closed: -1s below 1s"},
		{name: "no services", edit: func(c *Config) { c.Services = nil }, wantErr: "services: none defined"},
		{name: "empty service policy means the default", edit: func(c *Config) { c.Services[0].Policy = "" }},
		{name: "zero vip", edit: func(c *Config) { c.Services[0].VIP = netip.AddrPort{} }, wantErr: "services[0].vip: missing"},
		{name: "multicast vip", edit: func(c *Config) { c.Services[0].VIP = ap("224.0.0.1:80") }, wantErr: "services[0].vip: 224.0.0.1:80 is not a unicast address"},
		{name: "ipv4-mapped vip", edit: func(c *Config) { c.Services[0].VIP = ap("[::ffff:10.0.0.10]:80") }, wantErr: "services[0].vip: [::ffff:10.0.0.10]:80 is an IPv4-mapped IPv6 address: write it as IPv4"},
		{name: "backend port 0", edit: func(c *Config) { c.Services[0].Backends[1].Address = ap("10.0.0.3:0") }, wantErr: "services[0].backends[1]: 10.0.0.3:0: port 0"},
		{name: "backend is the vip", edit: func(c *Config) { c.Services[0].Backends[0].Address = ap("10.0.0.10:80") }, wantErr: "services[0].backends[0]: 10.0.0.10:80 is the service's own vip"},
		{name: "zero weight drains", edit: func(c *Config) { c.Services[0].Backends[1].Weight = 0 }},
		{name: "every weight zero", edit: func(c *Config) { c.Services[0].Backends[0].Weight, c.Services[0].Backends[1].Weight = 0, 0 }},
		{name: "256 backends", edit: func(c *Config) { c.Services[0].Backends = backends(256) }},
		{name: "257 backends", edit: func(c *Config) { c.Services[0].Backends = backends(257) }, wantErr: "services[0].backends: 257 above the limit of 256"},
		{name: "same backend in two services", edit: func(c *Config) {
			c.Services = append(c.Services, svc("10.0.0.11:80", "hash", "10.0.0.2:8080"))
		}},
		{name: "chain member", edit: func(c *Config) {
			c.Chain = []ChainMember{{Name: "fw", Object: obj, Priority: intp(0)}, {Name: "ids", Object: obj, Priority: intp(1000), ContinueOn: Verdicts}}
		}},
		{name: "chain name too long", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "a-sixteen-chars!", Object: obj}} }, wantErr: `chain[0].name: "a-sixteen-chars!" is not [a-z0-9-]{1,15}`},
		{name: "chain member named xlb", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "xlb", Object: obj}} }, wantErr: `chain[0].name: "xlb" is xlb's own pipeline`},
		{name: "xlb priority", edit: func(c *Config) { c.XLBPriority = 1001 }, wantErr: "xlb-priority: 1001 out of range 0..1000"},
		{name: "xlb priority negative", edit: func(c *Config) { c.XLBPriority = -1 }, wantErr: "xlb-priority: -1 out of range 0..1000"},
		{name: "chain name empty", edit: func(c *Config) { c.Chain = []ChainMember{{Object: obj}} }, wantErr: `chain[0].name: "" is not [a-z0-9-]{1,15}`},
		{name: "chain duplicate name", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "fw", Object: obj}, {Name: "fw", Object: obj}} }, wantErr: `chain[1]: duplicate name "fw" (also chain[0])`},
		{name: "chain without object", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "fw"}} }, wantErr: "chain[0].object: required"},
		{name: "chain object is a directory", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "fw", Object: filepath.Dir(obj)}} }, wantErr: "is not a regular file"},
		{name: "chain priority", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "fw", Object: obj, Priority: intp(1001)}} }, wantErr: "chain[0].priority: 1001 out of range 0..1000"},
		{name: "chain negative priority", edit: func(c *Config) { c.Chain = []ChainMember{{Name: "fw", Object: obj, Priority: intp(-1)}} }, wantErr: "chain[0].priority: -1 out of range 0..1000"},
		{name: "chain duplicate verdict", edit: func(c *Config) {
			c.Chain = []ChainMember{{Name: "fw", Object: obj, ContinueOn: []string{"pass", "drop", "pass"}}}
		}, wantErr: `chain[0].continue-on[2]: duplicate "pass"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.edit(c)
			err := c.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Validate() = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("Validate() = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func backends(n int) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 80), Weight: 1}
	}
	return bs
}

// TestPackagedConfig checks the default /etc/xlb/xlb.yaml that make
// install puts in place: as shipped, xlbd refuses it naming the two
// settings to fill in; with its examples uncommented it is valid, so it
// names no key that does not exist.
func TestPackagedConfig(t *testing.T) {
	const path = "../../packaging/xlb.yaml"
	_, err := Parse([]string{"--config", path})
	want := "iface: required (set iface in the file, --iface or XLB_IFACE); services: none defined"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Parse(packaged file) error = %v, want %q", err, want)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(raw), "\n") {
		// "#key: value" and "#  indented: value" are examples; "# text"
		// is prose.
		if strings.HasPrefix(l, "#") && len(l) > 1 && (l[1] != ' ' || strings.HasPrefix(l, "#  ")) {
			l = l[1:]
		}
		lines = append(lines, l)
	}
	filled := filepath.Join(t.TempDir(), "xlb.yaml")
	if err := os.WriteFile(filled, []byte(strings.Join(lines, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := Parse([]string{"--config", filled})
	if err != nil {
		t.Fatalf("packaged file with its examples uncommented: %v", err)
	}
	if cfg.Iface != "eth0" || len(cfg.Services) != 1 || cfg.MetricsAddress == "" {
		t.Errorf("uncommented examples parsed as %+v", cfg)
	}
}

func TestBackendHealth(t *testing.T) {
	yes := true
	s := svc("10.0.0.10:80", "random", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")
	if h := s.BackendHealth(0); h.Check != HealthNone {
		t.Errorf("no health block: %+v, want check none", h)
	}
	s.Backends[2].Health = &Health{Interval: 5 * time.Second}
	if h := s.BackendHealth(2); h.Check != HealthTCP || h.Interval != 5*time.Second || h.Timeout != DefaultHealthTimeout || h.Rise != DefaultHealthRise ||
		h.Fall != DefaultHealthFall || *h.ResetEstablished {
		t.Errorf("backend block alone: %+v, want tcp every 5s with the defaults", h)
	}
	s.Health = &Health{Check: HealthHTTP, Rise: 5, HTTP: HTTPCheck{Path: "/ok"}, ResetEstablished: &yes}
	s.Backends[1].Health = &Health{Check: HealthNone}
	want := Health{Check: HealthHTTP, Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Rise: 5, Fall: DefaultHealthFall,
		HTTP: HTTPCheck{Path: "/ok", ExpectStatus: 200}}
	got := s.BackendHealth(0)
	if !*got.ResetEstablished {
		t.Errorf("reset-established not inherited: %+v", got)
	}
	got.ResetEstablished = nil
	if got != want {
		t.Errorf("service block: %+v, want %+v", got, want)
	}
	if h := s.BackendHealth(1); h.Check != HealthNone {
		t.Errorf("backend check none: %+v", h)
	}
	if h := s.BackendHealth(2); h.Check != HealthHTTP || h.Interval != 5*time.Second || h.Rise != 5 || h.HTTP.Path != "/ok" {
		t.Errorf("backend over service: %+v", h)
	}
	s.Health.Interval = 300 * time.Millisecond
	if h := s.BackendHealth(0); h.Timeout != 300*time.Millisecond {
		t.Errorf("interval 300ms, timeout unset: timeout %s, want 300ms", h.Timeout)
	}
}

// TestYAMLRoundTrip writes configurations as YAML and reads them back:
// the result is the same configuration, and writing it again gives the
// same text.
func TestYAMLRoundTrip(t *testing.T) {
	dir := t.TempDir()
	obj := filepath.Join(dir, "prog.o")
	if err := os.WriteFile(obj, []byte("\x7fELF"), 0o644); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"example": exampleFile,
		"every key": `
iface: ens1f0
xdp-mode: generic
source-addresses: [192.0.2.1, 192.0.2.8/30]
source-ports: 1024-65535
policy: /usr/lib/xlb/policy-maglev
plugin-dir: /usr/lib/xlb
plugin-sha256:
  hash: "0123456789012345678901234567890123456789012345678901234567890123"
  /opt/Policies/custom.bin: 2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824
socket: /tmp/xlbd.sock
socket-group: "65534"
pin-path: /sys/fs/bpf/xlb-test
log-level: debug
log-format: json
metrics-address: 127.0.0.1:9190
health-concurrency: 4
conntrack:
  max-entries: 1024
  gc-interval: 250ms
  timeouts: {syn: 5s, established: 1h30m, fin: 30s, closed: 1s, udp: 45s, time-wait: 2m}
syn-defence: {mode: on, half-open: 10, trust-for: 1h}
xlb-priority: 20
services:
  - vip: 10.0.0.10:80
    backends: [10.0.0.2:80, 10.0.0.3:80@0, {address: 10.0.0.4:80, weight: 7, health: {check: none}}]
    health: {check: http, interval: 1s, rise: 1, http: {host: a.example}, reset-established: false}
    all-down: use-all
  - {vip: 10.0.0.10:53, protocol: udp, policy: hash, source-addresses: [192.0.2.9], backends: [10.0.0.2:53]}
chain:
  - {name: fw, object: ` + obj + `, priority: 0, continue-on: [pass, tx]}
  - {name: ids, object: ` + obj + `, program: ids_main}
`,
	}
	for name, file := range files {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, "in.yaml")
			if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
				t.Fatal(err)
			}
			first, err := Parse([]string{"--config", path, "--vip", "10.0.0.12:80", "--backend", "10.0.0.5:80@3"})
			if err != nil {
				t.Fatal(err)
			}
			out, err := first.YAML()
			if err != nil {
				t.Fatal(err)
			}
			again := filepath.Join(dir, "out.yaml")
			if err := os.WriteFile(again, out, 0o644); err != nil {
				t.Fatal(err)
			}
			second, err := Parse([]string{"--config", again})
			if err != nil {
				t.Fatalf("parse the written configuration: %v\n%s", err, out)
			}
			if !reflect.DeepEqual(first, second) {
				t.Errorf("read back as\n%+v\nwant\n%+v\nfrom\n%s", second, first, out)
			}
			out2, err := second.YAML()
			if err != nil {
				t.Fatal(err)
			}
			if string(out2) != string(out) {
				t.Errorf("written twice differently:\n%s\n---\n%s", out, out2)
			}
		})
	}
}
