package neigh

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"

	"github.com/xlb-project/xlb/internal/testnet"
)

// kernelEntry reads the kernel's neighbour entry of ip on the host's eth0.
func kernelEntry(t *testing.T, nl *netlink.Handle, h *testnet.Host, ip netip.Addr) (netlink.Neigh, bool) {
	t.Helper()
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neighs, err := nl.NeighList(h.Index, fam)
	if err != nil {
		t.Fatalf("list neighbours: %v", err)
	}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
			return n, true
		}
	}
	return netlink.Neigh{}, false
}

// waitUntil polls cond every 20ms for up to limit and returns how long it
// took; it fails the test if cond never held.
func waitUntil(t *testing.T, what string, limit time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %s", what, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// newKeeper makes a Keeper in host lb's namespace, logging at debug
// level, and a netlink handle there to read the kernel's entries with;
// the test's cleanup closes them. onChange may be nil.
func newKeeper(t *testing.T, lb *testnet.Host, onChange func()) (*Keeper, *netlink.Handle) {
	t.Helper()
	ns, err := netns.GetFromPath(lb.NS.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	k, err := New(Options{
		NetNS:    ns,
		OnChange: onChange,
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k, nl
}

// runKeeper runs k until the test ends, and fails the test if Run fails.
func runKeeper(t *testing.T, k *Keeper) {
	ctx, cancel := context.WithCancel(context.Background())
	var g errgroup.Group
	g.Go(func() error { return k.Run(ctx) })
	t.Cleanup(func() {
		cancel()
		if err := g.Wait(); err != nil {
			t.Error(err)
		}
	})
}

// TestKeeper runs a Keeper in a load balancer's namespace on a LAN and
// re-creates, removes and brings back a backend, with the default probe
// interval and misses.
func TestKeeper(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"lb", "backend", "static"}})
	lb, be, st := lan.Host("lb"), lan.Host("backend"), lan.Host("static")
	var changes atomic.Int32
	k, nl := newKeeper(t, lb, func() { changes.Add(1) })
	// A static entry with a made-up MAC: the Keeper must leave it alone.
	fake := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x42}
	if err := nl.NeighSet(&netlink.Neigh{LinkIndex: lb.Index, Family: netlink.FAMILY_V4, IP: st.IP.AsSlice(),
		HardwareAddr: fake, State: netlink.NUD_PERMANENT}); err != nil {
		t.Fatal(err)
	}
	noRoute := netip.MustParseAddr("192.0.2.1")
	k.SetTargets([]netip.Addr{be.IP, st.IP, noRoute})
	runKeeper(t, k)

	status := func(a netip.Addr) Status {
		s, ok := k.Status(a)
		if !ok {
			t.Fatalf("no status for %s", a)
		}
		return s
	}
	entryIs := func(mac net.HardwareAddr) func() bool {
		return func() bool {
			e, ok := kernelEntry(t, nl, lb, be.IP)
			return ok && e.State&nudValid != 0 && slices.Equal(e.HardwareAddr, mac) && slices.Equal(status(be.IP).MAC, mac)
		}
	}

	took := waitUntil(t, "backend resolved", 2*time.Second, entryIs(be.MAC))
	t.Logf("backend resolved in %s: %s", took, status(be.IP))
	if s := status(be.IP); !s.Reachable || s.NextHop != be.IP || s.Iface != "eth0" {
		t.Fatalf("backend status %+v", s)
	}
	if s := status(noRoute); s.Reachable || !strings.Contains(s.Reason, "no route to 192.0.2.1") {
		t.Fatalf("target without a route: %+v", s)
	}

	t.Run("new MAC", func(t *testing.T) {
		// The state first: the entry STALE with the old MAC.
		if err := nl.NeighSet(&netlink.Neigh{LinkIndex: lb.Index, Family: netlink.FAMILY_V4, IP: be.IP.AsSlice(),
			HardwareAddr: be.MAC, State: netlink.NUD_STALE}); err != nil {
			t.Fatal(err)
		}
		old := be.MAC
		lan.ReplaceLink(be)
		if slices.Equal(old, be.MAC) {
			t.Fatal("the re-created link has the old MAC")
		}
		took := waitUntil(t, "the kernel's entry has the new MAC", 3*time.Second, entryIs(be.MAC))
		t.Logf("new MAC %s in the kernel's entry %s after the re-creation (old %s)", be.MAC, took, old)
		if !status(be.IP).Reachable {
			t.Errorf("backend unreachable after it came back: %+v", status(be.IP))
		}
	})

	t.Run("gone", func(t *testing.T) {
		before := changes.Load()
		lan.RemoveLink(be)
		took := waitUntil(t, "the backend is unreachable", 3*time.Second, func() bool { return !status(be.IP).Reachable })
		s := status(be.IP)
		t.Logf("backend unreachable %s after it vanished: %s", took, s.Reason)
		if !strings.Contains(s.Reason, "answered none of the last 3 ARP probes") {
			t.Errorf("reason %q", s.Reason)
		}
		// The Keeper publishes the status, sends its probes, then calls
		// OnChange: give the call a moment.
		waitUntil(t, "OnChange is called", time.Second, func() bool { return changes.Load() != before })
	})

	t.Run("back", func(t *testing.T) {
		before := changes.Load()
		lan.ReplaceLink(be)
		took := waitUntil(t, "the backend is reachable again", 3*time.Second, func() bool {
			return status(be.IP).Reachable && entryIs(be.MAC)()
		})
		t.Logf("backend reachable again %s after it came back", took)
		waitUntil(t, "OnChange is called", time.Second, func() bool { return changes.Load() != before })
	})

	t.Run("static entry", func(t *testing.T) {
		e, ok := kernelEntry(t, nl, lb, st.IP)
		if !ok || !slices.Equal(e.HardwareAddr, fake) || e.State != netlink.NUD_PERMANENT {
			t.Errorf("static entry rewritten: %+v", e)
		}
		if s := status(st.IP); !s.Reachable || !slices.Equal(s.MAC, st.MAC) {
			t.Errorf("static host status %+v, want reachable at %s", s, st.MAC)
		}
	})

	t.Run("targets dropped", func(t *testing.T) {
		k.SetTargets([]netip.Addr{st.IP})
		if _, ok := k.Status(be.IP); ok {
			t.Error("a dropped target still has a status")
		}
	})
}

// TestKeeperIPv6 is TestKeeper for an IPv6 backend: the Keeper resolves
// it with neighbour solicitations, writes a re-created backend's new MAC
// into the kernel's entry, and finds it gone and back.
func TestKeeperIPv6(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"lb", "backend"}})
	lb, be := lan.Host("lb"), lan.Host("backend")
	k, nl := newKeeper(t, lb, nil)
	k.SetTargets([]netip.Addr{be.IP6})
	runKeeper(t, k)
	status := func() Status {
		s, ok := k.Status(be.IP6)
		if !ok {
			t.Fatalf("no status for %s", be.IP6)
		}
		return s
	}
	entryIs := func(mac net.HardwareAddr) func() bool {
		return func() bool {
			e, ok := kernelEntry(t, nl, lb, be.IP6)
			return ok && e.State&nudValid != 0 && slices.Equal(e.HardwareAddr, mac) && slices.Equal(status().MAC, mac)
		}
	}
	took := waitUntil(t, "backend resolved", 2*time.Second, entryIs(be.MAC))
	t.Logf("IPv6 backend resolved in %s: %s", took, status())

	// The kernel's entry STALE with the old MAC, then a new MAC.
	if err := nl.NeighSet(&netlink.Neigh{LinkIndex: lb.Index, Family: netlink.FAMILY_V6, IP: be.IP6.AsSlice(),
		HardwareAddr: be.MAC, State: netlink.NUD_STALE}); err != nil {
		t.Fatal(err)
	}
	old := be.MAC
	lan.ReplaceLink(be)
	took = waitUntil(t, "the kernel's entry has the new MAC", 3*time.Second, entryIs(be.MAC))
	t.Logf("new MAC %s in the kernel's entry %s after the re-creation (old %s)", be.MAC, took, old)

	lan.RemoveLink(be)
	took = waitUntil(t, "the backend is unreachable", 3*time.Second, func() bool { return !status().Reachable })
	if r := status().Reason; !strings.Contains(r, "answered none of the last 3 neighbour solicitations") {
		t.Errorf("reason %q", r)
	}
	t.Logf("IPv6 backend unreachable %s after it vanished", took)
	lan.ReplaceLink(be)
	took = waitUntil(t, "the backend is reachable again", 3*time.Second, func() bool { return status().Reachable && entryIs(be.MAC)() })
	t.Logf("IPv6 backend reachable again %s after it came back", took)
}
