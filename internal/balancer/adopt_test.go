package balancer

import (
	"context"
	"os"
	"slices"
	"testing"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/state"
	"github.com/xlb-project/xlb/internal/testnet"
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
// Balancer's programs replace the old ones in the pinned link. Close then
// removes everything.
func TestBalancerAdopt(t *testing.T) {
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "adopt")
	ns.AddVeth(t, "eth0", "peer0", "10.88.0.1/24")
	pin, err := os.MkdirTemp("/sys/fs/bpf", "xlbt-adopt-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pin) })
	ctx := context.Background()
	open := func() (*state.Dir, *Balancer) {
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
				Selector: uniform{}, State: st})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return st, b
	}
	start := []Service{
		svc("10.88.0.1:80", "random", "10.88.0.21:8080", "10.88.0.22:8080"),
		svc("10.88.0.50:81", "random", "10.88.0.23:8080"),
	}
	next := []Service{
		svc("10.88.0.1:80", "random", "10.88.0.21:8080"),
		svc("10.88.0.50:81", "random", "10.88.0.23:8080"),
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
	if got := addrs(t, ns); !slices.Contains(got, "10.88.0.50/32") {
		t.Fatalf("the VIP went with the first balancer: %v", got)
	}

	st2, b2 := open()
	a := b2.Adopted()
	if a == nil || a.Services != 2 || a.Backends != 3 || a.Retired != 1 || a.Addresses != 1 {
		t.Fatalf("adopted %+v, want 2 services, 3 backend ids, 1 retired, 1 address", a)
	}
	if !slices.Equal(b2.retired, retired) {
		t.Errorf("retired after adoption %v, before %v", b2.retired, retired)
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
			if s.VIP.Port() == 82 && (bk.ID == retired[0] || bk.ID < 3) {
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
	if got := addrs(t, ns); !slices.Equal(got, []string{"10.88.0.1/24"}) {
		t.Errorf("addresses after Close: %v", got)
	}
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(pin)
		t.Errorf("pin directory after Close: %v %v", err, ents)
	}
}
