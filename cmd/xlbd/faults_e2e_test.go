package main

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// shortConn opens a connection to the VIP from h, sends one request, and
// closes it (the client closes first, so no port is held for a
// TIME_WAIT): it returns the backend that answered.
func (tp *topo) shortConn(h *testnet.Host, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := h.NS.Dial(ctx, "tcp", tp.vip.String())
	if err != nil {
		return "", err
	}
	defer conn.Close()
	return request(conn)
}

// attempt is one short connection of a traffic run.
type attempt struct {
	start   time.Time
	took    time.Duration
	backend string
	err     error
}

// traffic opens a short connection from h every interval, each from its
// own goroutine, until stop is closed; it returns every attempt once all
// have ended.
func (tp *topo) traffic(h *testnet.Host, interval, timeout time.Duration, stop <-chan struct{}) func() []attempt {
	var mu sync.Mutex
	var out []attempt
	var wg sync.WaitGroup
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				a := attempt{start: time.Now()}
				a.backend, a.err = tp.shortConn(h, timeout)
				a.took = time.Since(a.start)
				mu.Lock()
				out = append(out, a)
				mu.Unlock()
			}()
		}
	}()
	return func() []attempt {
		<-done
		wg.Wait()
		slices.SortFunc(out, func(a, b attempt) int { return a.start.Compare(b.start) })
		return out
	}
}

// statusPoller runs the real `xlbctl status` every interval until stop is
// closed, and returns each run's duration and error.
func (tp *topo) statusPoller(t *testing.T, interval time.Duration, stop <-chan struct{}) func() ([]time.Duration, []error) {
	var took []time.Duration
	var errs []error
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(interval):
			}
			start := time.Now()
			cmd := exec.Command(filepath.Join(tp.d.Dir, "xlbctl"), "--socket", tp.d.Socket, "--timeout", "30s", "status")
			out, err := cmd.CombinedOutput()
			took = append(took, time.Since(start))
			if err != nil {
				errs = append(errs, fmt.Errorf("xlbctl status: %v: %s", err, out))
			}
		}
	}()
	return func() ([]time.Duration, []error) {
		<-done
		return took, errs
	}
}

// stopPlugin stops pid with SIGSTOP and makes sure it is neither left
// stopped nor alive when the test ends.
func stopPlugin(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("stop plugin %d: %v", pid, err)
	}
	t.Cleanup(func() {
		if !xlbtest.ProcessGone(pid) {
			_ = syscall.Kill(pid, syscall.SIGCONT)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// pluginOf returns the status of the plugin of policy name.
func pluginOf(st *controlpb.Status, name string) (*controlpb.PolicyPlugin, bool) {
	for _, p := range st.Policies {
		if p.Name == name {
			return p, true
		}
	}
	return nil, false
}

// waitReplaced waits until policy's plugin runs with another pid than
// old, and returns how long that took from since.
func (tp *topo) waitReplaced(t *testing.T, policy string, old int, since time.Time, limit time.Duration) time.Duration {
	t.Helper()
	for {
		p, ok := pluginOf(tp.status(t), policy)
		if ok && p.Pid != 0 && int(p.Pid) != old {
			return time.Since(since)
		}
		if time.Since(since) > limit {
			t.Fatalf("plugin of %s not replaced within %s: %+v", policy, limit, tp.status(t).Policies)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestPluginStopped stops (SIGSTOP) the policy plugin in force under a
// steady stream of short connections: the plugin is killed and replaced
// within its deadline, `xlbctl status` answers quickly throughout, and
// every short connection succeeds. The source-port range is small and the
// ports' hold short (time-wait 100ms), so the connections go round the
// ports many times over while the plugin is stopped. Then a policy swap
// away from a stopped plugin.
func TestPluginStopped(t *testing.T) {
	ct := newConfigTopo(t, "native")
	const ports = 128
	ct.start(t, fmt.Sprintf(`iface: eth0
source-ports: 20000-%d
conntrack:
  gc-interval: 100ms
  timeouts: {closed: 1s, fin: 2s, time-wait: 100ms}
services:
  - vip: %s
    policy: least-conn
    backends: [%s, %s]
`, 20000+ports-1, ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	tp := ct.topo
	stop := make(chan struct{})
	results := tp.traffic(tp.c1, 10*time.Millisecond, 5*time.Second, stop)
	statuses := tp.statusPoller(t, 200*time.Millisecond, stop)
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			results()
			statuses()
		}
	}()
	time.Sleep(time.Second)

	// The deadline: a call (least-conn is asked every second) or a ping
	// (every second) runs into the 2 s call deadline, then SIGKILL, then
	// a restart after 100 ms of backoff.
	const replaceWithin = 5 * time.Second
	for _, policy := range []string{"least-conn", "random"} {
		t.Run(policy, func(t *testing.T) {
			if policy != "least-conn" {
				if out, err := tp.xlbctl(t, "policy", "set", policy); err != nil {
					t.Fatalf("xlbctl policy set %s: %v\n%s", policy, err, out)
				}
			}
			p, ok := pluginOf(tp.status(t), policy)
			if !ok || p.Pid == 0 {
				t.Fatalf("no %s plugin running: %+v", policy, tp.status(t).Policies)
			}
			stopPlugin(t, int(p.Pid))
			at := time.Now()
			took := tp.waitReplaced(t, policy, int(p.Pid), at, replaceWithin)
			t.Logf("stopped %s plugin (pid %d, asked %s) replaced after %s", policy, int(p.Pid), p.Asked, took.Round(time.Millisecond))
			if !xlbtest.ProcessGone(int(p.Pid)) {
				t.Errorf("stopped plugin %d still alive after its replacement", int(p.Pid))
			}
			if !strings.Contains(tp.d.Output(), "policy plugin hung; killed it") {
				t.Errorf("xlbd did not log the hang")
			}
			time.Sleep(2 * time.Second) // traffic with the new plugin
		})
	}

	t.Run("swap away from a stopped plugin", func(t *testing.T) {
		p, _ := pluginOf(tp.status(t), "random")
		stopPlugin(t, int(p.Pid))
		start := time.Now()
		out, err := tp.xlbctl(t, "policy", "set", "hash")
		took := time.Since(start)
		if err != nil {
			t.Fatalf("xlbctl policy set hash with random stopped: %v\n%s", err, out)
		}
		t.Logf("policy set hash took %s with the old plugin stopped: %s", took.Round(time.Millisecond), strings.TrimSpace(out))
		if took > 3*time.Second {
			t.Errorf("policy set took %s", took)
		}
		deadline := time.Now().Add(3 * time.Second)
		for !xlbtest.ProcessGone(int(p.Pid)) {
			if time.Now().After(deadline) {
				t.Fatalf("stopped plugin %d of the old policy still alive 3s after the swap", int(p.Pid))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("the stopped plugin was gone %s after the swap began", time.Since(start).Round(time.Millisecond))
		time.Sleep(2 * time.Second)
	})

	stopped = true
	close(stop)
	all := results()
	took, errs := statuses()
	var failed []attempt
	for _, a := range all {
		if a.err != nil {
			failed = append(failed, a)
		}
	}
	slices.Sort(took)
	if len(took) == 0 {
		t.Fatal("no xlbctl status ran")
	}
	worst := took[len(took)-1]
	t.Logf("%d short connections, %d failed; xlbctl status ran %d times: median %s, worst %s",
		len(all), len(failed), len(took), took[len(took)/2].Round(time.Millisecond), worst.Round(time.Millisecond))
	if len(failed) > 0 {
		t.Errorf("%d of %d short connections failed, first at %s: %v", len(failed), len(all),
			failed[0].start.Format("15:04:05.000"), failed[0].err)
	}
	if len(errs) > 0 {
		t.Errorf("%d xlbctl status runs failed, first: %v", len(errs), errs[0])
	}
	if worst > time.Second {
		t.Errorf("xlbctl status took up to %s while plugins were stopped", worst)
	}
	// The ports went round several times.
	if len(all) < 4*2*ports {
		t.Errorf("only %d connections: the test did not outrun the %d ports per backend", len(all), ports)
	}
	if c := tp.counters(t); c["rst_no_port"] > 0 {
		t.Errorf("rst_no_port = %d: ports were not freed", c["rst_no_port"])
	}
}

// TestPluginsDieWithXlbd kills xlbd with SIGKILL: its policy plugins are
// gone within a second.
func TestPluginsDieWithXlbd(t *testing.T) {
	ct := newConfigTopo(t, "native")
	second := fmt.Sprintf("%s:%d", ct.vip.Addr(), 81)
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s]\n  - vip: %s\n    policy: least-conn\n    backends: [%s]\n",
		ct.vip, addr(ct.ba, backendPort), second, addr(ct.bb, backendPort)))
	var pids []int
	for _, p := range ct.topo.status(t).Policies {
		if p.Pid == 0 {
			t.Fatalf("plugin %s not running", p.Name)
		}
		pids = append(pids, int(p.Pid))
	}
	if len(pids) != 2 {
		t.Fatalf("%d plugins, want 2", len(pids))
	}
	t.Cleanup(func() {
		for _, pid := range pids {
			if !xlbtest.ProcessGone(pid) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	if err := ct.d.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for _, pid := range pids {
		for !xlbtest.ProcessGone(pid) {
			if time.Since(killed) > time.Second {
				t.Fatalf("plugin %d still alive %s after xlbd got SIGKILL", pid, time.Since(killed))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	t.Logf("plugins %v gone %s after xlbd got SIGKILL", pids, time.Since(killed).Round(time.Millisecond))
}

// selects counts the Select calls a plugin logged (at debug level) in
// xlbd's output.
func selects(out, plugin string) int {
	n := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "msg=select ") && strings.Contains(line, "plugin="+plugin+" ") {
			n++
		}
	}
	return n
}

// TestPolicyNeeds: random and hash, which read no live load, are asked
// only when their service changes; least-conn, which does, every second.
// Status says so.
func TestPolicyNeeds(t *testing.T) {
	ct := newConfigTopo(t, "native")
	second := fmt.Sprintf("%s:%d", ct.vip.Addr(), 81)
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s, %s]\n  - vip: %s\n    policy: least-conn\n    backends: [%s, %s]\n",
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort), second, addr(ct.ba, backendPort), addr(ct.bc, backendPort)))
	const wait = 3500 * time.Millisecond
	time.Sleep(wait)
	out := ct.d.Output()
	random, leastConn := selects(out, "xlb-policy-random"), selects(out, "xlb-policy-least-conn")
	t.Logf("in %s: random asked %d times, least-conn %d times", wait, random, leastConn)
	if random != 1 {
		t.Errorf("random asked %d times in %s, want once (at start)", random, wait)
	}
	if leastConn < 3 {
		t.Errorf("least-conn asked %d times in %s, want every second", leastConn, wait)
	}
	st := ct.topo.status(t)
	for name, want := range map[string]string{"random": "on change", "least-conn": "live load every 1s"} {
		p, ok := pluginOf(st, name)
		if !ok || p.Asked != want || p.ApiVersion != 3 {
			t.Errorf("plugin %s: %+v, want asked %q, api 2", name, p, want)
		}
	}
	// A change of the service asks the policy again.
	if _, err := ct.topo.xlbctl(t, "policy", "set", "hash", "--service", ct.vip.String()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if n := selects(ct.d.Output(), "xlb-policy-hash"); n != 1 {
		t.Errorf("hash asked %d times in 2s after the swap, want once", n)
	}
}

// requestsAfter checks the attempts that started at least after from: all
// must have succeeded, each within limit.
func requestsAfter(t *testing.T, what string, all []attempt, from time.Time, limit time.Duration) {
	t.Helper()
	n := 0
	for _, a := range all {
		if a.start.Before(from) {
			continue
		}
		n++
		if a.err != nil || a.took > limit {
			t.Errorf("%s: a connection started %s after the change: %v after %s", what, a.start.Sub(from).Round(time.Millisecond), a.err, a.took.Round(time.Millisecond))
		}
	}
	if n < 5 {
		t.Errorf("%s: only %d connections to check", what, n)
	}
}

// backendStatus returns the status of the backend at address a.
func backendStatus(st *controlpb.Status, a string) *controlpb.Backend {
	for _, s := range st.Services {
		for _, b := range s.Backends {
			if b.Address == a {
				return b
			}
		}
	}
	return &controlpb.Backend{}
}

// TestBackendNextHop re-creates a backend with a new MAC, removes it, and
// removes every backend, under a steady stream of short connections: the
// re-created backend gets new connections again within 3 s, a vanished
// one stops getting them within 3 s, and with every backend gone the
// service refuses new connections with a RST (rst_no_backend) until one
// comes back.
// Status shows each backend's state and next hop throughout.
func TestBackendNextHop(t *testing.T) {
	ct := newConfigTopo(t, "native")
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s, %s]\n",
		ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	tp := ct.topo
	aAddr, bAddr := addr(ct.ba, backendPort), addr(ct.bb, backendPort)
	const within = 3 * time.Second
	run := func(t *testing.T, d time.Duration, change func()) (time.Time, []attempt) {
		stop := make(chan struct{})
		results := tp.traffic(tp.c1, 50*time.Millisecond, 5*time.Second, stop)
		time.Sleep(300 * time.Millisecond)
		at := time.Now()
		change()
		time.Sleep(d)
		close(stop)
		return at, results()
	}
	if b := backendStatus(tp.status(t), bAddr); b.State != "up" || !strings.Contains(b.NextHop, ct.bb.MAC.String()) {
		t.Fatalf("backend-b at start: %+v, want up at %s", b, ct.bb.MAC)
	}

	t.Run("re-created with a new MAC", func(t *testing.T) {
		old := ct.bb.MAC
		at, all := run(t, within+2*time.Second, func() { ct.lan.ReplaceLink(ct.bb) })
		// The first connection after the re-creation that backend-b
		// answered at once (not after a SYN retransmission).
		first := time.Duration(-1)
		for _, a := range all {
			if a.err == nil && a.backend == "backend-b" && a.start.After(at) && a.took < 500*time.Millisecond {
				first = a.start.Sub(at)
				break
			}
		}
		var hung int
		for _, a := range all {
			if a.start.After(at) && (a.err != nil || a.took > time.Second) {
				hung++
			}
		}
		t.Logf("new MAC %s (was %s): first connection backend-b answered at once started %s after the re-creation; %d of %d connections slow or failed meanwhile",
			ct.bb.MAC, old, first.Round(time.Millisecond), hung, len(all))
		if first < 0 || first > within {
			t.Errorf("backend-b got no new connection within %s", within)
		}
		requestsAfter(t, "new MAC", all, at.Add(within), time.Second)
		if b := backendStatus(tp.status(t), bAddr); b.State != "up" || !strings.Contains(b.NextHop, ct.bb.MAC.String()) {
			t.Errorf("backend-b status %+v, want up at %s", b, ct.bb.MAC)
		}
	})

	t.Run("vanished", func(t *testing.T) {
		var down time.Duration
		at, all := run(t, within+2*time.Second, func() {
			start := time.Now()
			ct.lan.RemoveLink(ct.bb)
			for backendStatus(tp.status(t), bAddr).State != "down" && time.Since(start) < 2*within {
				time.Sleep(50 * time.Millisecond)
			}
			down = time.Since(start)
		})
		b := backendStatus(tp.status(t), bAddr)
		var hung int
		for _, a := range all {
			if a.start.After(at) && a.err != nil {
				hung++
			}
		}
		t.Logf("backend-b down %s after it vanished (%s); %d of %d connections failed meanwhile", down.Round(time.Millisecond), b.NextHop, hung, len(all))
		if b.State != "down" || down > within || !strings.Contains(b.NextHop, "answered none") {
			t.Errorf("backend-b status %+v %s after it vanished, want down within %s", b, down, within)
		}
		requestsAfter(t, "vanished", all, at.Add(within), time.Second)
		for _, a := range all {
			if a.start.After(at.Add(within)) && a.backend == "backend-b" {
				t.Errorf("a vanished backend answered")
			}
		}
	})

	t.Run("every backend gone", func(t *testing.T) {
		before := tp.counters(t)["rst_no_backend"]
		ct.lan.RemoveLink(ct.ba)
		deadline := time.Now().Add(within)
		for backendStatus(tp.status(t), aAddr).State != "down" {
			if time.Now().After(deadline) {
				t.Fatalf("backend-a not down within %s: %+v", within, backendStatus(tp.status(t), aAddr))
			}
			time.Sleep(50 * time.Millisecond)
		}
		if _, err := tp.shortConn(tp.c1, time.Second); err == nil {
			t.Errorf("a connection succeeded with every backend down")
		}
		if after := tp.counters(t)["rst_no_backend"]; after <= before {
			t.Errorf("rst_no_backend %d -> %d: the service still selects a backend", before, after)
		}
		if !strings.Contains(tp.d.Output(), "service has no selection table") {
			t.Errorf("xlbd did not log that the service has no table")
		}
		ct.lan.ReplaceLink(ct.ba)
		ct.lan.ReplaceLink(ct.bb)
		start := time.Now()
		seen := map[string]bool{}
		for len(seen) < 2 {
			if b, err := tp.shortConn(tp.c1, time.Second); err == nil {
				seen[b] = true
			}
			if time.Since(start) > 2*within {
				t.Fatalf("backends back, but only %v answer after %s: %+v", seen, 2*within, tp.status(t).Services)
			}
		}
		t.Logf("both backends answer again %s after they came back", time.Since(start).Round(time.Millisecond))
	})
}
