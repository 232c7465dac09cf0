package balancer

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/testnet"
)

// uniform is a Selector that spreads a table over every backend, and
// fails for the policy "broken", as a plugin that cannot start does.
type uniform struct{}

func (uniform) Select(_ context.Context, svc ServiceState) (Selection, error) {
	if svc.Policy == "broken" {
		return Selection{}, errors.New("policy broken: cannot start")
	}
	sel := Selection{Mode: dispatcher.ModeRandom}
	for i := range svc.Backends {
		sel.Table = append(sel.Table, i)
	}
	return sel, nil
}

// newTestBalancer runs a Balancer on eth0 (10.88.0.1/24) in a namespace
// of its own; every call must run inside ns.Do.
func newTestBalancer(t *testing.T) (*testnet.NS, *Balancer) {
	t.Helper()
	testnet.RequirePrivileged(t)
	ns := testnet.NewNS(t, "balancer")
	ns.AddVeth(t, "eth0", "peer0", "10.88.0.1/24")
	var b *Balancer
	err := ns.Do(func() error {
		var err error
		b, err = New(Options{Iface: "eth0", XDPMode: dispatcher.Generic, PortLo: 10000, PortHi: 20000, ConntrackSize: 1024, Selector: uniform{}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Do(b.Close) })
	return ns, b
}

func svc(vip, policy string, backends ...string) Service {
	s := Service{VIP: netip.MustParseAddrPort(vip), Policy: policy}
	for _, a := range backends {
		s.Backends = append(s.Backends, Backend{Address: netip.MustParseAddrPort(a), Weight: 1})
	}
	return s
}

// summary is the balancer's services as "vip policy [backend=id ...]".
func summary(b *Balancer) string {
	var out []string
	for _, s := range b.Services() {
		var bks []string
		for _, bk := range s.Backends {
			bks = append(bks, fmt.Sprintf("%s=%d", bk.Address, bk.ID))
		}
		out = append(out, fmt.Sprintf("%s %s %v", s.VIP, s.Policy, bks))
	}
	return strings.Join(out, "; ")
}

func addrs(t *testing.T, ns *testnet.NS) []string { return ns.IPv4Addrs(t, "eth0") }

func TestServicesPlan(t *testing.T) {
	ns, b := newTestBalancer(t)
	ctx := context.Background()
	do := func(fn func() error) error { return ns.Do(fn) }
	start := []Service{
		svc("10.88.0.1:80", "random", "10.88.0.21:8080", "10.88.0.22:8080"),
		svc("10.88.0.50:81", "random", "10.88.0.23:8080"),
	}
	if err := do(func() error { return b.SetServices(ctx, start) }); err != nil {
		t.Fatal(err)
	}
	before, hostBefore := summary(b), addrs(t, ns)
	if !slices.Contains(hostBefore, "10.88.0.50/32") {
		t.Fatalf("vip 10.88.0.50 not added: %v", hostBefore)
	}
	prepare := func(t *testing.T, next []Service) *ServicesPlan {
		t.Helper()
		var p *ServicesPlan
		err := do(func() (err error) {
			p, err = b.PrepareServices(ctx, next)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("a failing table changes nothing", func(t *testing.T) {
		// A changed service, a removed one and a new one on a new address
		// whose policy fails: the failure comes after the rest is planned.
		next := []Service{
			svc("10.88.0.1:80", "hash", "10.88.0.21:8080", "10.88.0.24:8080"),
			svc("10.88.0.60:82", "broken", "10.88.0.25:8080"),
		}
		err := do(func() error { return b.SetServices(ctx, next) })
		if err == nil || !strings.Contains(err.Error(), "service 10.88.0.60:82") || !strings.Contains(err.Error(), "cannot start") {
			t.Fatalf("SetServices with a broken policy: %v", err)
		}
		if got := summary(b); got != before {
			t.Errorf("services %s, want as before %s", got, before)
		}
		if got := addrs(t, ns); !slices.Equal(got, hostBefore) {
			t.Errorf("addresses %v, want as before %v", got, hostBefore)
		}
		if got := b.Policies(); !slices.Equal(got, []string{"random"}) {
			t.Errorf("policies in use %v, want [random]", got)
		}
	})

	t.Run("refused before the selector is asked", func(t *testing.T) {
		for _, next := range [][]Service{
			{svc("10.88.0.1:80", "random")},
			{svc("10.88.0.1:15000", "random", "10.88.0.21:8080")},
			{start[0], start[0]},
		} {
			if err := do(func() error { return b.SetServices(ctx, next) }); err == nil {
				t.Errorf("SetServices(%v) accepted", next)
			}
			if got := summary(b); got != before {
				t.Errorf("services %s, want as before %s", got, before)
			}
		}
	})

	t.Run("aborted", func(t *testing.T) {
		p := prepare(t, []Service{svc("10.88.0.70:80", "random", "10.88.0.21:8080")})
		if got := addrs(t, ns); !slices.Contains(got, "10.88.0.70/32") {
			t.Errorf("prepared vip 10.88.0.70 not on the interface: %v", got)
		}
		if err := do(func() error { p.Abort(); return nil }); err != nil {
			t.Fatal(err)
		}
		if got := summary(b); got != before {
			t.Errorf("services %s, want as before %s", got, before)
		}
		if got := addrs(t, ns); !slices.Equal(got, hostBefore) {
			t.Errorf("addresses after abort %v, want %v", got, hostBefore)
		}
	})

	t.Run("commit after another change", func(t *testing.T) {
		p := prepare(t, []Service{svc("10.88.0.1:80", "random", "10.88.0.21:8080")})
		other := []Service{svc("10.88.0.1:80", "hash", "10.88.0.22:8080")}
		if err := do(func() error { return b.SetServices(ctx, other) }); err != nil {
			t.Fatal(err)
		}
		after := summary(b)
		if err := do(p.Commit); !errors.Is(err, ErrChangedMeanwhile) {
			t.Fatalf("commit of a stale plan: %v, want %v", err, ErrChangedMeanwhile)
		}
		if got := summary(b); got != after || !strings.Contains(got, "hash") {
			t.Errorf("services %s, want %s", got, after)
		}
		if got := addrs(t, ns); slices.Contains(got, "10.88.0.50/32") {
			t.Errorf("vip 10.88.0.50 of the removed service still on the interface: %v", got)
		}
	})
}

// TestIPv6Services: a balancer started without IPv6 refuses an IPv6 service
// with what to do, and keeps its services; one started with an IPv6
// source address takes IPv6 services beside IPv4 ones, each family from
// its own source addresses.
func TestIPv6Services(t *testing.T) {
	ns, b := newTestBalancer(t)
	ctx := context.Background()
	v4 := svc("10.88.0.1:80", "random", "10.88.0.2:8080")
	v6 := svc("[fd00:88::50]:80", "random", "[fd00:88::2]:8080")
	do := func(fn func() error) error {
		var err error
		if e := ns.Do(func() error { err = fn(); return nil }); e != nil {
			t.Fatal(e)
		}
		return err
	}
	if err := do(func() error { return b.SetServices(ctx, []Service{v4}) }); err != nil {
		t.Fatal(err)
	}
	err := do(func() error { return b.SetServices(ctx, []Service{v4, v6}) })
	if err == nil || !strings.Contains(err.Error(), "an IPv6 service needs a restart") {
		t.Errorf("IPv6 service on a balancer started without IPv6: %v, want a refusal saying a restart is needed", err)
	}
	if got := summary(b); !strings.HasPrefix(got, "10.88.0.1:80 random") || strings.Contains(got, "fd00") {
		t.Errorf("services after the refusal: %s, want only the IPv4 one", got)
	}

	ns6 := testnet.NewNS(t, "balancer6")
	ns6.AddVeth(t, "eth0", "peer0", "10.88.0.1/24")
	src6 := netip.MustParseAddr("fd00:88::1")
	var b6 *Balancer
	if err := ns6.Do(func() (err error) {
		b6, err = New(Options{Iface: "eth0", XDPMode: dispatcher.Generic, PortLo: 10000, PortHi: 20000, ConntrackSize: 1024,
			SourceAddresses: []netip.Addr{src6}, Selector: uniform{}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns6.Do(b6.Close) })
	if got, want := b6.SourceAddresses(), []netip.Addr{netip.MustParseAddr("10.88.0.1"), src6}; !slices.Equal(got, want) {
		t.Errorf("source addresses %v, want the interface's IPv4 one and the configured IPv6 one %v", got, want)
	}
	if err := ns6.Do(func() error { return b6.SetServices(ctx, []Service{v4, v6}) }); err != nil {
		t.Fatal(err)
	}
	if got := summary(b6); !strings.Contains(got, "[fd00:88::50]:80 random") || !strings.Contains(got, "10.88.0.1:80 random") {
		t.Errorf("services %s, want both", got)
	}
	bad := v6
	bad.SourceAddresses = []netip.Addr{netip.MustParseAddr("fd00:88::99")}
	if err := ns6.Do(func() error { return b6.SetServices(ctx, []Service{v4, bad}) }); err == nil || !strings.Contains(err.Error(), "was not configured when xlbd started") {
		t.Errorf("an IPv6 source address unknown at start: %v, want it refused", err)
	}
}
