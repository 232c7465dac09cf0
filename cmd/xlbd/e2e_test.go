package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	xlbtest.Cleanup()
	os.Exit(code)
}

// topo is the demo's network: two clients, the load balancer and two
// backends on one bridge, like the original demo's docker network.
type topo struct {
	lan                *testnet.LAN
	c1, c2, lb, ba, bb *testnet.Host
	vip                netip.AddrPort
	d                  *xlbtest.Daemon
}

const backendPort = 8080

func newTopo(t testing.TB, mode string, extra ...string) *topo {
	t.Helper()
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{
		Hosts:         []string{"client1", "client2", "lb", "backend-a", "backend-b"},
		NativePeerXDP: mode == "native",
	})
	tp := &topo{lan: lan, c1: lan.Host("client1"), c2: lan.Host("client2"), lb: lan.Host("lb"),
		ba: lan.Host("backend-a"), bb: lan.Host("backend-b")}
	tp.vip = netip.AddrPortFrom(tp.lb.IP, 80)
	tp.ba.NS.ServeHTTP(t, fmt.Sprintf("%s:%d", tp.ba.IP, backendPort), "backend-a")
	tp.bb.NS.ServeHTTP(t, fmt.Sprintf("%s:%d", tp.bb.IP, backendPort), "backend-b")
	args := append([]string{
		"--iface", "eth0", "--xdp-mode", mode,
		"--vip", tp.vip.String(),
		"--backend", fmt.Sprintf("%s:%d", tp.ba.IP, backendPort),
		"--backend", fmt.Sprintf("%s:%d", tp.bb.IP, backendPort),
		"--log-level", "debug",
	}, extra...)
	tp.d = xlbtest.Start(t, tp.lb.NS, args...)
	return tp
}

// conn returns xlb's entry for the connection or UDP flow from client
// ("IP:port"), and whether it tracks one.
func (tp *topo) conn(t testing.TB, client string) (*controlpb.Conn, bool) {
	t.Helper()
	cs, err := tp.d.Client().Conns(context.Background())
	if err != nil {
		t.Fatalf("conns: %v", err)
	}
	for _, c := range cs {
		if c.Client == client {
			return c, true
		}
	}
	return nil, false
}

func (tp *topo) counters(t testing.TB) map[string]uint64 {
	st, err := tp.d.Client().Status(context.Background())
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return st.Counters
}

func TestEndToEnd(t *testing.T) {
	for _, mode := range []string{"native", "generic"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t, mode)
			t.Run("both backends answer", func(t *testing.T) { tp.testBothBackends(t) })
			t.Run("same source port from two clients", func(t *testing.T) { tp.testSamePort(t) })
			t.Run("port reuse after close", func(t *testing.T) { tp.testPortReuse(t) })
			t.Run("thousands of short connections", func(t *testing.T) { tp.testMany(t, 2000) })
			t.Run("lb host's own traffic", func(t *testing.T) { tp.testHostTraffic(t) })
			t.Run("no unexpected drops", func(t *testing.T) {
				c := tp.counters(t)
				for name, v := range c {
					if strings.HasPrefix(name, "drop_") && name != "drop_no_conn" && v > 0 {
						t.Errorf("counter %s = %d", name, v)
					}
				}
				if c["fwd"] == 0 || c["ret"] == 0 || c["new_conn"] < 2000 {
					t.Errorf("counters show no load balancing: %v", c)
				}
				if mode == "native" && c["redirect"] != 0 {
					t.Errorf("one-armed traffic was redirected: %v", c)
				}
			})
		})
	}
}

// answersFrom makes n requests to the VIP from h, one after another and
// each on a new connection, and counts the answers by backend.
func (tp *topo) answersFrom(t *testing.T, h *testnet.Host, n int) map[string]int {
	t.Helper()
	c := h.NS.HTTPClient(false)
	seen := map[string]int{}
	for i := range n {
		b, err := testnet.Get(t.Context(), c, "http://"+tp.vip.String()+"/")
		if err != nil {
			t.Fatalf("request %d from %s: %v", i, h.Name, err)
		}
		seen[b]++
	}
	return seen
}

func (tp *topo) testBothBackends(t *testing.T) {
	seen := tp.answersFrom(t, tp.c1, 40)
	if seen["backend-a"] == 0 || seen["backend-b"] == 0 || len(seen) != 2 {
		t.Fatalf("replies by backend: %v, want both", seen)
	}
	t.Logf("replies by backend: %v", seen)
}

// request sends one HTTP/1.1 request on an open connection and returns
// the backend that answered.
func request(conn net.Conn) (string, error) {
	if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return "", err
	}
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: vip\r\n\r\n"); err != nil {
		return "", err
	}
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		return "", err
	}
	resp := string(buf[:n])
	for _, line := range strings.Split(resp, "\r\n") {
		if v, ok := strings.CutPrefix(line, testnet.BackendHeader+": "); ok {
			return v, nil
		}
	}
	return "", fmt.Errorf("no %s header in %q", testnet.BackendHeader, resp)
}

// sharedPort is the source port both clients connect from in the tests
// of clients that share one.
const sharedPort = 41000

// sharedPortConns connects to vip from sharedPort on both clients (from
// their IPv6 addresses if v6), makes three rounds of requests on both
// connections, and returns xlb's established connections from that port.
func (tp *topo) sharedPortConns(t *testing.T, vip netip.AddrPort, v6 bool) []*controlpb.Conn {
	t.Helper()
	ctx := context.Background()
	var conns []net.Conn
	for _, h := range []*testnet.Host{tp.c1, tp.c2} {
		local := netip.AddrPortFrom(h.IP, sharedPort)
		if v6 {
			local = netip.AddrPortFrom(h.IP6, sharedPort)
		}
		conn, err := h.NS.DialFrom(ctx, local.String(), vip.String())
		if err != nil {
			t.Fatalf("dial from %s: %v", local, err)
		}
		defer conn.Close()
		conns = append(conns, conn)
	}
	for round := range 3 {
		for i, conn := range conns {
			if _, err := request(conn); err != nil {
				t.Fatalf("client %d round %d: %v", i+1, round, err)
			}
		}
	}
	cs, err := tp.d.Client().Conns(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var shared []*controlpb.Conn
	for _, c := range cs {
		if ap, err := netip.ParseAddrPort(c.Client); err == nil && ap.Port() == sharedPort && c.State == "established" {
			shared = append(shared, c)
		}
	}
	return shared
}

func (tp *topo) testSamePort(t *testing.T) {
	cs := tp.sharedPortConns(t, tp.vip, false)
	sources := map[string]bool{}
	for _, c := range cs {
		key := c.Backend + " " + c.Source
		if sources[key] {
			t.Errorf("two connections share backend and source %s", key)
		}
		sources[key] = true
	}
	if len(sources) != 2 {
		t.Errorf("want 2 established connections from port %d, got %v (%v)", sharedPort, len(sources), cs)
	}
}

func (tp *topo) testPortReuse(t *testing.T) {
	ctx := context.Background()
	laddr := fmt.Sprintf("%s:%d", tp.c1.IP, 42000)
	for i := 0; i < 5; i++ {
		conn, err := tp.c1.NS.DialFrom(ctx, laddr, tp.vip.String())
		if err != nil {
			t.Fatalf("connection %d from %s: %v", i, laddr, err)
		}
		if _, err := request(conn); err != nil {
			t.Fatalf("connection %d from %s: %v", i, laddr, err)
		}
		// Close with RST so the same four-tuple is free at once on the
		// client; the load balancer must start a new connection.
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	}
	if c := tp.counters(t); c["recycled"] < 4 {
		t.Errorf("recycled = %d, want >= 4", c["recycled"])
	}
}

func (tp *topo) testMany(t *testing.T, n int) {
	clients := []*http.Client{tp.c1.NS.HTTPClient(false), tp.c2.NS.HTTPClient(false)}
	start := time.Now()
	getMany(t, clients, []string{"http://" + tp.vip.String() + "/"}, n, 8, nil)
	t.Logf("%d short connections in %v", n, time.Since(start))
}

// getMany sends n GET requests from workers goroutines, worker w using
// clients[w%len(clients)] and urls[w%len(urls)], hands each answer and
// its duration to record (if not nil; called under a lock), and fails
// the test if any request failed.
func getMany(t testing.TB, clients []*http.Client, urls []string, n, workers int, record func(body string, took time.Duration)) {
	t.Helper()
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		work = make(chan int)
	)
	for w := 0; w < workers; w++ {
		c, url := clients[w%len(clients)], urls[w%len(urls)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				start := time.Now()
				b, err := testnet.Get(t.Context(), c, url)
				took := time.Since(start)
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("request %d to %s: %w", i, url, err))
				} else if record != nil {
					record(b, took)
				}
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", len(errs), n, errs[0])
	}
}

func (tp *topo) testHostTraffic(t *testing.T) {
	// The load balancer host talks to a backend itself...
	c := tp.lb.NS.HTTPClient(false)
	for i := 0; i < 20; i++ {
		b, err := testnet.Get(t.Context(), c, fmt.Sprintf("http://%s:%d/", tp.ba.IP, backendPort))
		if err != nil || b != "backend-a" {
			t.Fatalf("lb -> backend-a request %d: %q, %v", i, b, err)
		}
	}
	// ...and keeps its own services (like SSH) on its address.
	own := tp.lb.NS.ServeHTTP(t, tp.lb.IP.String()+":2222", "lb-itself")
	b, err := testnet.Get(t.Context(), tp.c1.NS.HTTPClient(false), "http://"+own.String()+"/")
	if err != nil || b != "lb-itself" {
		t.Fatalf("client -> lb's own service: %q, %v", b, err)
	}
}
