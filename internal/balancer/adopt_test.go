package balancer

import (
	"context"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/state"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

func TestIDAllocatorReserve(t *testing.T) {
	a := newIDAllocator(8)
	for _, id := range []uint32{3, 1, 5} {
		a.reserve(id)
	}
	var got []uint32
	for {
		id, ok := a.alloc()
		if !ok {
			break
		}
		got = append(got, id)
	}
	slices.Sort(got)
	if want := []uint32{0, 2, 4, 6, 7}; !slices.Equal(got, want) {
		t.Errorf("allocated %v after reserving 1, 3, 5 of 8; want %v", got, want)
	}
}

// TestBalancerAdopt lets a Balancer go keeping its data path and has a new
// one adopt it: the services keep their ids, the backends theirs, a
// backend removed before the restart stays retired (its id is not reused),
// the VIP the first one added is the second one's to remove, and the new
// Balancer's programs replace the old ones in the pinned link. An IPv6
// service goes along: its id, its backend's, its /128 VIP and the IPv6
// source address's place in the pinned table; a configuration with
// another IPv6 source address is refused. Close then removes everything.
func TestBalancerAdopt(t *testing.T) {
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "adopt")
	ns.AddVeth(t, "eth0", "peer0", "10.88.0.1/24")
	ns.Exec(t, "ip", "-6", "addr", "add", "fd88::1/64", "dev", "eth0", "nodad")
	vip6 := func() bool {
		return strings.Contains(ns.Exec(t, "ip", "-6", "addr", "show", "dev", "eth0"), "fd88::50/128")
	}
	pin, err := os.MkdirTemp("/sys/fs/bpf", "xlbt-adopt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pin) })
	ctx := context.Background()
	openErr := func(sources ...netip.Addr) (*state.Dir, *Balancer, error) {
		t.Helper()
		var (
			st *state.Dir
			b  *Balancer
		)
		err := ns.Do(func() error {
			var err error
			if st, err = state.Open(ctx, pin, state.Options{}); err != nil {
				return err
			}
			b, err = New(Options{Iface: "eth0", XDPMode: dispatcher.Generic, PortLo: 10000, PortHi: 20000, ConntrackSize: 1024,
				Selector: uniform{}, State: st, IPv6: true, SourceAddresses: sources})
			if err != nil {
				st.Close()
			}
			return err
		})
		return st, b, err
	}
	open := func() (*state.Dir, *Balancer) {
		t.Helper()
		st, b, err := openErr()
		if err != nil {
			t.Fatal(err)
		}
		return st, b
	}
	start := []Service{
		svc("10.88.0.1:80", "random", "10.88.0.21:8080", "10.88.0.22:8080"),
		svc("10.88.0.50:81", "random", "10.88.0.23:8080"),
		svc("[fd88::50]:81", "random", "[fd88::23]:8080"),
	}
	next := []Service{
		svc("10.88.0.1:80", "random", "10.88.0.21:8080"),
		svc("10.88.0.50:81", "random", "10.88.0.23:8080"),
		svc("[fd88::50]:81", "random", "[fd88::23]:8080"),
	}
	st1, b1 := open()
	if b1.Adopted() != nil {
		t.Fatalf("first balancer adopted %+v", b1.Adopted())
	}
	err = ns.Do(func() error {
		if err := b1.SetServices(ctx, start); err != nil {
			return err
		}
		if err := b1.SetServices(ctx, next); err != nil { // retires .22
			return err
		}
		return b1.Attach(nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	before := summary(b1)
	retired := slices.Clone(b1.retired)
	if len(retired) != 1 {
		t.Fatalf("retired %v, want the id of 10.88.0.22", retired)
	}
	if err := b1.Release(); err != nil {
		t.Fatal(err)
	}
	st1.Close()
	if got := addrs(t, ns); !slices.Contains(got, "10.88.0.50/32") || !vip6() {
		t.Fatalf("the VIPs went with the first balancer: %v", got)
	}
	pinned, err := dispatcher.ReadPinned(pin)
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.Addr{netip.MustParseAddr("fd88::1")}; !slices.Equal(pinned.Sources6, want) || pinned.Slots6 != pinned.Slots {
		t.Errorf("pinned IPv6 sources %v, slots %d (IPv4 %d); want %v and as many slots", pinned.Sources6, pinned.Slots6, pinned.Slots, want)
	}
	if _, b, err := openErr(netip.MustParseAddr("10.88.0.1"), netip.MustParseAddr("fd88::2")); err == nil {
		ns.Do(b.Close)
		t.Errorf("another IPv6 source address adopted")
	} else if !strings.Contains(err.Error(), "source-addresses: IPv6 [fd88::2]") || !strings.Contains(err.Error(), "[fd88::1]") {
		t.Errorf("another IPv6 source address: %v", err)
	}

	st2, b2 := open()
	a := b2.Adopted()
	if a == nil || a.Services != 3 || a.Backends != 4 || a.Retired != 1 || a.Addresses != 2 {
		t.Fatalf("adopted %+v, want 3 services, 4 backend ids, 1 retired, 2 addresses", a)
	}
	if got, want := retiredIDs(b2.retired), retiredIDs(retired); !slices.Equal(got, want) {
		t.Errorf("retired backend ids after adoption %v, before %v", got, want)
	}
	err = ns.Do(func() error {
		if err := b2.SetServices(ctx, next); err != nil {
			return err
		}
		return b2.Attach(nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := summary(b2); got != before {
		t.Errorf("after adoption:\n  %s\nbefore:\n  %s", got, before)
	}
	err = ns.Do(func() error {
		return b2.SetServices(ctx, append(next, svc("10.88.0.1:82", "random", "10.88.0.24:8080")))
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range b2.Services() {
		for _, bk := range s.Backends {
			if s.VIP.Port() == 82 && (bk.ID == retired[0].id || bk.ID < 3) {
				t.Errorf("new backend got id %d, in use (retired %v)", bk.ID, retired)
			}
		}
	}
	if err := ns.Do(b2.Close); err != nil {
		t.Fatal(err)
	}
	if err := st2.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := addrs(t, ns); !slices.Equal(got, []string{"10.88.0.1/24"}) || vip6() {
		t.Errorf("addresses after Close: %v, IPv6 VIP left: %v", got, vip6())
	}
	if left := xlbtest.LeftPins(pin); left != nil {
		t.Errorf("pins after Close: %v", left)
	}
}

func retiredIDs(rs []retiredBackend) []uint32 {
	out := make([]uint32, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.id)
	}
	return out
}
