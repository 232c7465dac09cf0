package host

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf/link"

	"github.com/xlb-project/xlb/internal/testnet"
)

// newHostNS makes a namespace with a veth pair eth0/peer0, both up, and
// gives eth0 the address prefix (none if empty).
func newHostNS(t *testing.T, prefix string) *testnet.NS {
	t.Helper()
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "host")
	ns.AddVeth(t, "eth0", "peer0", prefix)
	return ns
}

// mustDo runs fn inside ns and fails the test if fn fails.
func mustDo(t *testing.T, ns *testnet.NS, fn func() error) {
	t.Helper()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// openEth0 opens eth0 inside ns.
func openEth0(t *testing.T, ns *testnet.NS) (h *Iface) {
	t.Helper()
	mustDo(t, ns, func() (err error) {
		h, err = Open("eth0")
		return err
	})
	return h
}

// addrs lists eth0's IPv4 addresses inside ns.
func addrs(t *testing.T, ns *testnet.NS) []string { return ns.IPv4Addrs(t, "eth0") }

func TestHostAddresses(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	primary := netip.MustParseAddr("10.77.0.1")
	vip := netip.MustParseAddr("10.77.0.10")
	h := openEth0(t, ns)
	do := func(fn func() error) { t.Helper(); mustDo(t, ns, fn) }
	do(func() error {
		got, err := h.PrimaryIPv4()
		if err != nil {
			return err
		}
		if got != primary {
			t.Errorf("primary address %s, want %s", got, primary)
		}
		return nil
	})
	// change calls op, h.AddAddress or h.RemoveAddress, on a and checks
	// whether it changed the interface.
	change := func(name string, op func(netip.Addr) (bool, error), a netip.Addr, want bool) {
		t.Helper()
		do(func() error {
			changed, err := op(a)
			if err != nil {
				return err
			}
			if changed != want {
				t.Errorf("%s(%s) = %v, want %v", name, a, changed, want)
			}
			return nil
		})
	}
	add := func(a netip.Addr, want bool) { t.Helper(); change("AddAddress", h.AddAddress, a, want) }
	remove := func(a netip.Addr, want bool) { t.Helper(); change("RemoveAddress", h.RemoveAddress, a, want) }
	add(primary, false) // already the host's
	add(vip, true)
	add(vip, false) // now the host's
	if got, want := addrs(t, ns), []string{"10.77.0.1/24", "10.77.0.10/32"}; !slices.Equal(got, want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	if got := h.Added(); !slices.Equal(got, []netip.Addr{vip}) {
		t.Errorf("Added() = %v, want [%s]", got, vip)
	}
	remove(primary, false) // not added by h: left alone
	remove(vip, true)
	remove(vip, false)
	if got, want := addrs(t, ns), []string{"10.77.0.1/24"}; !slices.Equal(got, want) {
		t.Fatalf("addresses after removal %v, want %v", got, want)
	}

	// Close removes what is still added, and only that.
	other := netip.MustParseAddr("10.77.0.11")
	add(vip, true)
	add(other, true)
	do(h.Close)
	if got, want := addrs(t, ns), []string{"10.77.0.1/24"}; !slices.Equal(got, want) {
		t.Fatalf("addresses after Close %v, want %v", got, want)
	}
	if got := h.Added(); len(got) != 0 {
		t.Errorf("Added() after Close = %v", got)
	}
}

func TestHostNoIPv4(t *testing.T) {
	ns := newHostNS(t, "")
	err := ns.Do(func() error {
		h, err := Open("eth0")
		if err != nil {
			return err
		}
		_, err = h.PrimaryIPv4()
		if !errors.Is(err, ErrNoIPv4) || !strings.Contains(err.Error(), "eth0") {
			t.Errorf("PrimaryIPv4 of an interface without IPv4: %v, want %v naming eth0", err, ErrNoIPv4)
		}
		_, err = Open("nosuch0")
		if err == nil || !strings.Contains(err.Error(), "nosuch0") {
			t.Errorf("Open(nosuch0): %v, want an error naming it", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestHostForwarding(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	read := func(fam string) string {
		t.Helper()
		var v []byte
		if err := ns.Do(func() (err error) {
			v, err = os.ReadFile("/proc/sys/net/" + fam + "/conf/eth0/forwarding")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(v))
	}
	for _, tc := range []struct {
		name       string
		ipv4, ipv6 bool
	}{{"ipv4", true, false}, {"ipv6", false, true}, {"both", true, true}} {
		for _, before := range []string{"0", "1"} {
			t.Run(tc.name+" from "+before, func(t *testing.T) {
				ns.Sysctl(t, "net/ipv4/conf/eth0/forwarding", before)
				ns.Sysctl(t, "net/ipv6/conf/eth0/forwarding", before)
				var h *Iface
				if err := ns.Do(func() (err error) {
					if h, err = Open("eth0"); err != nil {
						return err
					}
					if err := h.EnableForwarding(tc.ipv4, tc.ipv6); err != nil {
						return err
					}
					return h.EnableForwarding(tc.ipv4, tc.ipv6) // twice: Close still restores the first value
				}); err != nil {
					t.Fatal(err)
				}
				for fam, on := range map[string]bool{"ipv4": tc.ipv4, "ipv6": tc.ipv6} {
					want := before
					if on {
						want = "1"
					}
					if got := read(fam); got != want {
						t.Fatalf("%s forwarding %s after EnableForwarding(%v, %v), want %s", fam, got, tc.ipv4, tc.ipv6, want)
					}
				}
				if err := ns.Do(h.Close); err != nil {
					t.Fatal(err)
				}
				for _, fam := range []string{"ipv4", "ipv6"} {
					if got := read(fam); got != before {
						t.Fatalf("%s forwarding %s after Close, want %s as before", fam, got, before)
					}
				}
			})
		}
	}
}

// TestHostIPv6: the primary IPv6 address is a global one (never the
// link-local one every interface has, never a tentative one), an IPv6
// address is added as a /128 usable at once and removed by Close, and
// IsLocal and the port-range check work on IPv6 addresses.
func TestHostIPv6(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	v6addrs := func() []string {
		t.Helper()
		var out []string
		for _, f := range strings.Fields(ns.Exec(t, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global")) {
			if strings.Contains(f, "/") && strings.Contains(f, ":") {
				out = append(out, f)
			}
		}
		return out
	}
	h := openEth0(t, ns)
	do := func(fn func() error) { t.Helper(); mustDo(t, ns, fn) }
	do(func() error {
		if _, err := h.PrimaryIPv6(); !errors.Is(err, ErrNoIPv6) {
			t.Errorf("PrimaryIPv6 with only a link-local address: %v, want %v", err, ErrNoIPv6)
		}
		return nil
	})
	// A tentative address (duplicate address detection running) is not
	// taken; one without DAD is.
	ns.Exec(t, "ip", "-6", "addr", "add", "fd00:77::5/64", "dev", "eth0")
	ns.Exec(t, "ip", "-6", "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad")
	primary := netip.MustParseAddr("fd00:77::1")
	vip := netip.MustParseAddr("fd00:77::10")
	do(func() error {
		got, err := h.PrimaryIPv6()
		if err != nil {
			return err
		}
		if got != primary {
			t.Errorf("primary IPv6 address %s, want %s (fd00:77::5 is still tentative)", got, primary)
		}
		for a, want := range map[netip.Addr]bool{primary: true, vip: false, netip.MustParseAddr("10.77.0.1"): true} {
			if local, err := IsLocal(a); err != nil || local != want {
				t.Errorf("IsLocal(%s) = %v, %v; want %v", a, local, err, want)
			}
		}
		added, err := h.AddAddress(vip)
		if err != nil || !added {
			t.Errorf("AddAddress(%s) = %v, %v; want it added", vip, added, err)
		}
		if added, err := h.AddAddress(primary); err != nil || added {
			t.Errorf("AddAddress(%s) = %v, %v; want it left (already the host's)", primary, added, err)
		}
		return nil
	})
	if got := v6addrs(); !slices.Contains(got, "fd00:77::10/128") {
		t.Fatalf("global IPv6 addresses %v, want fd00:77::10/128 among them", got)
	}
	if out := ns.Exec(t, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "to", "fd00:77::10/128"); strings.Contains(out, "tentative") {
		t.Errorf("added address is tentative: %s", out)
	}
	ns.Sysctl(t, "net.ipv4.ip_local_port_range", "40000 50000")
	do(func() error {
		if err := CheckPortRange(primary, 45000, 46000); !errors.Is(err, ErrPortOverlap) {
			t.Errorf("CheckPortRange on a local IPv6 address inside the ephemeral range: %v, want %v", err, ErrPortOverlap)
		}
		return h.Close()
	})
	if got := v6addrs(); slices.Contains(got, "fd00:77::10/128") || !slices.Contains(got, "fd00:77::1/64") {
		t.Errorf("global IPv6 addresses after Close %v, want the added /128 gone and the host's own kept", got)
	}
}

func TestHostPortRange(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	ns.Sysctl(t, "net.ipv4.ip_local_port_range", "40000 50000")
	local := netip.MustParseAddr("10.77.0.1")
	foreign := netip.MustParseAddr("10.77.0.99")
	for _, tc := range []struct {
		src     netip.Addr
		lo, hi  uint16
		overlap bool
	}{
		{local, 10000, 32767, false},
		{local, 45000, 46000, true},
		{local, 30000, 40000, true},
		{local, 50000, 60000, true},
		{local, 50001, 60000, false},
		{foreign, 45000, 46000, false}, // not a local address: the host never uses its ports
	} {
		err := ns.Do(func() error { return CheckPortRange(tc.src, tc.lo, tc.hi) })
		switch {
		case tc.overlap && !errors.Is(err, ErrPortOverlap):
			t.Errorf("%s %d-%d: %v, want %v", tc.src, tc.lo, tc.hi, err, ErrPortOverlap)
		case tc.overlap && !strings.Contains(err.Error(), "ephemeral 40000-50000"):
			t.Errorf("%s %d-%d: %v, want the ephemeral range named", tc.src, tc.lo, tc.hi, err)
		case !tc.overlap && err != nil:
			t.Errorf("%s %d-%d: %v, want no error", tc.src, tc.lo, tc.hi, err)
		}
	}
	var lo, hi uint16
	if err := ns.Do(func() (err error) { lo, hi, err = EphemeralPorts(); return err }); err != nil || lo != 40000 || hi != 50000 {
		t.Errorf("EphemeralPorts() = %d, %d, %v; want 40000, 50000", lo, hi, err)
	}
}

func TestHostAttachedXDP(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	prog, err := testnet.NewPassProgram("other_tool")
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	var h *Iface
	var none, some string
	err = ns.Do(func() (err error) {
		if h, err = Open("eth0"); err != nil {
			return err
		}
		none = h.AttachedXDP()
		l, err := link.AttachXDP(link.XDPOptions{Program: prog, Interface: h.Index(), Flags: link.XDPGenericMode})
		if err != nil {
			return err
		}
		defer l.Close()
		some = h.AttachedXDP()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if none != "" {
		t.Errorf("AttachedXDP() without a program: %q", none)
	}
	if want := fmt.Sprintf("id %d, name other_tool, generic mode", id); some != want {
		t.Errorf("AttachedXDP() = %q, want %q", some, want)
	}
}
