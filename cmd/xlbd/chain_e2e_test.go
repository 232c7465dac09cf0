package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// xdpFilterIP is the program `xdp-filter load --policy allow` loads for
// IP rules, as the xdp-tools package installs it, unmodified, with
// XDP_RUN_CONFIG priority 10: it passes everything but what its maps
// match. (xdpfilt_dny_ip.o is the --policy deny flavour: it drops
// everything its maps do not match.)
const xdpFilterIP = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_ip.o"

// xdp-filter's map value flag for "match the source address"
// (MAP_FLAG_SRC in xdp-filter's common_kern_user.h).
const xdpFilterSrc = 1

// TestChainEndToEnd runs xlb behind xdp-filter and in front of an ICMP
// counter, and changes the chain with xlbctl while connections flow.
func TestChainEndToEnd(t *testing.T) {
	testnet.RequirePrivileged(t)
	if _, err := os.Stat(xdpFilterIP); err != nil {
		t.Fatalf("xdp-filter's program (package xdp-tools): %v", err)
	}
	counterObj := filepath.Join(t.TempDir(), "chain_icmp_count.o")
	if out, err := exec.Command("clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
		"-I/usr/include/x86_64-linux-gnu", "-c", "testdata/chain_icmp_count.c", "-o", counterObj).CombinedOutput(); err != nil {
		t.Fatalf("compile icmp counter: %v: %s", err, out)
	}
	pinPath := xlbtest.TempDir(t, "/sys/fs/bpf", "xlb-chain-e2e-")
	// Registered before the daemon starts, so it runs after it stopped
	// (and before the directory is removed).
	t.Cleanup(func() {
		if left := xlbtest.LeftPins(pinPath); left != nil {
			t.Errorf("pins left after xlbd exited: %v", left)
		}
	})
	cfgFile := filepath.Join(t.TempDir(), "xlbd.yaml")
	yaml := "chain:\n  - name: filter\n    object: " + xdpFilterIP + "\n    program: xdpfilt_alw_ip\n"
	if err := os.WriteFile(cfgFile, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	tp := newTopo(t, "native", "--config", cfgFile, "--pin-path", pinPath)
	url := "http://" + tp.vip.String() + "/"
	c1 := tp.c1.NS.HTTPClient(false)

	list := func(t *testing.T) string {
		t.Helper()
		out, err := tp.xlbctl(t, "chain", "list")
		if err != nil {
			t.Fatalf("xlbctl chain list: %v: %s", err, out)
		}
		return out
	}
	reaches := tp.reaches

	t.Run("filter in front of xlb drops one client", func(t *testing.T) {
		out := list(t)
		t.Logf("xlbctl chain list:\n%s", out)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 3 || !strings.HasPrefix(lines[1], "10 ") || !strings.Contains(lines[1], "filter") ||
			!strings.HasPrefix(lines[2], "50 ") || !strings.Contains(lines[2], "xlb") ||
			!strings.Contains(lines[1], filepath.Join(pinPath, "chain", "filter")) || !strings.Contains(lines[1], "filter_ipv4") {
			t.Fatalf("chain list: want filter at its XDP_RUN_CONFIG priority 10 with its pinned maps, then xlb at 50")
		}
		if err := reaches(tp.c2); err != nil {
			t.Fatalf("client2 before it is denied: %v", err)
		}
		denyClient2(t, filepath.Join(pinPath, "chain", "filter", "filter_ipv4"), tp.c2)
		if err := reaches(tp.c2); err == nil {
			t.Fatal("client2 reached the VIP through a filter that denies it")
		}
		for i := range 20 {
			if _, err := testnet.Get(t.Context(), c1, url); err != nil {
				t.Fatalf("client1 request %d: %v", i, err)
			}
		}
	})

	counterPin := filepath.Join(pinPath, "chain", "icmp", "icmp_count")
	t.Run("member after xlb sees what xlb passes", func(t *testing.T) {
		if out, err := tp.xlbctl(t, "chain", "add", "icmp", "--object", counterObj); err != nil {
			t.Fatalf("xlbctl chain add: %v: %s", err, out)
		}
		out := list(t)
		t.Logf("xlbctl chain list:\n%s", out)
		if i, j := strings.Index(out, "xlb_dispatch"), strings.Index(out, "icmp_counter"); i < 0 || j < i {
			t.Fatalf("icmp counter (priority 60) not after xlb")
		}
		m, err := ebpf.LoadPinnedMap(counterPin, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		count := func() uint64 {
			var n uint64
			if err := m.Lookup(uint32(0), &n); err != nil {
				t.Fatal(err)
			}
			return n
		}
		before := count()
		for i := range 20 {
			if _, err := testnet.Get(t.Context(), c1, url); err != nil {
				t.Fatalf("client1 request %d: %v", i, err)
			}
		}
		if n := count(); n != before {
			t.Errorf("icmp counter moved by %d on load-balanced TCP traffic", n-before)
		}
		if err := tp.c1.NS.Do(func() error { return sendPings(tp.lb.IP, 3) }); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
		if n := count() - before; n != 3 {
			t.Errorf("icmp counter saw %d packets after 3 echo requests to the lb, want 3", n)
		}
	})

	t.Run("add and remove while connections flow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var ok, failed atomic.Int64
		var firstErr atomic.Value
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := tp.c1.NS.HTTPClient(w%2 == 0)
				for ctx.Err() == nil {
					if _, err := testnet.Get(t.Context(), c, url); err != nil {
						if ctx.Err() != nil {
							return
						}
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err)
						continue
					}
					ok.Add(1)
				}
			}()
		}
		time.Sleep(300 * time.Millisecond)
		steps := [][]string{
			{"chain", "remove", "icmp"},
			{"chain", "add", "icmp2", "--object", counterObj, "--priority", "5"},
			{"chain", "add", "icmp", "--object", counterObj},
			{"chain", "remove", "icmp2"},
			{"chain", "remove", "icmp"},
			{"chain", "add", "icmp", "--object", counterObj, "--priority", "70", "--continue-on", "pass,drop"},
		}
		for _, s := range steps {
			if out, err := tp.xlbctl(t, s...); err != nil {
				t.Errorf("xlbctl %v: %v: %s", s, err, out)
			}
			time.Sleep(400 * time.Millisecond)
		}
		cancel()
		wg.Wait()
		t.Logf("%d requests during %d chain changes, %d failed", ok.Load(), len(steps), failed.Load())
		if failed.Load() > 0 || ok.Load() < 100 {
			t.Errorf("%d requests failed (first: %v), %d succeeded", failed.Load(), firstErr.Load(), ok.Load())
		}
		if _, err := os.Stat(filepath.Join(pinPath, "chain", "icmp2")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pins of a removed member: %v, want gone", err)
		}
	})

	t.Run("a bad member is refused and the chain stays", func(t *testing.T) {
		before := list(t)
		notELF := filepath.Join(t.TempDir(), "short.o")
		if err := os.WriteFile(notELF, []byte("hi\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"chain", "add", "bad", "--object", counterObj, "--continue-on", ""}, "continue-on: empty"},
			{[]string{"chain", "add", "bad", "--object", notELF}, "not an ELF object"},
		} {
			out, err := tp.xlbctl(t, tc.args...)
			if err == nil || !strings.Contains(out, tc.want) {
				t.Errorf("xlbctl %v: %v, %q; want refused with %q", tc.args, err, out, tc.want)
			}
			t.Logf("xlbctl %v: %s", tc.args, strings.TrimSpace(out))
		}
		for _, args := range [][]string{
			{"chain", "add", "bad", "--object", counterObj, "--program", "missing"},
			{"chain", "add", "bad", "--object", filepath.Join(t.TempDir(), "none.o")},
			{"chain", "add", "xlb", "--object", counterObj},
			{"chain", "add", "icmp", "--object", counterObj},
			{"chain", "remove", "xlb"},
			{"chain", "remove", "nobody"},
		} {
			out, err := tp.xlbctl(t, args...)
			if err == nil {
				t.Errorf("xlbctl %v accepted: %s", args, out)
			}
			t.Logf("xlbctl %v: %s", args, strings.TrimSpace(out))
		}
		if after := list(t); after != before {
			t.Errorf("chain changed by refused requests:\n%s\nwas\n%s", after, before)
		}
		if _, err := testnet.Get(t.Context(), c1, url); err != nil {
			t.Errorf("client1 after refusals: %v", err)
		}
	})

	t.Run("removing the filter lets the client in", func(t *testing.T) {
		if out, err := tp.xlbctl(t, "chain", "remove", "filter"); err != nil {
			t.Fatalf("xlbctl chain remove: %v: %s", err, out)
		}
		if err := reaches(tp.c2); err != nil {
			t.Errorf("client2 after the filter left: %v", err)
		}
		if _, err := os.Stat(filepath.Join(pinPath, "chain", "filter")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pins of the removed filter: %v, want gone", err)
		}
	})
}

// sendPings sends n ICMP echo requests to dst from a raw socket (the test
// machines have no ping binary).
func sendPings(dst netip.Addr, n int) error {
	c, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return fmt.Errorf("open icmp socket: %w", err)
	}
	defer c.Close()
	for seq := range n {
		msg := []byte{8, 0, 0, 0, 0x78, 0x6c, 0, byte(seq), 'x', 'l', 'b', '!'}
		var sum uint32
		for i := 0; i < len(msg); i += 2 {
			sum += uint32(msg[i])<<8 | uint32(msg[i+1])
		}
		sum = (sum >> 16) + (sum & 0xffff)
		sum += sum >> 16
		binary.BigEndian.PutUint16(msg[2:], ^uint16(sum))
		if _, err := c.WriteTo(msg, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
			return fmt.Errorf("send echo request: %w", err)
		}
	}
	return nil
}

// reaches makes one request from h to the VIP on a new connection.
func (tp *topo) reaches(h *testnet.Host) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := h.NS.Dial(ctx, "tcp", tp.vip.String())
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = request(conn)
	return err
}

// TestChainUnderIPNetnsExec starts xlbd with a chain member under `ip
// netns exec`, which remounts /sys without bpffs: xlbd refuses, before it
// touches anything, and says why and what to do.
func TestChainUnderIPNetnsExec(t *testing.T) {
	ct := newConfigTopo(t, "generic")
	dir, err := xlbtest.Build()
	if err != nil {
		t.Fatal(err)
	}
	ct.writeConfig(t, fmt.Sprintf("iface: eth0\nxdp-mode: generic\nservices:\n  - vip: %s\n    backends: [%s]\nchain:\n  - {name: filter, object: %s, program: xdpfilt_alw_ip}\n",
		ct.vip, addr(ct.ba, backendPort), xdpFilterIP))
	before := lbState(t, ct.lb)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ct.lb.NS.Name, filepath.Join(dir, "xlbd"),
		"--config", ct.file, "--socket", filepath.Join(t.TempDir(), "xlbd.sock")).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("xlbd under ip netns exec: %v, want exit status 2\n%s", err, out)
	}
	t.Logf("xlbd under ip netns exec: %s", strings.TrimSpace(string(out)))
	for _, want := range []string{"pin-path: /sys/fs/bpf/xlb", "not on a bpffs", "ip netns exec", "nsenter --net=/run/netns/NAME"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if after := lbState(t, ct.lb); !after.equal(before) {
		t.Errorf("lb host changed:\n  before %v\n  after  %v", before, after)
	}
}
