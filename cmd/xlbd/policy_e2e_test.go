package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// xlbctl runs the real xlbctl against the daemon.
func (tp *topo) xlbctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(tp.d.Dir, "xlbctl"), append([]string{"--socket", tp.d.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (tp *topo) status(t *testing.T) *controlpb.Status {
	t.Helper()
	st, err := tp.d.Client().Status(context.Background())
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return st
}

// longConn is a client connection kept open across a test, with the
// backend that answered it first.
type longConn struct {
	conn    net.Conn
	backend string
}

// open dials the VIP from h, sends one request and keeps the connection.
func (tp *topo) open(t *testing.T, h *testnet.Host) longConn {
	t.Helper()
	conn, err := h.NS.Dial(context.Background(), "tcp", tp.vip.String())
	if err != nil {
		t.Fatalf("dial %s from %s: %v", tp.vip, h.Name, err)
	}
	t.Cleanup(func() { conn.Close() })
	b, err := request(conn)
	if err != nil {
		t.Fatalf("first request from %s: %v", h.Name, err)
	}
	return longConn{conn, b}
}

// checkStick sends a request on every long-lived connection and fails if
// one broke or moved to another backend.
func checkStick(t *testing.T, what string, conns []longConn) {
	t.Helper()
	for i, c := range conns {
		b, err := request(c.conn)
		if err != nil {
			t.Fatalf("%s: long-lived connection %d broke: %v", what, i, err)
		}
		if b != c.backend {
			t.Fatalf("%s: long-lived connection %d moved from %s to %s", what, i, c.backend, b)
		}
	}
}

func (tp *topo) setPolicy(t *testing.T, policy string) {
	t.Helper()
	out, err := tp.xlbctl(t, "policy", "set", policy)
	if err != nil {
		t.Fatalf("xlbctl policy set %s: %v\n%s", policy, err, out)
	}
	t.Logf("xlbctl policy set %s: %s", policy, strings.TrimSpace(out))
	st := tp.status(t)
	if got := st.Services[0].Policy; got != policy {
		t.Fatalf("policy in force: %s, want %s", got, policy)
	}
	if len(st.Policies) != 1 || st.Policies[0].Name != policy || st.Policies[0].Pid == 0 {
		t.Fatalf("policy plugins after the swap: %+v, want only %s running", st.Policies, policy)
	}
}

func active(st *controlpb.Status) map[string]int64 {
	out := map[string]int64{}
	for _, b := range st.Services[0].Backends {
		out[b.Address] = b.Active
	}
	return out
}

func (tp *topo) backendName(addr string) string {
	switch {
	case strings.HasPrefix(addr, tp.ba.IP.String()+":"):
		return "backend-a"
	case strings.HasPrefix(addr, tp.bb.IP.String()+":"):
		return "backend-b"
	}
	return addr
}

func TestPolicySwapLive(t *testing.T) {
	tp := newTopo(t, "native", "--policy", "random")
	parent := t // connections outlive the subtests that open them
	var long []longConn
	for i := 0; i < 50; i++ {
		h := tp.c1
		if i%2 == 1 {
			h = tp.c2
		}
		long = append(long, tp.open(t, h))
	}
	checkStick(t, "before any swap", long)

	t.Run("hash", func(t *testing.T) {
		tp.setPolicy(t, "hash")
		checkStick(t, "after random -> hash", long)
		// New connections follow the hash: the same client port always
		// lands on the same backend, and ports spread over both.
		seen := map[string]int{}
		for p := 0; p < 16; p++ {
			laddr := fmt.Sprintf("%s:%d", tp.c1.IP, 43000+p)
			var first string
			for round := 0; round < 3; round++ {
				conn, err := tp.c1.NS.DialFrom(context.Background(), laddr, tp.vip.String())
				if err != nil {
					t.Fatalf("dial from %s: %v", laddr, err)
				}
				b, err := request(conn)
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
				if err != nil {
					t.Fatalf("request from %s: %v", laddr, err)
				}
				if round == 0 {
					first = b
					seen[b]++
				} else if b != first {
					t.Fatalf("hash: %s went to %s, then to %s", laddr, first, b)
				}
			}
		}
		if len(seen) != 2 {
			t.Fatalf("hash over 16 client ports used %v, want both backends", seen)
		}
	})

	t.Run("least-conn", func(t *testing.T) {
		tp.setPolicy(t, "least-conn")
		checkStick(t, "after hash -> least-conn", long)
		// Every new connection goes to a backend that had no more open
		// connections than the other at that moment.
		for i := 0; i < 10; i++ {
			before := active(tp.status(t))
			c := tp.open(parent, tp.c1)
			long = append(long, c)
			for addr, n := range before {
				name := tp.backendName(addr)
				if name == c.backend {
					continue
				}
				var mine int64
				for a2, n2 := range before {
					if tp.backendName(a2) == c.backend {
						mine = n2
					}
				}
				if mine > n {
					t.Fatalf("least-conn chose %s with %d open over %s with %d", c.backend, mine, name, n)
				}
			}
		}
	})

	t.Run("random", func(t *testing.T) {
		tp.setPolicy(t, "random")
		checkStick(t, "after least-conn -> random", long)
		if seen := tp.answersFrom(t, tp.c2, 40); len(seen) != 2 {
			t.Fatalf("random over 40 connections used %v", seen)
		}
	})

	t.Run("plugin killed during traffic", func(t *testing.T) {
		st := tp.status(t)
		pid := st.Policies[0].Pid
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		var mu sync.Mutex
		var failures []error
		var done int
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := tp.c1.NS.HTTPClient(false)
				for ctx.Err() == nil {
					_, err := testnet.Get(t.Context(), c, "http://"+tp.vip.String()+"/")
					mu.Lock()
					if err != nil {
						failures = append(failures, err)
					}
					done++
					mu.Unlock()
				}
			}()
		}
		time.Sleep(500 * time.Millisecond)
		if err := syscall.Kill(int(pid), syscall.SIGKILL); err != nil {
			t.Fatalf("kill plugin %d: %v", pid, err)
		}
		checkStick(t, "while the plugin is dead", long)
		wg.Wait()
		if len(failures) > 0 {
			t.Fatalf("%d of %d requests failed while the plugin was killed: %v", len(failures), done, failures[0])
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st = tp.status(t)
			if p := st.Policies[0]; p.Pid != 0 && p.Pid != pid && p.Restarts > 0 {
				t.Logf("%d requests during the kill, none failed; plugin restarted as pid %d", done, p.Pid)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("plugin not restarted: %+v\n%s", st.Policies, tp.d.Output())
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !strings.Contains(tp.d.Output(), "policy plugin exited") {
			t.Errorf("xlbd did not log the plugin's exit")
		}
		checkStick(t, "after the restart", long)
	})
}

func TestLeastConnBurst(t *testing.T) {
	tp := newTopo(t, "native", "--policy", "random")
	// 50 open connections on backend-a, none on backend-b.
	var onA []longConn
	for len(onA) < 50 {
		c := tp.open(t, tp.c1)
		if c.backend == "backend-a" {
			onA = append(onA, c)
			continue
		}
		c.conn.(*net.TCPConn).SetLinger(0)
		c.conn.Close()
	}
	waitActive(t, tp, map[string]int64{"backend-a": 50, "backend-b": 0})
	tp.setPolicy(t, "least-conn")
	// The next 50, opened back to back, all go to backend-b.
	for i := 0; i < 50; i++ {
		if c := tp.open(t, tp.c2); c.backend != "backend-b" {
			t.Fatalf("burst connection %d went to %s", i, c.backend)
		}
	}
	checkStick(t, "after the burst", onA)
}

func waitActive(t *testing.T, tp *topo, want map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := map[string]int64{}
		for addr, n := range active(tp.status(t)) {
			got[tp.backendName(addr)] = n
		}
		if fmt.Sprint(got) == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("active connections %v, want %v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// buildPolicy builds a policy plugin from pkg into dir as name.
func buildPolicy(t *testing.T, dir, name, pkg string) string {
	t.Helper()
	root, err := xlbtest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, b)
	}
	return out
}

func TestThirdPartyPolicy(t *testing.T) {
	tp := newTopo(t, "native", "--policy", "random")
	wrr := buildPolicy(t, t.TempDir(), "xlb-policy-wrr", "./docs/examples/policy-wrr")
	tp.setPolicy(t, wrr)
	seen := tp.answersFrom(t, tp.c1, 40)
	// Round robin keeps a position per CPU: each CPU's sequence is exact,
	// so the split is even up to one connection per CPU.
	diff := seen["backend-a"] - seen["backend-b"]
	if diff < 0 {
		diff = -diff
	}
	if ncpu := 2; diff > ncpu || len(seen) != 2 {
		t.Fatalf("weighted round robin over 40 connections: %v", seen)
	}
	t.Logf("wrr split: %v", seen)
}

func TestPolicyRefused(t *testing.T) {
	tp := newTopo(t, "native", "--policy", "hash")
	dir := t.TempDir()
	nonsense := buildPolicy(t, dir, "policy-nonsense", "./cmd/xlbd/testdata/policy-misbehave")
	hang := buildPolicy(t, dir, "policy-hang", "./cmd/xlbd/testdata/policy-misbehave")
	for _, tc := range []struct {
		name, policy, wantErr string
	}{
		{"unknown name", "no-such-policy", "no-such-policy"},
		{"nonsense table", nonsense, "backend"},
		{"hanging plugin", hang, "no answer within 2s, plugin killed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tp.xlbctl(t, "policy", "set", tc.policy)
			if err == nil {
				t.Fatalf("xlbctl policy set %s succeeded: %s", tc.policy, out)
			}
			if !strings.Contains(out, tc.wantErr) {
				t.Fatalf("xlbctl said %q, want it to mention %q", out, tc.wantErr)
			}
			st := tp.status(t)
			if st.Services[0].Policy != "hash" {
				t.Fatalf("policy changed to %s after a refused swap", st.Services[0].Policy)
			}
			if len(st.Policies) != 1 || st.Policies[0].Name != "hash" {
				t.Fatalf("plugins after a refused swap: %+v", st.Policies)
			}
			c := tp.c1.NS.HTTPClient(false)
			for i := 0; i < 10; i++ {
				if _, err := testnet.Get(t.Context(), c, "http://"+tp.vip.String()+"/"); err != nil {
					t.Fatalf("traffic after a refused swap: %v", err)
				}
			}
		})
	}
}

func TestPluginPinning(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"lb", "backend-a"}})
	lb, ba := lan.Host("lb"), lan.Host("backend-a")
	dir, err := xlbtest.Build()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256File(t, filepath.Join(dir, "xlb-policy-random"))
	for _, tc := range []struct {
		name, pin string
		wantOK    bool
	}{
		{"right sum", sum, true},
		{"wrong sum", strings.Repeat("0", 64), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "xlb.yaml")
			body := fmt.Sprintf("iface: eth0\nplugin-sha256:\n  random: %q\nservices:\n  - vip: %s:80\n    backends: [%s:8080]\n", tc.pin, lb.IP, ba.IP)
			if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.wantOK {
				d := xlbtest.Start(t, lb.NS, "--config", cfg)
				st, err := d.Client().Status(context.Background())
				if err != nil || len(st.Policies) != 1 || st.Policies[0].Pid == 0 {
					t.Fatalf("pinned plugin not running: %+v %v", st.Policies, err)
				}
				return
			}
			out, err := lb.NS.ExecErr(filepath.Join(dir, "xlbd"), "--config", cfg, "--socket", filepath.Join(t.TempDir(), "s"))
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 || !strings.Contains(out, "checksum mismatch") {
				t.Fatalf("xlbd with a wrong pin: %v, %q; want exit 2 and a checksum mismatch", err, out)
			}
		})
	}
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestPolicyReload swaps a service's policy by editing the configuration
// file and sending SIGHUP: the new plugin runs, the old one is stopped,
// and a connection opened before the reload keeps its backend.
func TestPolicyReload(t *testing.T) {
	ct := newConfigTopo(t, "native")
	cfg := func(policy string) string {
		return fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: %s\n    backends: [%s, %s]\n",
			ct.vip, policy, addr(ct.ba, backendPort), addr(ct.bb, backendPort))
	}
	ct.start(t, cfg("random"))
	long := ct.topo.open(t, ct.c1)
	for _, policy := range []string{"hash", "least-conn"} {
		ct.writeConfig(t, cfg(policy))
		if err := ct.d.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			st := ct.topo.status(t)
			if st.Services[0].Policy == policy && len(st.Policies) == 1 && st.Policies[0].Name == policy && st.Policies[0].Pid != 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after reload to %s: services %+v, plugins %+v\n%s", policy, st.Services, st.Policies, ct.d.Output())
			}
			time.Sleep(50 * time.Millisecond)
		}
		checkStick(t, "after reload to "+policy, []longConn{long})
	}
}

// TestPolicyPerService swaps the policy of one service only with
// `xlbctl policy set NAME --service VIP:PORT`; the other keeps its own.
func TestPolicyPerService(t *testing.T) {
	ct := newConfigTopo(t, "native")
	second := netip.AddrPortFrom(ct.vip.Addr(), 8081)
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s, %s]\n  - vip: %s\n    policy: random\n    backends: [%s]\n",
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort), second, addr(ct.bc, backendPort)))
	out, err := ct.topo.xlbctl(t, "policy", "set", "hash", "--service", second.String())
	if err != nil {
		t.Fatalf("xlbctl policy set hash --service %s: %v\n%s", second, err, out)
	}
	if !strings.Contains(out, second.String()) || strings.Contains(out, ct.vip.String()+",") {
		t.Errorf("xlbctl said %q, want only %s swapped", out, second)
	}
	policies := map[string]string{}
	for _, s := range ct.topo.status(t).Services {
		policies[s.Vip] = s.Policy
	}
	if policies[ct.vip.String()] != "random" || policies[second.String()] != "hash" {
		t.Fatalf("policies after the swap: %v", policies)
	}
	if _, err := ct.topo.xlbctl(t, "policy", "set", "hash", "--service", "10.199.0.250:80"); err == nil {
		t.Errorf("swapping the policy of a service that does not exist succeeded")
	}
	c := ct.c1.NS.HTTPClient(false)
	for _, vip := range []netip.AddrPort{ct.vip, second} {
		if _, err := testnet.Get(t.Context(), c, "http://"+vip.String()+"/"); err != nil {
			t.Fatalf("request to %s: %v", vip, err)
		}
	}
}
