package state

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/host"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/vipfilter"
)

// newPinPath is a pin path on the bpffs, not created, removed at cleanup.
func newPinPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/sys/fs/bpf", "xlbt-state-")
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(dir)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// TestRecordAndCleanup records host changes made through internal/host in
// a network namespace, reads them back after the process "crashed"
// (nothing undone), and has Cleanup undo every one of them: the addresses
// of both families go, forwarding of both is restored, the VIP filter and
// every pin are removed.
func TestRecordAndCleanup(t *testing.T) {
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "state")
	ns.AddVeth(t, "eth0", "peer0", "10.77.0.1/24")
	ns.Sysctl(t, "net.ipv4.conf.eth0.forwarding", "0")
	ns.Sysctl(t, "net.ipv6.conf.eth0.forwarding", "0")
	path := newPinPath(t)
	vip := netip.MustParseAddr("10.77.0.100")
	src := netip.MustParseAddr("10.77.0.101")
	vip6 := netip.MustParseAddr("fd77::100")
	err := ns.Do(func() error {
		ctx := context.Background()
		d, err := Open(ctx, path, Options{})
		if err != nil {
			return err
		}
		if d.Pinned() != nil {
			t.Errorf("fresh directory: pinned %+v", d.Pinned())
		}
		h, err := host.Open("eth0")
		if err != nil {
			return err
		}
		h.SetRecorder(d)
		if err := d.SetIface(h.Index()); err != nil {
			return err
		}
		for _, a := range []netip.Addr{vip, src, vip6} {
			if _, err := h.AddAddress(a); err != nil {
				return err
			}
		}
		if err := h.EnableForwarding(true, true); err != nil {
			return err
		}
		f := vipfilter.New("eth0")
		if err := f.Set(ctx, []netip.Addr{vip}); err != nil {
			return err
		}
		if err := d.FilterInstalled(true); err != nil {
			return err
		}
		d.Close() // a crash: nothing undone

		rec, err := ReadRecord(path)
		if err != nil {
			return err
		}
		if rec.Ifindex != h.Index() || rec.Netns == 0 || rec.Forwarding != [2]string{"0", "0"} || !rec.Filter ||
			!slices.Equal(rec.Addresses, []netip.Addr{vip, src, vip6}) {
			t.Errorf("record %+v", rec)
		}
		done, err := Cleanup(ctx, path, nil)
		if err != nil {
			return err
		}
		t.Logf("cleanup: %s", strings.Join(done, "; "))
		if ok, err := vipfilter.Exists(ctx, vipfilter.Table("eth0")); ok || err != nil {
			t.Errorf("vip filter after cleanup: %v, %v", ok, err)
		}
		for fam := range 2 {
			fwd, err := h.Forwarding(fam)
			if err != nil || fwd != "0" {
				t.Errorf("forwarding (family %d) after cleanup %q, %v", fam, fwd, err)
			}
		}
		if addrs, err := netlink.AddrList(nil, netlink.FAMILY_V6); err != nil {
			t.Error(err)
		} else if slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.IP.Equal(vip6.AsSlice()) }) {
			t.Errorf("%s left after cleanup", vip6)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := ns.IPv4Addrs(t, "eth0"); !slices.Equal(got, []string{"10.77.0.1/24"}) {
		t.Errorf("addresses after cleanup: %v", got)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after cleanup: %v", err)
	}
}

// TestOpenRefuses: state of another network namespace is refused, even
// with Fresh, and so is state of another layout unless Fresh; neither is
// touched by the refusal.
func TestOpenRefuses(t *testing.T) {
	testnet.RequirePrivileged(t)
	ctx := context.Background()
	path := newPinPath(t)
	ns := testnet.NewNS(t, "state-other")
	err := ns.Do(func() error {
		d, err := Open(ctx, path, Options{})
		if err != nil {
			return err
		}
		return d.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, fresh := range []bool{false, true} {
		if _, err := Open(ctx, path, Options{Fresh: fresh}); !errors.Is(err, ErrOtherNetns) || !strings.Contains(err.Error(), "own pin-path") {
			t.Errorf("state of another namespace (fresh %v): %v", fresh, err)
		}
	}
	if _, err := os.Stat(filepath.Join(path, RecordPin)); err != nil {
		t.Errorf("the refusal touched the record: %v", err)
	}
	if err := ns.Do(func() error { _, err := Cleanup(ctx, path, nil); return err }); err != nil {
		t.Fatal(err)
	}

	// A pipeline pinned by a build of another layout.
	p, err := dispatcher.Load(dispatcher.Options{ConntrackSize: 1024, PinPath: path})
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	// The record as an older build wrote it: xlb_settings' value type
	// had another definition.
	rec, err := ebpf.LoadPinnedMap(filepath.Join(path, dispatcher.LayoutPin), nil)
	if err != nil {
		t.Fatal(err)
	}
	var (
		k [16]byte
		v [4096]byte
	)
	copy(k[:], "xlb_settings")
	if err := rec.Lookup(&k, &v); err != nil {
		t.Fatal(err)
	}
	copy(v[strings.IndexByte(string(v[:]), 0):], "\nstruct xlb_cfg{older}")
	if err := rec.Put(&k, &v); err != nil {
		t.Fatal(err)
	}
	rec.Close()
	if _, err := Open(ctx, path, Options{}); !errors.Is(err, dispatcher.ErrLayout) || !strings.Contains(err.Error(), "--fresh-state") ||
		!strings.Contains(err.Error(), "map xlb_settings") {
		t.Errorf("another layout: %v", err)
	}
	if _, err := os.Stat(filepath.Join(path, "xlb_conns")); err != nil {
		t.Errorf("the refusal removed pins: %v", err)
	}
	d, err := Open(ctx, path, Options{Fresh: true})
	if err != nil {
		t.Fatalf("fresh: %v", err)
	}
	defer d.Remove()
	if d.Pinned() != nil {
		t.Errorf("fresh start adopts %+v", d.Pinned())
	}
	if _, err := os.Stat(filepath.Join(path, "xlb_conns")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("--fresh-state kept the pins: %v", err)
	}
}
