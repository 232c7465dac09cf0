package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/xlbtest"
)

// compileBPF compiles a BPF C source into dir and returns the object.
func compileBPF(t *testing.T, src, dir string) string {
	t.Helper()
	out := filepath.Join(dir, strings.TrimSuffix(filepath.Base(src), ".c")+".o")
	if b, err := exec.Command("clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
		"-I/usr/include/x86_64-linux-gnu", "-c", src, "-o", out).CombinedOutput(); err != nil {
		t.Fatalf("compile %s: %v: %s", src, err, b)
	}
	return out
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// running is what a reload may change, as xlbctl shows it: services with
// their policies and backends, the policy plugins, and the chain.
func running(t *testing.T, ct *configTopo) string {
	t.Helper()
	ctx := context.Background()
	st, err := ct.d.Client().Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, s := range st.Services {
		fmt.Fprintf(&b, "service %s policy %s backends %v\n", s.Vip, s.Policy, backendsOf(st, s.Vip))
	}
	var plugins []string
	for _, p := range st.Policies {
		plugins = append(plugins, fmt.Sprintf("%s(restarts %d)", p.Name, p.Restarts))
	}
	fmt.Fprintf(&b, "plugins %v\n", plugins)
	ms, err := ct.d.Client().ChainList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		fmt.Fprintf(&b, "chain %s@%d %s %s %v\n", m.Name, m.Priority, m.Program, m.Sha256, m.Maps)
	}
	return b.String()
}

// TestReloadTransactional sends SIGHUP with configurations that fail
// part-way, while requests flow: a new service whose policy cannot start,
// and a chain member whose object was replaced by one the verifier
// refuses. Each is refused at ERROR, without "reloaded", and leaves the
// services, backends, policies, chain, pins, host addresses and traffic
// exactly as they were. A good reload afterwards applies everything.
func TestReloadTransactional(t *testing.T) {
	ct := newConfigTopo(t, "native")
	pinPath := xlbtest.TempDir(t, "/sys/fs/bpf", "xlb-reload-tx-")
	dir := t.TempDir()
	filterObj := filepath.Join(dir, "filter.o")
	copyFile(t, xdpFilterIP, filterObj)
	broken := compileBPF(t, "testdata/chain_broken.c", t.TempDir())
	counter := compileBPF(t, "testdata/chain_icmp_count.c", t.TempDir())

	vip80, vip8082 := ct.vip.String(), fmt.Sprintf("%s:8082", ct.lb.IP)
	newVIP := fmt.Sprintf("%s:8081", ct.lan.AddrInSubnet(130))
	a, b, c := addr(ct.ba, backendPort), addr(ct.bb, backendPort), addr(ct.bc, backendPort)
	filter := func(extra string) string {
		return fmt.Sprintf("  - {name: filter, object: %s, program: xdpfilt_alw_ip%s}\n", filterObj, extra)
	}
	good := fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - {vip: %s, policy: random, backends: [%s, %s]}\n  - {vip: %s, backends: [%s]}\nchain:\n%s",
		pinPath, vip80, a, b, vip8082, c, filter(""))
	ct.start(t, good)

	filterMap := filepath.Join(pinPath, "chain", "filter", "filter_ipv4")
	denyClient2(t, filterMap, ct.c2)
	mapBefore := xlbtest.PinnedMapID(t, filterMap)
	if err := ct.topo.reaches(ct.c2); err == nil {
		t.Fatal("client2 reached the VIP through a filter that denies it")
	}
	before, host := running(t, ct), lbState(t, ct.lb)
	t.Logf("running:\n%s", before)

	// reload sends SIGHUP and waits for its outcome in the log.
	reload := func(t *testing.T, yaml string) (refused bool, msg string) {
		t.Helper()
		ct.writeConfig(t, yaml)
		out := ct.d.Output()
		nRefused, nReloaded := strings.Count(out, "reload refused"), strings.Count(out, "msg=reloaded")
		if err := ct.d.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			out = ct.d.Output()
			r, ok := strings.Count(out, "reload refused"), strings.Count(out, "msg=reloaded")
			switch {
			case r > nRefused && ok == nReloaded:
				lines := strings.Split(out, "\n")
				for i := len(lines) - 1; i >= 0; i-- {
					if strings.Contains(lines[i], "reload refused") {
						return true, lines[i]
					}
				}
			case ok > nReloaded && r == nRefused:
				return false, ""
			case r > nRefused || ok > nReloaded:
				t.Fatalf("one SIGHUP logged both refused and reloaded:\n%s", out)
			}
			if time.Now().After(deadline) {
				t.Fatalf("no reload outcome logged:\n%s", out)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	unchanged := func(t *testing.T) {
		t.Helper()
		// Give a policy left behind time to be relaunched, as it was.
		time.Sleep(1500 * time.Millisecond)
		if got := running(t, ct); got != before {
			t.Errorf("after a refused reload:\n%s\nwant, as before:\n%s", got, before)
		}
		if got := lbState(t, ct.lb); !got.equal(host) {
			t.Errorf("lb host changed:\n  before %v\n  after  %v", host, got)
		}
		if id := xlbtest.PinnedMapID(t, filterMap); id != mapBefore {
			t.Errorf("filter's block list is map %d, was %d", id, mapBefore)
		}
		if err := ct.topo.reaches(ct.c2); err == nil {
			t.Error("client2 got through the filter after a refused reload")
		}
		if _, err := os.Stat(filepath.Join(pinPath, "chain", "icmp")); !os.IsNotExist(err) {
			t.Errorf("pins of a member the refused reload would have added: %v", err)
		}
	}
	l := startLoad([]*http.Client{ct.c1.NS.HTTPClient(false)}, []string{"http://" + vip80 + "/", "http://" + vip8082 + "/"}, 4)

	t.Run("a new service whose policy cannot start", func(t *testing.T) {
		// /bin/true passes the checks (an executable) but is no plugin.
		bad := fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - {vip: %s, policy: hash, backends: [%s, %s]}\n  - {vip: %s, policy: /bin/true, backends: [%s]}\nchain:\n%s  - {name: icmp, object: %s}\n",
			pinPath, vip80, a, c, newVIP, b, filter(""), counter)
		refused, msg := reload(t, bad)
		if !refused {
			t.Fatal("reload with a policy that cannot start was applied")
		}
		t.Logf("%s", msg)
		for _, want := range []string{"level=ERROR", newVIP, "/bin/true"} {
			if !strings.Contains(msg, want) {
				t.Errorf("log line lacks %q", want)
			}
		}
		if r := ct.topo.status(t).LastReload; r == nil || r.Ok || !strings.Contains(r.Error, newVIP) {
			t.Errorf("status's last reload: %+v, want failed naming %s", r, newVIP)
		}
		out, err := ct.topo.xlbctl(t, "status")
		if err != nil || !strings.Contains(out, "last reload") || !strings.Contains(out, ": failed: prepare services: service "+newVIP) {
			t.Errorf("xlbctl status: %v\n%s", err, out)
		}
		unchanged(t)
	})

	t.Run("a chain member replaced by an object the verifier refuses", func(t *testing.T) {
		copyFile(t, broken, filterObj)
		defer copyFile(t, xdpFilterIP, filterObj)
		bad := fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - {vip: %s, policy: random, backends: [%s, %s]}\nchain:\n%s  - {name: icmp, object: %s}\n",
			pinPath, vip80, a, c, filter(""), counter)
		refused, msg := reload(t, bad)
		if !refused {
			t.Fatal("reload with a broken chain member was applied")
		}
		t.Logf("%s", msg)
		for _, want := range []string{"level=ERROR", "chain member filter", "refused by the verifier"} {
			if !strings.Contains(msg, want) {
				t.Errorf("log line lacks %q", want)
			}
		}
		unchanged(t)
	})

	ok, fail, first := l.stop()
	t.Logf("%d requests during the refused reloads, %d failed", ok, fail)
	if fail > 0 || ok < 100 {
		t.Errorf("%d requests failed (first: %v), %d succeeded", fail, first, ok)
	}

	l = startLoad([]*http.Client{ct.c1.NS.HTTPClient(false)}, []string{"http://" + vip80 + "/"}, 4)
	t.Run("a good reload applies everything", func(t *testing.T) {
		next := fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - {vip: %s, policy: hash, backends: [%s, %s]}\nchain:\n%s",
			pinPath, vip80, a, c, filter(", priority: 20"))
		if refused, msg := reload(t, next); refused {
			t.Fatalf("good reload refused: %s", msg)
		}
		st, err := ct.d.Client().Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if r := st.LastReload; r == nil || !r.Ok || r.Error != "" {
			t.Errorf("status's last reload: %+v, want applied", r)
		}
		want := []string{a, c}
		slices.Sort(want)
		if len(st.Services) != 1 || st.Services[0].Policy != "hash" || !slices.Equal(backendsOf(st, vip80), want) {
			t.Errorf("services after the reload: %+v", st.Services)
		}
		if len(st.Policies) != 1 || st.Policies[0].Name != "hash" || st.Policies[0].Pid == 0 {
			t.Errorf("plugins after the reload: %+v", st.Policies)
		}
		ms, err := ct.d.Client().ChainList(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 2 || ms[0].Name != "filter" || ms[0].Priority != 20 {
			t.Errorf("chain after the reload: %+v", ms)
		}
		if id := xlbtest.PinnedMapID(t, filterMap); id != mapBefore {
			t.Errorf("filter's block list is map %d after a priority change, was %d", id, mapBefore)
		}
		if err := ct.topo.reaches(ct.c2); err == nil {
			t.Error("client2 got through the filter after its priority changed")
		}
	})
	ok, fail, first = l.stop()
	t.Logf("%d requests during the good reload, %d failed", ok, fail)
	if fail > 0 || ok < 10 {
		t.Errorf("%d requests failed (first: %v), %d succeeded", fail, first, ok)
	}
}
