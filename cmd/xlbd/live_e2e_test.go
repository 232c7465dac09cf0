package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// mustXlbctl runs the real xlbctl and fails the test if it fails.
func (tp *topo) mustXlbctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := tp.xlbctl(t, args...)
	if err != nil {
		t.Fatalf("xlbctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// holdConns opens connections from h to the VIP until n of them reached
// backend (each sends one request); the others are closed.
func (tp *topo) holdConns(t *testing.T, h *testnet.Host, backend string, n int) []net.Conn {
	t.Helper()
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	for i := 0; i < 40*n && len(held) < n; i++ {
		conn, err := h.NS.Dial(context.Background(), "tcp", tp.vip.String())
		if err != nil {
			t.Fatal(err)
		}
		b, err := request(conn)
		if err != nil {
			conn.Close()
			t.Fatal(err)
		}
		if b == backend {
			held = append(held, conn)
		} else {
			conn.Close()
		}
	}
	if len(held) < n {
		t.Fatalf("only %d of %d connections reached %s", len(held), n, backend)
	}
	return held
}

// waitBackend waits up to 5 s until the status of backend a of the
// topology's service passes ok.
func (tp *topo) waitBackend(t *testing.T, a string, what string, ok func(*controlpb.Backend) bool) *controlpb.Backend {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := tp.status(t)
		var bk *controlpb.Backend
		for _, s := range st.Services {
			if s.Vip != tp.vip.String() {
				continue
			}
			for _, b := range s.Backends {
				if b.Address == a {
					bk = b
				}
			}
		}
		if bk != nil && ok(bk) || bk == nil && ok(nil) {
			return bk
		}
		if time.Now().After(deadline) {
			t.Fatalf("backend %s: %v, want %s", a, bk, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDrain drains a backend that holds 20 connections, with `xlbctl
// backend drain`: new connections all go to the other backends, the 20
// keep working until they end, and status shows the backend draining with
// its open connections, then drained. Weight 0 in the file drains as well,
// and a removed backend stays in status until its connections end.
func TestDrain(t *testing.T) {
	ct := newConfigTopo(t, "native")
	a, b, c := addr(ct.ba, backendPort), addr(ct.bb, backendPort), addr(ct.bc, backendPort)
	file := func(bWeight int) string {
		return fmt.Sprintf("iface: eth0\nmetrics-address: %s\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s, %s@%d, %s]\n", metricsAddr, ct.vip, a, b, bWeight, c)
	}
	ct.start(t, file(1))
	tp := ct.topo
	url := "http://" + ct.vip.String() + "/"

	t.Run("xlbctl backend drain", func(t *testing.T) {
		held := tp.holdConns(t, tp.c1, "backend-a", 20)
		tp.waitBackend(t, a, "20 active", func(bk *controlpb.Backend) bool { return bk.GetActive() == 20 })
		out := tp.mustXlbctl(t, "backend", "drain", ct.vip.String(), a)
		if !strings.Contains(out, "backend "+a+" weight 1 -> 0") || !strings.Contains(out, "in force (took") {
			t.Errorf("xlbctl backend drain said:\n%s", out)
		}
		bk := tp.waitBackend(t, a, "draining", func(bk *controlpb.Backend) bool { return bk.GetState() == "draining" })
		if bk.Weight != 0 || bk.Active != 20 || !bk.Live || bk.Reason != "weight 0" {
			t.Errorf("drained backend's status: %v, want weight 0, 20 active, live", bk)
		}
		if v := mustValue(t, tp.scrape(t), "xlb_backend_state", map[string]string{"backend": a, "state": "draining"}); v != 1 {
			t.Errorf("xlb_backend_state{state=draining} of the drained backend = %v, want 1", v)
		}
		seen := tp.split(t, url, 200)
		if seen["backend-a"] != 0 || seen["backend-b"] == 0 || seen["backend-c"] == 0 {
			t.Errorf("new connections while backend-a drains: %v, want none to it", seen)
		}
		// The held connections go on, then end one by one; status counts
		// them down.
		for i, conn := range held {
			if got, err := request(conn); err != nil || got != "backend-a" {
				t.Fatalf("held connection %d during the drain: %q, %v", i, got, err)
			}
		}
		for _, conn := range held[:10] {
			conn.Close()
		}
		tp.waitBackend(t, a, "10 active", func(bk *controlpb.Backend) bool { return bk.GetActive() == 10 && bk.GetState() == "draining" })
		for _, conn := range held[10:] {
			if got, err := request(conn); err != nil || got != "backend-a" {
				t.Fatalf("held connection after others ended: %q, %v", got, err)
			}
			conn.Close()
		}
		tp.waitBackend(t, a, "drained", func(bk *controlpb.Backend) bool { return bk.GetActive() == 0 && bk.GetState() == "drained" })
		st, _ := tp.xlbctl(t, "status")
		if line := lineWith(st, "  backend "+a); !strings.Contains(line, "drained") || !strings.Contains(line, "(live)") {
			t.Errorf("xlbctl status line of the drained backend: %q", line)
		}
		tp.mustXlbctl(t, "backend", "set-weight", ct.vip.String(), a, "1")
		tp.waitBackend(t, a, "up", func(bk *controlpb.Backend) bool { return bk.GetState() == "up" && !bk.GetLive() })
		if seen := tp.split(t, url, 60); seen["backend-a"] == 0 {
			t.Errorf("backend-a back to weight 1 got no connection: %v", seen)
		}
	})

	t.Run("weight 0 in the file", func(t *testing.T) {
		held := tp.holdConns(t, tp.c2, "backend-b", 3)
		ct.writeConfig(t, file(0))
		tp.mustXlbctl(t, "reload")
		bk := tp.waitBackend(t, b, "draining", func(bk *controlpb.Backend) bool { return bk.GetState() == "draining" })
		if bk.Active != 3 || bk.Live {
			t.Errorf("backend drained by the file: %v, want 3 active, not live", bk)
		}
		if seen := tp.split(t, url, 100); seen["backend-b"] != 0 {
			t.Errorf("new connections with backend-b at weight 0 in the file: %v", seen)
		}
		for _, conn := range held {
			if got, err := request(conn); err != nil || got != "backend-b" {
				t.Errorf("held connection to backend-b: %q, %v", got, err)
			}
		}
	})

	t.Run("a removed backend stays in status until its connections end", func(t *testing.T) {
		held := tp.holdConns(t, tp.c1, "backend-c", 5)
		tp.mustXlbctl(t, "backend", "remove", ct.vip.String(), c)
		bk := tp.waitBackend(t, c, "removed", func(bk *controlpb.Backend) bool { return bk.GetState() == "removed" })
		if bk.Active != 5 {
			t.Errorf("removed backend: %v, want 5 active", bk)
		}
		if seen := tp.split(t, url, 60); seen["backend-c"] != 0 {
			t.Errorf("new connections after backend-c was removed: %v", seen)
		}
		out, _ := tp.xlbctl(t, "status")
		if line := lineWith(out, "  backend "+c); !strings.Contains(line, "removed") || !strings.Contains(line, "active 5") {
			t.Errorf("xlbctl status line of the removed backend: %q", line)
		}
		for _, conn := range held {
			if got, err := request(conn); err != nil || got != "backend-c" {
				t.Errorf("held connection to the removed backend: %q, %v", got, err)
			}
			conn.Close()
		}
		tp.waitBackend(t, c, "gone from status", func(bk *controlpb.Backend) bool { return bk == nil })
	})
}

// summarise is the configuration xlbd has in force as status shows it:
// each service's policy and backends with their weights, and the chain.
func summarise(t *testing.T, tp *topo) string {
	t.Helper()
	st := tp.status(t)
	var lines []string
	for _, s := range st.Services {
		if s.Removed {
			continue
		}
		var bks []string
		for _, b := range s.Backends {
			if b.State != "removed" {
				bks = append(bks, fmt.Sprintf("%s@%d", b.Address, b.Weight))
			}
		}
		lines = append(lines, fmt.Sprintf("%s/%s %s health %s all-down %s %v", s.Vip, s.Protocol, s.Policy, describeCheckForTest(s.Health), s.AllDown, bks))
	}
	ms, err := tp.d.Client().ChainList(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		lines = append(lines, fmt.Sprintf("chain %s@%d %s %s %v", m.Name, m.Priority, m.Program, m.Sha256, m.ContinueOn))
	}
	return strings.Join(lines, "\n")
}

func describeCheckForTest(h *controlpb.HealthCheck) string {
	if h == nil {
		return "none"
	}
	return fmt.Sprintf("%s/%s/%s/%d/%d", h.Check, h.Interval.AsDuration(), h.Timeout.AsDuration(), h.Rise, h.Fall)
}

// liveMarks lists what status marks as set live.
func liveMarks(t *testing.T, tp *topo) []string {
	t.Helper()
	var out []string
	for _, s := range tp.status(t).Services {
		if s.Live {
			out = append(out, "service "+s.Vip)
		}
		for _, b := range s.Backends {
			if b.Live {
				out = append(out, "backend "+s.Vip+" "+b.Address)
			}
		}
	}
	ms, _ := tp.d.Client().ChainList(context.Background())
	for _, m := range ms {
		if m.Live {
			out = append(out, "chain "+m.Name)
		}
	}
	slices.Sort(out)
	return out
}

// TestLiveChanges adds a backend, changes a weight and removes a backend
// with xlbctl under steady traffic, with no failed request; then swaps the
// policy, adds a service and a DDoS filter to the chain, all live. A
// SIGHUP keeps every live change; a reload whose file changes one of the
// same items drops that one only. `xlbctl config` printed into a file
// reproduces the same state in a new xlbd, from which a service and the
// filter are then removed live. Refused changes change nothing, and every
// change is logged with what it changed and who asked.
func TestLiveChanges(t *testing.T) {
	ct := newConfigTopo(t, "native")
	pinPath := xlbtest.TempDir(t, "/sys/fs/bpf", "xlb-live-")
	filterObj := filepath.Join(t.TempDir(), "filter.o")
	copyFile(t, xdpFilterIP, filterObj)
	sockDir := t.TempDir()
	sock := filepath.Join(sockDir, "xlbd.sock")
	vip, vip81 := ct.vip.String(), fmt.Sprintf("%s:81", ct.lb.IP)
	a, b, c := addr(ct.ba, backendPort), addr(ct.bb, backendPort), addr(ct.bc, backendPort)
	file := func(aWeight int) string {
		return fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s@%d, %s]\n", pinPath, vip, a, aWeight, b)
	}
	ct.start(t, file(1), "--socket", sock)
	tp := ct.topo
	url := "http://" + vip + "/"

	t.Run("backend add, set-weight and remove under traffic", func(t *testing.T) {
		load := startLoad(clientsOf(tp.c1, tp.c2), []string{url}, 4)
		time.Sleep(500 * time.Millisecond)
		steps := [][]string{
			{"backend", "add", vip, c},
			{"backend", "set-weight", vip, a, "3"},
			{"backend", "remove", vip, b},
		}
		for _, args := range steps {
			out := tp.mustXlbctl(t, args...)
			t.Logf("xlbctl %s: %s", strings.Join(args, " "), strings.ReplaceAll(strings.TrimSpace(out), "\n", "; "))
			time.Sleep(400 * time.Millisecond)
		}
		load.check(t, "add, re-weight and remove under traffic")
		seen := tp.split(t, url, 200)
		if seen["backend-b"] != 0 || seen["backend-c"] == 0 || seen["backend-a"] < 2*seen["backend-c"] {
			t.Errorf("after the changes, connections by backend %v: want none to backend-b, backend-a about 3 times backend-c", seen)
		}
		t.Logf("after the changes (a@3, c@1, b removed): %v", seen)
		log := tp.d.Output()
		for _, want := range []string{
			`msg="control: change applied" request="backend add ` + c + `" uid=0`,
			`changes="[service ` + vip + `/tcp: backend ` + c + ` added with weight 1]"`,
			`changes="[service ` + vip + `/tcp: backend ` + a + ` weight 1 -> 3]"`,
			`changes="[service ` + vip + `/tcp: backend ` + b + ` removed]"`,
		} {
			if !strings.Contains(log, want) {
				t.Errorf("xlbd's log lacks %s", want)
			}
		}
	})

	t.Run("policy, service and chain, live", func(t *testing.T) {
		tp.mustXlbctl(t, "policy", "set", "hash", "--service", vip)
		tp.mustXlbctl(t, "service", "add", vip81, "--backend", b, "--backend", c+"@2", "--check", "tcp", "--check-interval", "500ms", "--policy", "least-conn")
		tp.mustXlbctl(t, "chain", "add", "filter", "--object", filterObj, "--program", "xdpfilt_alw_ip", "--priority", "10")
		denyClient2(t, filepath.Join(pinPath, "chain", "filter", "filter_ipv4"), tp.c2)
		if err := tp.reaches(tp.c2); err == nil {
			t.Error("client2 reached the VIP through the filter added live")
		}
		if bk, _, err := dialVIP(tp.c1, vip81, 3*time.Second); err != nil || (bk != "backend-b" && bk != "backend-c") {
			t.Errorf("service added live: %q, %v", bk, err)
		}
	})

	before := summarise(t, tp)
	marks := liveMarks(t, tp)
	wantMarks := []string{"backend " + vip + " " + a, "backend " + vip + " " + c, "backend " + vip81 + " " + b, "backend " + vip81 + " " + c,
		"chain filter", "service " + vip, "service " + vip81}
	if !slices.Equal(marks, wantMarks) {
		t.Errorf("status marks live %q, want %q", marks, wantMarks)
	}
	t.Logf("in force:\n%s", before)

	t.Run("a SIGHUP keeps the live changes", func(t *testing.T) {
		load := startLoad(clientsOf(tp.c1), []string{url}, 2)
		if err := tp.d.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for tp.status(t).GetLastReload() == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		load.check(t, "SIGHUP")
		if r := tp.status(t).GetLastReload(); r == nil || !r.Ok {
			t.Fatalf("reload: %v", r)
		}
		if after := summarise(t, tp); after != before {
			t.Errorf("after SIGHUP:\n%s\nwant\n%s", after, before)
		}
		if m := liveMarks(t, tp); !slices.Equal(m, wantMarks) {
			t.Errorf("after SIGHUP, live marks %q, want %q", m, wantMarks)
		}
		if err := tp.reaches(tp.c2); err == nil {
			t.Error("after SIGHUP, client2 reached the VIP: the filter added live is gone")
		}
	})

	t.Run("the file wins on the items it changes", func(t *testing.T) {
		ct.writeConfig(t, file(2))
		out := tp.mustXlbctl(t, "reload")
		if !strings.Contains(out, "reloaded: 2 services in force") ||
			!strings.Contains(out, "live change dropped, the file changes the same item: backend "+a+" of service "+vip+"/tcp: the file changes it") {
			t.Errorf("xlbctl reload said:\n%s", out)
		}
		want := strings.Replace(before, a+"@3", a+"@2", 1)
		if after := summarise(t, tp); after != want {
			t.Errorf("after a reload that changes backend-a's weight:\n%s\nwant\n%s", after, want)
		}
		if m := liveMarks(t, tp); slices.Contains(m, "backend "+vip+" "+a) || len(m) != len(wantMarks)-1 {
			t.Errorf("live marks %q after the file took backend-a back", m)
		}
		before = want
	})

	t.Run("refused changes change nothing", func(t *testing.T) {
		cfgBefore := tp.mustXlbctl(t, "config")
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"backend", "add", vip, addr(ct.lb, 8080)}, "is an address of this host"},
			{[]string{"backend", "add", vip, c}, "already exists"},
			{[]string{"backend", "remove", vip, b}, "not found"},
			{[]string{"backend", "drain", "10.199.0.99:80", a}, "service 10.199.0.99:80: not found"},
			{[]string{"service", "add", vip, "--backend", a}, "already exists"},
			{[]string{"service", "add", fmt.Sprintf("%s:82", ct.lb.IP), "--backend", a, "--check", "icmp"}, `health.check: "icmp" is not none, tcp or http`},
			{[]string{"policy", "set", "no-such-policy"}, "no-such-policy"},
			{[]string{"chain", "add", "filter", "--object", filterObj}, "chain member filter: already exists"},
		} {
			out, err := tp.xlbctl(t, tc.args...)
			if err == nil || !strings.Contains(out, tc.want) {
				t.Errorf("xlbctl %s: %v\n%s\nwant an error with %q", strings.Join(tc.args, " "), err, out, tc.want)
			}
		}
		if after := tp.mustXlbctl(t, "config"); after != cfgBefore {
			t.Errorf("refused changes changed the configuration:\n%s\nwas\n%s", after, cfgBefore)
		}
		if !strings.Contains(tp.d.Output(), `msg="control: change refused" request="backend add `+addr(ct.lb, 8080)) {
			t.Error("a refused change was not logged")
		}
	})

	t.Run("xlbctl config round-trips", func(t *testing.T) {
		printed := tp.mustXlbctl(t, "config")
		saved := filepath.Join(t.TempDir(), "saved.yaml")
		if err := os.WriteFile(saved, []byte(printed), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Logf("xlbctl config:\n%s", printed)
		if err := tp.d.Stop(); err != nil {
			t.Fatalf("stop xlbd: %v", err)
		}
		tp.d = xlbtest.Start(t, ct.lb.NS, "--config", saved, "--log-level", "debug", "--socket", sock)
		if after := summarise(t, tp); after != before {
			t.Errorf("a new xlbd from the printed configuration:\n%s\nwant\n%s", after, before)
		}
		if again := tp.mustXlbctl(t, "config"); again != printed {
			t.Errorf("the new xlbd prints\n%s\nwant\n%s", again, printed)
		}
		if m := liveMarks(t, tp); len(m) != 0 {
			t.Errorf("a new xlbd from a file marks %q live", m)
		}
		if seen := tp.split(t, url, 40); seen["backend-b"] != 0 || len(seen) != 2 {
			t.Errorf("the new xlbd's connections by backend: %v", seen)
		}

		// The new xlbd lives as long as this subtest: remove the service
		// and the filter from it, live.
		out := tp.mustXlbctl(t, "service", "remove", vip81)
		if !strings.Contains(out, "service "+vip81+"/tcp removed") {
			t.Errorf("xlbctl service remove said:\n%s", out)
		}
		if _, _, err := dialVIP(tp.c1, vip81, 3*time.Second); err == nil {
			t.Error("a connection to the removed service succeeded")
		}
		denyClient2(t, filepath.Join(pinPath, "chain", "filter", "filter_ipv4"), tp.c2)
		if err := tp.reaches(tp.c2); err == nil {
			t.Error("client2 reached the VIP through the filter of the saved configuration")
		}
		tp.mustXlbctl(t, "chain", "remove", "filter")
		if err := tp.reaches(tp.c2); err != nil {
			t.Errorf("client2 after the filter was removed: %v", err)
		}
		if m := liveMarks(t, tp); len(m) != 0 {
			t.Errorf("live marks after removing items: %q, want none (removed items leave status)", m)
		}
		printed = tp.mustXlbctl(t, "config")
		if strings.Contains(printed, vip81) || strings.Contains(printed, "name: filter") {
			t.Errorf("xlbctl config after the removals still has them:\n%s", printed)
		}
	})
}

// TestControlAccess: the control socket is root's, mode 0600, and a user
// other than root is refused by it; with socket-group, the socket is that
// group's, mode 0660, and a member of the group may use it, its changes
// logged with its uid.
func TestControlAccess(t *testing.T) {
	ct := newConfigTopo(t, "native")
	dir := xlbtest.TempDir(t, "", "xlbd-access-")
	// Every directory on the way, and xlbctl, must be open to the other
	// users: the socket alone decides.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "xlbd.sock")
	a := addr(ct.ba, backendPort)
	yaml := fmt.Sprintf("iface: eth0\nservices:\n  - vip: %s\n    backends: [%s, %s]\n", ct.vip, a, addr(ct.bb, backendPort))
	ct.start(t, yaml, "--socket", sock)
	xlbctl := filepath.Join(dir, "xlbctl")
	copyFile(t, filepath.Join(ct.d.Dir, "xlbctl"), xlbctl)
	if err := os.Chmod(xlbctl, 0o755); err != nil {
		t.Fatal(err)
	}
	as := func(uid, gid uint32, args ...string) (string, error) {
		cmd := exec.Command(xlbctl, append([]string{"--socket", sock}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	socketIs := func(mode os.FileMode, gid uint32) {
		t.Helper()
		fi, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != mode || st.Uid != 0 || st.Gid != gid {
			t.Errorf("socket %s: mode %s, owner %d:%d; want socket %s, 0:%d", sock, fi.Mode(), st.Uid, st.Gid, mode, gid)
		}
	}

	socketIs(0o600, 0)
	out, err := as(65534, 65534, "status")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out, "permission denied on "+sock) {
		t.Errorf("xlbctl status as uid 65534: %v\n%s\nwant exit status 1, permission denied", err, out)
	}
	if out, err := as(65534, 65534, "backend", "drain", ct.vip.String(), a); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("xlbctl backend drain as uid 65534: %v\n%s", err, out)
	}
	if st := svcBackend(ct.status(t), ct.vip.String(), a); st.Weight != 1 {
		t.Errorf("a refused user changed backend %s: %v", a, st)
	}
	if out, err := as(0, 0, "status"); err != nil {
		t.Errorf("xlbctl status as root: %v\n%s", err, out)
	}

	// With socket-group: the group's members, and only they.
	if err := ct.d.Stop(); err != nil {
		t.Fatal(err)
	}
	ct.d = xlbtest.Start(t, ct.lb.NS, "--config", ct.file, "--socket", sock, "--socket-group", "65534")
	socketIs(0o660, 65534)
	if out, err := as(65534, 65534, "status"); err != nil || !strings.Contains(out, "service "+ct.vip.String()) {
		t.Errorf("xlbctl status as a member of socket-group: %v\n%s", err, out)
	}
	if out, err := as(65534, 65534, "backend", "drain", ct.vip.String(), a); err != nil {
		t.Errorf("xlbctl backend drain as a member of socket-group: %v\n%s", err, out)
	}
	if !strings.Contains(ct.d.Output(), `msg="control: change applied" request="backend drain `+a+` 0" uid=65534`) {
		t.Errorf("the change was not logged with its uid:\n%s", ct.d.Output())
	}
	if out, err := as(65533, 65533, "status"); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("xlbctl status as a user outside socket-group: %v\n%s", err, out)
	}
}
