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

// addrs lists eth0's IPv4 addresses inside ns.
func addrs(t *testing.T, ns *testnet.NS) []string { return ns.IPv4Addrs(t, "eth0") }

func TestHostAddresses(t *testing.T) {
	ns := newHostNS(t, "10.77.0.1/24")
	primary := netip.MustParseAddr("10.77.0.1")
	vip := netip.MustParseAddr("10.77.0.10")
	var h *Iface
	do := func(fn func() error) {
		t.Helper()
		if err := ns.Do(fn); err != nil {
			t.Fatal(err)
		}
	}
	do(func() (err error) {
		h, err = Open("eth0")
		return err
	})
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
	add := func(a netip.Addr, want bool) {
		t.Helper()
		do(func() error {
			added, err := h.AddAddress(a)
			if err != nil {
				return err
			}
			if added != want {
				t.Errorf("AddAddress(%s) added %v, want %v", a, added, want)
			}
			return nil
		})
	}
	remove := func(a netip.Addr, want bool) {
		t.Helper()
		do(func() error {
			removed, err := h.RemoveAddress(a)
			if err != nil {
				return err
			}
			if removed != want {
				t.Errorf("RemoveAddress(%s) removed %v, want %v", a, removed, want)
			}
			return nil
		})
	}
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
	read := func() string {
		t.Helper()
		var v []byte
		if err := ns.Do(func() (err error) {
			v, err = os.ReadFile("/proc/sys/net/ipv4/conf/eth0/forwarding")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(v))
	}
	for _, before := range []string{"0", "1"} {
		t.Run("from "+before, func(t *testing.T) {
			ns.Sysctl(t, "net/ipv4/conf/eth0/forwarding", before)
			var h *Iface
			if err := ns.Do(func() (err error) {
				if h, err = Open("eth0"); err != nil {
					return err
				}
				if err := h.EnableForwarding(); err != nil {
					return err
				}
				return h.EnableForwarding() // twice: Close still restores the first value
			}); err != nil {
				t.Fatal(err)
			}
			if got := read(); got != "1" {
				t.Fatalf("forwarding %s after EnableForwarding", got)
			}
			if err := ns.Do(h.Close); err != nil {
				t.Fatal(err)
			}
			if got := read(); got != before {
				t.Fatalf("forwarding %s after Close, want %s as before", got, before)
			}
		})
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
	var lo, hi int
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
