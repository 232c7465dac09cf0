package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// keepalived runs keepalived's VRRP in host h's namespace, in the
// foreground, with its configuration and pid files in a directory of the
// test's. Cleanup stops it by its pid.
type keepalived struct {
	cmd  *exec.Cmd
	dir  string
	done chan struct{}
}

func startKeepalived(t *testing.T, h *testnet.Host, vip netip.Addr, priority int) *keepalived {
	t.Helper()
	if _, err := exec.LookPath("keepalived"); err != nil {
		t.Fatalf("keepalived (package keepalived): %v", err)
	}
	k := &keepalived{dir: t.TempDir(), done: make(chan struct{})}
	conf := fmt.Sprintf(`global_defs {
  router_id %s
}
vrrp_instance xlb {
  state BACKUP
  interface eth0
  virtual_router_id 51
  priority %d
  advert_int 1
  virtual_ipaddress {
    %s/32 dev eth0
  }
}
`, h.Name, priority, vip)
	file := filepath.Join(k.dir, "keepalived.conf")
	if err := os.WriteFile(file, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	k.cmd = exec.Command("nsenter", "--net="+h.NS.Path, "--", "keepalived", "--dont-fork", "--log-console", "--log-detail",
		"--vrrp", "--use-file", file, "--pid", filepath.Join(k.dir, "keepalived.pid"), "--vrrp_pid", filepath.Join(k.dir, "vrrp.pid"))
	w := &xlbtest.SyncBuffer{}
	k.cmd.Stdout, k.cmd.Stderr = w, w
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("start keepalived: %v", err)
	}
	go func() {
		k.cmd.Wait()
		close(k.done)
	}()
	t.Cleanup(func() {
		k.stop()
		if t.Failed() {
			t.Logf("keepalived on %s:\n%s", h.Name, w.String())
		}
	})
	return k
}

// stop ends keepalived with SIGTERM (it then gives up the VIP at once),
// and its VRRP child by pid if it outlived it.
func (k *keepalived) stop() {
	child := 0
	if b, err := os.ReadFile(filepath.Join(k.dir, "vrrp.pid")); err == nil {
		child, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	xlbtest.Terminate(k.cmd.Process, k.done)
	if child > 0 && !xlbtest.ProcessGone(child) {
		_ = syscall.Kill(child, syscall.SIGKILL)
	}
}

// holds tells whether host h has address a.
func holds(t *testing.T, h *testnet.Host, a netip.Addr) bool {
	t.Helper()
	return slices.Contains(lbState(t, h).Addrs, a.String()+"/32")
}

// waitHolds waits until host h has (or has not) address a.
func waitHolds(t *testing.T, h *testnet.Host, a netip.Addr, want bool, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for holds(t, h, a) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %s: %v after %v, want %v", h.Name, a, !want, within, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Now()
}

// TestKeepalivedFailover runs two xlb nodes with manage-vip: false and
// keepalived's VRRP owning the VIP: new connections go to the master's
// xlb; when the master's keepalived stops, the VIP moves to the standby
// and new connections go to its xlb, succeeding within 5 s of the
// failover. The long-lived connections ran through the master's xlb,
// whose connection table the standby does not have: they are counted, not
// expected to survive.
func TestKeepalivedFailover(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{
		Hosts:         []string{"client1", "client2", "lb1", "lb2", "backend-a", "backend-b"},
		NativePeerXDP: true,
	})
	c1, c2, lb1, lb2 := lan.Host("client1"), lan.Host("client2"), lan.Host("lb1"), lan.Host("lb2")
	ba, bb := lan.Host("backend-a"), lan.Host("backend-b")
	vip := lan.AddrInSubnet(100)
	for _, h := range []*testnet.Host{ba, bb} {
		h.NS.ServeHTTP(t, addr(h, backendPort), h.Name)
		serveEcho(t, h, streamPort)
	}
	yaml := fmt.Sprintf("iface: eth0\nmanage-vip: false\nservices:\n  - vip: %s:80\n    backends: [%s, %s]\n  - vip: %s:%d\n    backends: [%s, %s]\n",
		vip, addr(ba, backendPort), addr(bb, backendPort), vip, streamPort, addr(ba, streamPort), addr(bb, streamPort))
	daemons := map[string]*xlbtest.Daemon{}
	for _, h := range []*testnet.Host{lb1, lb2} {
		file := filepath.Join(t.TempDir(), "xlbd.yaml")
		if err := os.WriteFile(file, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		daemons[h.Name] = xlbtest.Start(t, h.NS, "--config", file, "--log-level", "debug")
		if holds(t, h, vip) {
			t.Fatalf("xlbd on %s added the VIP with manage-vip: false", h.Name)
		}
		st, err := daemons[h.Name].Client().Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Services) != 2 || st.GetServices()[0].GetManageVip() {
			t.Fatalf("status of %s: services %+v, want manage-vip false", h.Name, st.Services)
		}
	}
	master := startKeepalived(t, lb1, vip, 150)
	waitHolds(t, lb1, vip, true, 10*time.Second)
	startKeepalived(t, lb2, vip, 100)
	time.Sleep(3 * time.Second) // lb2 hears lb1's adverts and stays backup
	if holds(t, lb2, vip) {
		t.Fatal("both nodes hold the VIP")
	}

	tr := startTraffic(t, []*testnet.Host{c1, c2}, vip)
	time.Sleep(2 * time.Second)
	for _, a := range tr.attempts() {
		if a.err != nil {
			t.Fatalf("before the failover: %v", a.err)
		}
	}
	newOn := func(name string) uint64 {
		st, err := daemons[name].Client().Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st.Counters["new_conn"]
	}
	if newOn("lb1") == 0 || newOn("lb2") != 0 {
		t.Fatalf("before the failover: new connections lb1 %d, lb2 %d; want all on lb1", newOn("lb1"), newOn("lb2"))
	}

	master.stop()
	failover := time.Now()
	moved := waitHolds(t, lb2, vip, true, 10*time.Second)
	t.Logf("the VIP moved to lb2 %v after lb1's keepalived stopped", moved.Sub(failover))
	if holds(t, lb1, vip) {
		t.Errorf("lb1 still holds the VIP")
	}
	time.Sleep(8 * time.Second)
	tr.stop()
	var firstOK time.Time
	late, lateFailed, early, earlyFailed := 0, 0, 0, 0
	for _, a := range tr.attempts() {
		if a.start.Before(failover) {
			continue
		}
		if a.start.Before(failover.Add(5 * time.Second)) {
			early++
			if a.err != nil {
				earlyFailed++
			}
		}
		if a.err == nil && (firstOK.IsZero() || a.start.Before(firstOK)) {
			firstOK = a.start
		}
		if a.start.After(failover.Add(5 * time.Second)) {
			late++
			if a.err != nil {
				lateFailed++
				t.Errorf("new connection %v after the failover failed: %v", a.start.Sub(failover), a.err)
			}
		}
	}
	t.Logf("first new connection served %v after the failover; failed: %d of %d started within 5 s of it, %d of %d started later",
		firstOK.Sub(failover), earlyFailed, early, lateFailed, late)
	if firstOK.IsZero() || firstOK.Sub(failover) > 5*time.Second {
		t.Errorf("no new connection served within 5 s of the failover (first at %v)", firstOK.Sub(failover))
	}
	if late < 2*newPerSec {
		t.Errorf("only %d new connections after the first 5 s", late)
	}
	if newOn("lb2") == 0 {
		t.Errorf("lb2's xlb made no connection after the failover")
	}
	t.Logf("long-lived connections through lb1 broken by the failover: %d of %d (the standby has no copy of lb1's connection table)",
		len(tr.broken()), streamConns)
	for _, h := range []*testnet.Host{lb1, lb2} {
		if done, err := daemons[h.Name].Exited(); done {
			t.Errorf("xlbd on %s exited: %v", h.Name, err)
		}
	}
}
