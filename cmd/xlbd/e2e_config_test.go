package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// configTopo is newTopo's network with a third backend and no xlbd yet:
// tests start xlbd with a configuration file of their own. Every backend
// serves HTTP on backendPort, answering with its host name.
type configTopo struct {
	*topo
	bc   *testnet.Host
	file string // the configuration file's path
}

func newConfigTopo(tb testing.TB, mode string) *configTopo {
	tb.Helper()
	testnet.RequirePrivileged(tb)
	lan := testnet.NewLAN(tb, testnet.LANOptions{
		Hosts:         []string{"client1", "client2", "lb", "backend-a", "backend-b", "backend-c"},
		NativePeerXDP: mode == "native",
	})
	ct := &configTopo{
		topo: &topo{lan: lan, c1: lan.Host("client1"), c2: lan.Host("client2"), lb: lan.Host("lb"),
			ba: lan.Host("backend-a"), bb: lan.Host("backend-b")},
		bc:   lan.Host("backend-c"),
		file: filepath.Join(tb.TempDir(), "xlbd.yaml"),
	}
	ct.vip = netip.AddrPortFrom(ct.lb.IP, 80)
	for _, h := range []*testnet.Host{ct.ba, ct.bb, ct.bc} {
		h.NS.ServeHTTP(tb, fmt.Sprintf("%s:%d", h.IP, backendPort), h.Name)
	}
	return ct
}

// writeConfig replaces the configuration file.
func (ct *configTopo) writeConfig(tb testing.TB, yaml string) {
	tb.Helper()
	if err := os.WriteFile(ct.file, []byte(yaml), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// start writes the configuration file and runs xlbd with it.
func (ct *configTopo) start(tb testing.TB, yaml string, extra ...string) {
	tb.Helper()
	ct.writeConfig(tb, yaml)
	ct.d = xlbtest.Start(tb, ct.lb.NS, append([]string{"--config", ct.file, "--log-level", "debug"}, extra...)...)
}

// addr is host h's address with port p, as written in a configuration.
func addr(h *testnet.Host, p int) string { return netip.AddrPortFrom(h.IP, uint16(p)).String() }

// hostState is what xlbd changes on the load balancer host.
type hostState struct {
	XDP        string   // "" when no XDP program is attached, else native or generic
	IPLinkXDP  bool     // `ip -d link show eth0` shows an XDP program
	Addrs      []string // eth0's IPv4 and global IPv6 addresses
	Forwarding string   // net.ipv4.conf.eth0.forwarding
	Forward6   string   // net.ipv6.conf.eth0.forwarding
}

func (s hostState) String() string {
	return fmt.Sprintf("xdp=%q ip-link-xdp=%v addrs=%v forwarding=%s forwarding6=%s", s.XDP, s.IPLinkXDP, s.Addrs, s.Forwarding, s.Forward6)
}

func (s hostState) equal(o hostState) bool {
	return s.XDP == o.XDP && s.IPLinkXDP == o.IPLinkXDP && slices.Equal(s.Addrs, o.Addrs) && s.Forwarding == o.Forwarding &&
		s.Forward6 == o.Forward6
}

func lbState(tb testing.TB, h *testnet.Host) hostState {
	tb.Helper()
	var s hostState
	err := h.NS.Do(func() error {
		l, err := netlink.LinkByName(h.Iface)
		if err != nil {
			return err
		}
		if x := l.Attrs().Xdp; x != nil && x.Attached {
			switch x.AttachMode {
			case 1: // XDP_ATTACHED_DRV
				s.XDP = "native"
			case 2: // XDP_ATTACHED_SKB
				s.XDP = "generic"
			default:
				s.XDP = fmt.Sprintf("mode %d", x.AttachMode)
			}
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if !a.IP.IsLinkLocalUnicast() {
				s.Addrs = append(s.Addrs, a.IPNet.String())
			}
		}
		slices.Sort(s.Addrs)
		fwd, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + h.Iface + "/forwarding")
		if err != nil {
			return err
		}
		s.Forwarding = strings.TrimSpace(string(fwd))
		fwd, err = os.ReadFile("/proc/sys/net/ipv6/conf/" + h.Iface + "/forwarding")
		s.Forward6 = strings.TrimSpace(string(fwd))
		return err
	})
	if err != nil {
		tb.Fatalf("read state of %s: %v", h.Name, err)
	}
	s.IPLinkXDP = strings.Contains(h.NS.Exec(tb, "ip", "-d", "link", "show", h.Iface), "prog/xdp")
	return s
}

// split makes n short connections to url from both clients, eight at a
// time, and counts the answers by backend.
func (tp *topo) split(t *testing.T, url string, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	clients := []*http.Client{tp.c1.NS.HTTPClient(false), tp.c2.NS.HTTPClient(false)}
	getMany(t, clients, []string{url}, n, 8, func(b string, _ time.Duration) { seen[b]++ })
	return seen
}

// TestConfigFile runs xlbd from a file with three services: a weighted
// one on the load balancer's own address, one on a second port of that
// address and one on an address xlbd adds to the interface; backends
// listen on other ports than the VIPs. SIGTERM must undo every change.
func TestConfigFile(t *testing.T) {
	ct := newConfigTopo(t, "native")
	before := lbState(t, ct.lb)
	if before.XDP != "" || before.IPLinkXDP {
		t.Fatalf("xdp attached before xlbd started: %v", before)
	}
	extraVIP := ct.lan.AddrInSubnet(100)
	own8081 := netip.AddrPortFrom(ct.lb.IP, 8081)
	extra80 := netip.AddrPortFrom(extraVIP, 80)
	ct.ba.NS.ServeHTTP(t, addr(ct.ba, 9090), "backend-a-9090")
	ct.bb.NS.ServeHTTP(t, addr(ct.bb, 9090), "backend-b-9090")
	ct.bc.NS.ServeHTTP(t, addr(ct.bc, 9191), "backend-c-9191")
	ct.start(t, fmt.Sprintf(`
iface: eth0
services:
  - vip: %s
    backends:
      - {address: %s, weight: 3}
      - %s@1
  - vip: %s
    backends: [%s]
  - vip: %s
    policy: random
    backends: [%s, %s]
`, ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort),
		own8081, addr(ct.ba, 9090),
		extra80, addr(ct.bb, 9090), addr(ct.bc, 9191)))

	running := lbState(t, ct.lb)
	if running.XDP != "native" || !running.IPLinkXDP {
		t.Errorf("xdp while running: %v, want native", running)
	}
	if !slices.Contains(running.Addrs, extraVIP.String()+"/32") {
		t.Errorf("vip %s not added to eth0: %v", extraVIP, running.Addrs)
	}
	if running.Forwarding != "1" {
		t.Errorf("forwarding on eth0 while running = %s, want 1", running.Forwarding)
	}
	st, err := ct.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	weights := map[string]uint32{}
	for _, s := range st.Services {
		for _, b := range s.Backends {
			weights[s.Vip+" "+b.Address] = b.Weight
		}
	}
	wantWeights := map[string]uint32{
		ct.vip.String() + " " + addr(ct.ba, backendPort): 3,
		ct.vip.String() + " " + addr(ct.bb, backendPort): 1,
		own8081.String() + " " + addr(ct.ba, 9090):       1,
		extra80.String() + " " + addr(ct.bb, 9090):       1,
		extra80.String() + " " + addr(ct.bc, 9191):       1,
	}
	if len(st.Services) != 3 || !mapsEqual(weights, wantWeights) {
		t.Errorf("status services %+v, want backends and weights %v", st.Services, wantWeights)
	}

	t.Run("weighted 3:1", func(t *testing.T) {
		const n = 400
		seen := ct.split(t, "http://"+ct.vip.String()+"/", n)
		// a's share is binomial(400, 3/4): mean 300, sd 8.7; a uniform
		// split (200) is 11 sd away. Accept 4.5 sd either side.
		a, b := seen["backend-a"], seen["backend-b"]
		if a+b != n || a < 261 || a > 339 {
			t.Errorf("replies by backend %v: want backend-a within 261..339 of %d (weights 3:1)", seen, n)
		}
		t.Logf("replies by backend: %v", seen)
	})
	t.Run("second port of the same vip", func(t *testing.T) {
		seen := ct.split(t, "http://"+own8081.String()+"/", 20)
		if seen["backend-a-9090"] != 20 {
			t.Errorf("replies by backend %v, want backend-a-9090 only", seen)
		}
	})
	t.Run("vip that is not an interface address", func(t *testing.T) {
		seen := ct.split(t, "http://"+extra80.String()+"/", 60)
		if len(seen) != 2 || seen["backend-b-9090"] == 0 || seen["backend-c-9191"] == 0 {
			t.Errorf("replies by backend %v, want backend-b-9090 and backend-c-9191", seen)
		}
	})
	t.Run("sigterm undoes everything", func(t *testing.T) {
		if err := ct.d.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if done, err := ct.d.Exited(); done {
				if err != nil {
					t.Errorf("xlbd exited with %v after SIGTERM, want status 0", err)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("xlbd still running 10 s after SIGTERM")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if after := lbState(t, ct.lb); !after.equal(before) {
			t.Errorf("lb host after xlbd stopped:\n  %v\nbefore it started:\n  %v", after, before)
		}
	})
}

func mapsEqual[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestConfigEnvironment checks that XLB_* variables reach xlbd over the
// file: with a 2 s established timeout (the file says 900s) an idle
// connection is collected, and its next segment is answered with a RST.
func TestConfigEnvironment(t *testing.T) {
	t.Setenv("XLB_CONNTRACK_TIMEOUTS_ESTABLISHED", "2s")
	t.Setenv("XLB_CONNTRACK_GC_INTERVAL", "200ms")
	dir := t.TempDir()
	file := filepath.Join(dir, "xlbd.yaml")
	if err := os.WriteFile(file, []byte("conntrack:\n  timeouts: {established: 900s}\n  gc-interval: 5s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tp := newTopo(t, "native", "--config", file)
	ctx := context.Background()

	conn, err := tp.c1.NS.Dial(ctx, "tcp", tp.vip.String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := request(conn); err != nil {
		t.Fatalf("first request: %v", err)
	}
	local := conn.LocalAddr().String()
	c, ok := tp.conn(t, local)
	if !ok || c.State != "established" {
		t.Fatalf("connection from %s: %+v (tracked %v), want established", local, c, ok)
	}
	idleSince := time.Now()
	for {
		if _, ok := tp.conn(t, local); !ok {
			break
		}
		if time.Since(idleSince) > 6*time.Second {
			t.Fatalf("idle connection from %s still tracked after %v (established timeout 2s)", local, time.Since(idleSince))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if gone := time.Since(idleSince); gone < 1500*time.Millisecond {
		t.Errorf("idle connection collected after %v, before its 2 s timeout", gone)
	}

	resets := tp.counters(t)["reset_no_conn"]
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: vip\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// The segment belongs to no connection any more: xlb answers it with
	// a RST, and the client learns at once instead of retransmitting.
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := conn.Read(make([]byte, 512)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read on the expired connection: %d bytes, %v; want connection reset", n, err)
	}
	if got := tp.counters(t)["reset_no_conn"]; got != resets+1 {
		t.Errorf("reset_no_conn went from %d to %d after one segment on the expired connection", resets, got)
	}
	if _, ok := tp.conn(t, local); ok {
		t.Errorf("the expired connection's data packet made a new entry")
	}
}

// TestConfigPrecedence checks flag over environment over file, seen in the
// attach mode of the interface.
func TestConfigPrecedence(t *testing.T) {
	ct := newConfigTopo(t, "native")
	tests := []struct {
		name, file, env string
		flags           []string
		want            string
	}{
		{"file", "generic", "", nil, "generic"},
		{"flag over file", "generic", "", []string{"--xdp-mode", "native"}, "native"},
		{"environment over file", "native", "generic", nil, "generic"},
		{"flag over environment", "native", "generic", []string{"--xdp-mode=native"}, "native"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.env != "" {
				t.Setenv("XLB_XDP_MODE", tt.env)
			}
			ct.start(t, fmt.Sprintf("iface: eth0\nxdp-mode: %s\nservices:\n  - vip: %s\n    backends: [%s]\n",
				tt.file, ct.vip, addr(ct.ba, backendPort)), tt.flags...)
			st, err := ct.d.Client().Status(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if got := lbState(t, ct.lb).XDP; got != tt.want || st.XdpMode != tt.want {
				t.Errorf("attached %q, status says %q, want %q", got, st.XdpMode, tt.want)
			}
			if b, err := testnet.Get(t.Context(), ct.c1.NS.HTTPClient(false), "http://"+ct.vip.String()+"/"); err != nil || b != "backend-a" {
				t.Errorf("request through the vip: %q, %v", b, err)
			}
			if err := ct.d.Stop(); err != nil {
				t.Errorf("stop xlbd: %v", err)
			}
		})
	}
}

// runXlbd runs xlbd in ns to its end (at most 20 s) with extra environment
// variables and returns its exit status and output.
func runXlbd(t *testing.T, ns *testnet.NS, env []string, args ...string) (int, string) {
	t.Helper()
	dir, err := xlbtest.Build()
	if err != nil {
		t.Fatal(err)
	}
	sockDir := xlbtest.TempDir(t, "", "xlbd-sock-")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args = append(args, "--socket", filepath.Join(sockDir, "xlbd.sock"))
	pin := xlbtest.ConfigPinPath(args)
	if pin == "" {
		pin = xlbtest.NewPinPath()
		args = append(args, "--pin-path", pin)
	}
	t.Cleanup(func() { xlbtest.CleanupPinPath(ns, pin) })
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + ns.Path, "--", filepath.Join(dir, "xlbd")}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee) && ee.Exited():
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("run xlbd %v: %v\n%s", args, err, out)
	return -1, ""
}

// TestBadInput runs xlbd with configurations it must refuse and checks
// the exit status, the message and that the host is as it was.
func TestBadInput(t *testing.T) {
	ct := newConfigTopo(t, "generic")
	vip, a := ct.vip.String(), addr(ct.ba, backendPort)
	notELF := filepath.Join(t.TempDir(), "short.o")
	if err := os.WriteFile(notELF, []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	good := fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s]\n", vip, a)
	tests := []struct {
		name     string
		file     string
		env      []string
		flags    []string
		wantCode int
		wantMsg  []string
	}{
		{name: "unknown key", file: good + "conntrak: {max-entries: 1024}\n",
			wantCode: 2, wantMsg: []string{`unknown key "conntrak"`}},
		{name: "unknown backend key",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [{address: %s, wieght: 2}]\n", vip, a),
			wantCode: 2, wantMsg: []string{`unknown key "services[0].backends[0].wieght"`}},
		{name: "bad vip",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: 10.199.0.300:80\n    backends: [%s]\n", a),
			wantCode: 2, wantMsg: []string{"services[0].vip", "10.199.0.300"}},
		{name: "vip without port",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s]\n", ct.lan.AddrInSubnet(100), a),
			wantCode: 2, wantMsg: []string{"services[0].vip", "missing port"}},
		{name: "backend without port",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s]\n", vip, ct.ba.IP),
			wantCode: 2, wantMsg: []string{"services[0].backends[0]", "missing port"}},
		{name: "backend weight above 65535",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s@65536]\n", vip, a),
			wantCode: 2, wantMsg: []string{"services[0].backends[0]", "weight 65536 out of range 0..65535"}},
		{name: "health check that is not tcp or http",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    health: {check: icmp}\n    backends: [%s]\n", vip, a),
			wantCode: 2, wantMsg: []string{`services[0].health.check: "icmp" is not none, tcp or http`}},
		{name: "health check timeout above its interval",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [{address: %s, health: {interval: 1s, timeout: 2s}}]\n", vip, a),
			wantCode: 2, wantMsg: []string{"services[0].backends[0]: health check timeout 2s above its interval 1s"}},
		{name: "socket-group that does not exist", file: good + "socket-group: no-such-group\n",
			wantCode: 2, wantMsg: []string{`socket-group: no group "no-such-group"`}},
		{name: "policy that does not exist",
			file:     fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: no-such-policy\n    backends: [%s]\n", vip, a),
			wantCode: 2, wantMsg: []string{"no-such-policy"}},
		{name: "bad flag", file: good, flags: []string{"--xdp-mode", "fast"},
			wantCode: 2, wantMsg: []string{`xdp-mode: "fast"`}},
		{name: "bad environment", file: good, env: []string{"XLB_CONNTRACK_TIMEOUTS_ESTABLISHED=15x"},
			wantCode: 2, wantMsg: []string{"conntrack.timeouts.established", "15x"}},
		{name: "no services", file: "iface: eth0\n",
			wantCode: 2, wantMsg: []string{"services: none defined"}},
		{name: "interface that does not exist", file: strings.Replace(good, "eth0", "nosuch0", 1),
			wantCode: 2, wantMsg: []string{`iface: no interface "nosuch0"`}},
		{name: "source ports inside the ephemeral range", file: good + "source-ports: 40000-40100\n",
			wantCode: 2, wantMsg: []string{"source-ports: ", "source-ports 40000-40100"}},
		{name: "chain object that is not ELF", file: good + "chain:\n  - {name: fw, object: " + notELF + "}\n",
			wantCode: 2, wantMsg: []string{"chain[0].object", "not an ELF object"}},
		{name: "chain member with an empty continue-on", file: good + "chain:\n  - {name: fw, object: " + xdpFilterIP + ", continue-on: []}\n",
			wantCode: 2, wantMsg: []string{"chain[0].continue-on: empty", "xlb would never see a packet"}},
		{name: "pin path outside bpffs", file: good + "pin-path: " + t.TempDir() + "\n",
			wantCode: 2, wantMsg: []string{"pin-path:", "not on a bpffs", "mount -t bpf"}},
		{name: "chain member with pins outside bpffs", file: good + "pin-path: " + t.TempDir() + "\nchain:\n  - {name: fw, object: " + xdpFilterIP + "}\n",
			wantCode: 2, wantMsg: []string{"pin-path:", "not on a bpffs", "mount -t bpf"}},
	}
	before := lbState(t, ct.lb)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ct.checkRefused(t, before, tt.file, tt.env, tt.flags, tt.wantCode, tt.wantMsg...)
		})
	}

	t.Run("interface busy with another xdp program", func(t *testing.T) {
		prog, err := testnet.NewPassProgram("other_pass")
		if err != nil {
			t.Fatal(err)
		}
		defer prog.Close()
		var l link.Link
		err = ct.lb.NS.Do(func() (err error) {
			l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: ct.lb.Index, Flags: link.XDPGenericMode})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		busy := lbState(t, ct.lb)
		ct.writeConfig(t, good+"xdp-mode: generic\n")
		code, out := runXlbd(t, ct.lb.NS, nil, "--config", ct.file)
		if code != 1 {
			t.Errorf("exit status %d, want 1; output:\n%s", code, out)
		}
		for _, want := range []string{"attach", "eth0 already runs an XDP program that xlbd did not attach", "name other_pass", "xdp-loader unload eth0"} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q:\n%s", want, out)
			}
		}
		if after := lbState(t, ct.lb); !after.equal(busy) {
			t.Errorf("lb host changed:\n  before %v\n  after  %v", busy, after)
		}
	})
}

// checkRefused runs xlbd with the configuration file, environment and
// flags, and fails unless it exits with wantCode, its output holds every
// wantMsg and the load balancer host is still as before.
func (ct *configTopo) checkRefused(t *testing.T, before hostState, file string, env, flags []string, wantCode int, wantMsg ...string) {
	t.Helper()
	ct.writeConfig(t, file)
	code, out := runXlbd(t, ct.lb.NS, env, append([]string{"--config", ct.file}, flags...)...)
	if code != wantCode {
		t.Errorf("exit status %d, want %d; output:\n%s", code, wantCode, out)
	}
	for _, m := range wantMsg {
		if !strings.Contains(out, m) {
			t.Errorf("output lacks %q:\n%s", m, out)
		}
	}
	if after := lbState(t, ct.lb); !after.equal(before) {
		t.Errorf("lb host changed:\n  before %v\n  after  %v", before, after)
	}
}

// backendsOf returns the addresses of the backends configured in the
// service at vip (not those removed that still carry connections).
func backendsOf(st *controlpb.Status, vip string) []string {
	var out []string
	for _, s := range st.Services {
		if s.Vip == vip && !s.Removed {
			for _, b := range s.Backends {
				if b.State != "removed" {
					out = append(out, b.Address)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// TestReload rewrites the configuration and sends SIGHUP: new connections
// follow the new backends, a connection to a removed backend keeps
// working, and a bad file is refused without changing anything.
func TestReload(t *testing.T) {
	ct := newConfigTopo(t, "native")
	ctx := context.Background()
	cfg := func(backends ...*testnet.Host) string {
		var list []string
		for _, h := range backends {
			list = append(list, addr(h, backendPort))
		}
		return fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s]\n", ct.vip, strings.Join(list, ", "))
	}
	ct.start(t, cfg(ct.ba, ct.bb))
	url := "http://" + ct.vip.String() + "/"

	// A long-lived connection that landed on backend-b.
	toB := ct.holdConns(t, ct.c1, "backend-b", 1)[0]

	want := func(backends ...*testnet.Host) []string {
		var out []string
		for _, h := range backends {
			out = append(out, addr(h, backendPort))
		}
		slices.Sort(out)
		return out
	}
	waitBackends := func(want []string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			st, err := ct.d.Client().Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got := backendsOf(st, ct.vip.String())
			if slices.Equal(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("backends %v, want %v", got, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	ct.writeConfig(t, cfg(ct.ba, ct.bc))
	if err := ct.d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitBackends(want(ct.ba, ct.bc))
	seen := ct.split(t, url, 60)
	if len(seen) != 2 || seen["backend-a"] == 0 || seen["backend-c"] == 0 {
		t.Errorf("after reload, replies by backend %v, want backend-a and backend-c only", seen)
	}
	for i := 0; i < 3; i++ {
		if b, err := request(toB); err != nil || b != "backend-b" {
			t.Fatalf("request %d on the connection to removed backend-b: %q, %v", i, b, err)
		}
	}

	bad := []struct{ name, file string }{
		{"unknown key", cfg(ct.bb) + "colour: blue\n"},
		{"bad backend", strings.Replace(cfg(ct.bb), addr(ct.bb, backendPort), ct.bb.IP.String(), 1)},
		{"unknown policy", strings.Replace(cfg(ct.bb), "    backends:", "    policy: no-such-policy\n    backends:", 1)},
	}
	for _, tt := range bad {
		t.Run("refused: "+tt.name, func(t *testing.T) {
			refused := strings.Count(ct.d.Output(), "reload refused")
			ct.writeConfig(t, tt.file)
			if err := ct.d.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for strings.Count(ct.d.Output(), "reload refused") == refused {
				if time.Now().After(deadline) {
					t.Fatalf("xlbd did not log a refused reload")
				}
				time.Sleep(50 * time.Millisecond)
			}
			if done, err := ct.d.Exited(); done {
				t.Fatalf("xlbd exited on a bad reload: %v", err)
			}
			waitBackends(want(ct.ba, ct.bc))
			seen := ct.split(t, url, 20)
			if seen["backend-b"] != 0 || seen["backend-a"]+seen["backend-c"] != 20 {
				t.Errorf("after a refused reload, replies by backend %v, want backend-a and backend-c only", seen)
			}
			if b, err := request(toB); err != nil || b != "backend-b" {
				t.Errorf("connection to removed backend-b: %q, %v", b, err)
			}
		})
	}
}

// TestConntrackPortReuse makes many more sequential connections to one
// backend than there are source ports: each port rests for the hold
// (time-wait, 100ms here) after its connection ends and then serves
// again. At most one connection every 2 ms stays below the 64 ports'
// capacity of 640 per second. The client ends each connection with a
// RST.
func TestConntrackPortReuse(t *testing.T) {
	ct := newConfigTopo(t, "native")
	ct.start(t, fmt.Sprintf(`
iface: eth0
source-ports: 20000-20063
conntrack:
  gc-interval: 200ms
  timeouts: {syn: 2s, established: 2s, fin: 1s, closed: 1s, time-wait: 100ms}
services:
  - vip: %s
    backends: [%s]
`, ct.vip, addr(ct.ba, backendPort)))
	const ports, n = 64, 64*3 + 8
	ctx := context.Background()
	start := time.Now()
	for i := 0; i < n; i++ {
		time.Sleep(2 * time.Millisecond)
		conn, err := ct.c1.NS.Dial(ctx, "tcp", ct.vip.String())
		if err != nil {
			t.Fatalf("connection %d of %d: %v", i+1, n, err)
		}
		b, err := request(conn)
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
		if err != nil || b != "backend-a" {
			t.Fatalf("connection %d of %d: %q, %v", i+1, n, b, err)
		}
	}
	t.Logf("%d sequential connections over %d source ports in %v", n, ports, time.Since(start))
	counters := ct.counters(t)
	if counters["new_conn"] < n {
		t.Errorf("new_conn = %d, want >= %d", counters["new_conn"], n)
	}
	t.Logf("counters: new_conn=%d closed=%d rst_no_port=%d recycled=%d",
		counters["new_conn"], counters["closed"], counters["rst_no_port"], counters["recycled"])

	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := ct.d.Client().Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cs, err := ct.d.Client().Conns(ctx)
		if err != nil {
			t.Fatal(err)
		}
		active := int64(0)
		for _, s := range st.Services {
			for _, b := range s.Backends {
				active += b.Active
			}
		}
		if active == 0 && len(cs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5 s after the last connection: %d active, %d tracked: %+v", active, len(cs), cs)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestShortConnectionsNoStall sends many short HTTP connections straight
// to the backends and then through xlb with the default settings, and
// counts requests slower than 900 ms: a SYN that the backend refuses
// (for example because the load balancer reused a source port whose
// four-tuple is still in TIME_WAIT on the backend) costs the client a
// one-second retransmission. xlb must not stall more than direct does.
func TestShortConnectionsNoStall(t *testing.T) {
	ct := newConfigTopo(t, "native")
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s, %s]\n",
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	const n, workers, slow = 12000, 4, 900 * time.Millisecond
	stalls := func(urls ...string) (stalled int, worst time.Duration) {
		c := []*http.Client{ct.c1.NS.HTTPClient(false)}
		getMany(t, c, urls, n, workers, func(_ string, d time.Duration) {
			if d > slow {
				stalled++
			}
			worst = max(worst, d)
		})
		return stalled, worst
	}
	ds, dw := stalls("http://"+addr(ct.ba, backendPort)+"/", "http://"+addr(ct.bb, backendPort)+"/")
	xs, xw := stalls("http://" + ct.vip.String() + "/")
	c := ct.counters(t)
	t.Logf("direct: %d of %d requests over %v (worst %v); xlb: %d (worst %v); new_conn=%d recycled=%d",
		ds, n, slow, dw, xs, xw, c["new_conn"], c["recycled"])
	if xs > ds {
		t.Errorf("%d of %d requests through xlb took over %v (direct: %d): new connections stall", xs, n, slow, ds)
	}
}
