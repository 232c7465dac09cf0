package balancer

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/plugins"
)

// gated is a Selector that lists every eligible backend once (random
// mode). Asked for the policy "slow" it waits until release is closed;
// while fail is set it fails as a plugin that restarts does.
type gated struct {
	release chan struct{}
	entered chan struct{} // gets a value each time a "slow" call starts waiting
	fail    atomic.Bool
	calls   atomic.Int32
}

func (g *gated) Select(ctx context.Context, svc ServiceState) (Selection, error) {
	g.calls.Add(1)
	if g.fail.Load() {
		return Selection{}, fmt.Errorf("plugin restarting: %w", ErrUnavailable)
	}
	if svc.Policy == "slow" {
		select {
		case g.entered <- struct{}{}:
		default:
		}
		<-g.release
	}
	sel := Selection{Mode: dispatcher.ModeRandom}
	for i, b := range svc.Backends {
		if b.State == plugins.StateUp && b.Weight > 0 {
			sel.Table = append(sel.Table, i)
		}
	}
	return sel, nil
}

// table returns the addresses of the backends in a service's table in
// force, sorted, and whether it has one.
func table(b *Balancer, vip netip.AddrPort) ([]string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	svc := b.services[ServiceKey{VIP: vip}]
	if svc == nil || svc.none {
		return nil, false
	}
	var out []string
	for _, id := range svc.table {
		for _, bk := range svc.backends {
			if bk.id == id {
				out = append(out, bk.spec.Address.String())
			}
		}
	}
	slices.Sort(out)
	return out, true
}

// TestTablesWithoutTheLock runs a Balancer (and its neighbour keeper) on
// a LAN with one real backend and one address nobody holds: a Selector
// call that blocks holds up neither status nor other changes, a table
// computed before another change is computed again rather than installed,
// the backend nobody answers for goes down and leaves the table, and while
// the Selector fails the table in force loses that backend all the same.
func TestTablesWithoutTheLock(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"lb", "backend"}})
	lb, be := lan.Host("lb"), lan.Host("backend")
	sel := &gated{release: make(chan struct{}), entered: make(chan struct{}, 4)}
	var b *Balancer
	err := lb.NS.Do(func() (err error) {
		b, err = New(Options{Iface: "eth0", XDPMode: dispatcher.Generic, PortLo: 10000, PortHi: 20000, ConntrackSize: 1024,
			GCInterval: 100 * time.Millisecond, Selector: sel})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lb.NS.Do(b.Close) })
	ctx := context.Background()
	vip := netip.AddrPortFrom(lb.IP, 80)
	real := netip.AddrPortFrom(be.IP, 8080).String()
	ghost := netip.AddrPortFrom(lan.AddrInSubnet(200), 8080).String()
	set := func(policy string, backends ...string) error {
		return lb.NS.Do(func() error { return b.SetServices(ctx, []Service{svc(vip.String(), policy, backends...)}) })
	}
	if err := set("random", real); err != nil {
		t.Fatal(err)
	}

	t.Run("a blocked Selector holds nothing up", func(t *testing.T) {
		done := make(chan error, 1)
		go func() {
			_, err := b.SetPolicy(ctx, vip, "slow")
			done <- err
		}()
		<-sel.entered
		start := time.Now()
		if s := b.Services(); len(s) != 1 || s[0].Policy != "random" {
			t.Errorf("services while a Select blocks: %+v", s)
		}
		if err := set("random", real, ghost); err != nil {
			t.Fatalf("SetServices while a Select blocks: %v", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("status and a change took %s while a Select blocked", d)
		}
		// The blocked call computed a table for one backend; the service
		// has two now: that table must not be installed.
		close(sel.release)
		if err := <-done; err != nil {
			t.Fatalf("SetPolicy: %v", err)
		}
		got, _ := table(b, vip)
		if want := []string{real, ghost}; !slices.Equal(got, sorted(want)) {
			t.Errorf("table after an overtaken SetPolicy %v, want %v", got, sorted(want))
		}
		if p := b.Services()[0].Policy; p != "slow" {
			t.Errorf("policy %s, want slow", p)
		}
	})

	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := b.Run(runCtx); err != nil {
			t.Error(err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})

	t.Run("a backend nobody answers for leaves the table", func(t *testing.T) {
		took := waitTable(t, b, vip, real)
		t.Logf("the backend nobody answers for left the table after %s", took.Round(time.Millisecond))
		for _, bs := range b.Services()[0].Backends {
			want := plugins.StateUp
			if bs.Address.String() == ghost {
				want = plugins.StateDown
			}
			if bs.State != want {
				t.Errorf("backend %s is %s (%s), want %s", bs.Address, bs.State, bs.NextHop, want)
			}
		}
	})

	t.Run("a failing Selector keeps no down backend", func(t *testing.T) {
		// A new backend nobody answers for is up until proven down: it is
		// in the table at first. Then the Selector fails (its plugin
		// restarting), and the backend is found down meanwhile.
		ghost2 := netip.AddrPortFrom(lan.AddrInSubnet(201), 8080).String()
		if err := set("random", real, ghost2); err != nil {
			t.Fatal(err)
		}
		if got, _ := table(b, vip); !slices.Equal(got, sorted([]string{real, ghost2})) {
			t.Fatalf("table %v, want both backends", got)
		}
		sel.fail.Store(true)
		defer sel.fail.Store(false)
		took := waitTable(t, b, vip, real)
		t.Logf("with the Selector failing, the down backend left the table in force after %s", took.Round(time.Millisecond))
		if err := set("random", real, ghost); err == nil {
			t.Error("SetServices with a failing Selector succeeded")
		}
		if got, _ := table(b, vip); !slices.Equal(got, []string{real}) {
			t.Errorf("table %v after a refused change, want only %s", got, real)
		}
	})

	t.Run("every backend down: no table", func(t *testing.T) {
		if err := set("random", ghost); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for {
			if _, ok := table(b, vip); !ok {
				break
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("service still has a table %s after its only backend went down", time.Since(start))
			}
			time.Sleep(50 * time.Millisecond)
		}
		calls := sel.calls.Load()
		time.Sleep(500 * time.Millisecond)
		if n := sel.calls.Load(); n != calls {
			t.Errorf("the Selector was asked %d times for a service with no backend up", n-calls)
		}
	})
}

// waitTable waits up to 3 s until the table in force of vip holds exactly
// the backends want, and returns how long that took.
func waitTable(t *testing.T, b *Balancer, vip netip.AddrPort, want ...string) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		got, _ := table(b, vip)
		if slices.Equal(got, sorted(want)) {
			return time.Since(start)
		}
		if time.Since(start) > 3*time.Second {
			t.Fatalf("table %v after %s, want %v; services %+v", got, time.Since(start), sorted(want), b.Services())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
