package health

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// server is a TCP server on loopback that can be turned off (its
// listener closed: connections are refused) and on again on the same
// port, answering HTTP with a status code that can be changed.
type server struct {
	t      *testing.T
	addr   netip.AddrPort
	mu     sync.Mutex
	l      net.Listener
	srv    *http.Server
	status atomic.Int32
	delay  atomic.Int64 // nanoseconds each answer waits
	hosts  chan string  // Host headers seen
	paths  chan string
	ports  chan uint16 // clients' ports seen
	active atomic.Int32
	peak   atomic.Int32
}

func newServer(t *testing.T) *server {
	s := &server{t: t, hosts: make(chan string, 1000), paths: make(chan string, 1000), ports: make(chan uint16, 1000)}
	s.status.Store(http.StatusOK)
	s.start("127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

func (s *server) start(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		s.t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := s.active.Add(1)
		defer s.active.Add(-1)
		for {
			p := s.peak.Load()
			if n <= p || s.peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(time.Duration(s.delay.Load()))
		s.hosts <- r.Host
		s.paths <- r.URL.Path
		w.WriteHeader(int(s.status.Load()))
	}), ConnState: func(c net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.ports <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Port()
		}
	}}
	go srv.Serve(l)
	s.mu.Lock()
	s.l, s.srv = l, srv
	s.addr = l.Addr().(*net.TCPAddr).AddrPort()
	s.mu.Unlock()
}

func (s *server) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		s.srv.Close()
		s.srv = nil
	}
}

func (s *server) restart() { s.start(s.addr.String()) }

func spec(check string) Spec {
	return Spec{Check: check, Interval: 50 * time.Millisecond, Timeout: 200 * time.Millisecond, Rise: 2, Fall: 3}
}

// waitResult waits up to limit for t's verdict to be want.
func waitResult(t *testing.T, c *Checker, tg Target, want Result, limit time.Duration) Status {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		st, ok := c.Status(tg)
		if ok && st.Result == want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s after %s (%+v), want %s", tg, st.Result, limit, st, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRiseFall: a target is checked at once and passes; with its server
// gone it takes fall failures in a row to fail, and back, rise passes in
// a row to pass again; OnChange is called at each change and only then.
func TestRiseFall(t *testing.T) {
	s := newServer(t)
	var changes atomic.Int32
	c := New(Options{Concurrency: 4, OnChange: func() { changes.Add(1) }})
	defer c.Close()
	tg := Target{Addr: s.addr, Spec: spec(TCP)}
	c.SetTargets([]Target{tg})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	c.WaitChecked(ctx, []Target{tg})
	st, _ := c.Status(tg)
	if st.Result != Passing || !strings.HasPrefix(st.Last, "connected in ") || changes.Load() != 1 {
		t.Fatalf("after the first check: %+v, %d changes; want passing, 1 change", st, changes.Load())
	}

	s.stop()
	start := time.Now()
	st = waitResult(t, c, tg, Failing, 2*time.Second)
	took := time.Since(start)
	if st.Failures != 3 || !strings.Contains(st.Last, "connection refused") {
		t.Errorf("failing: %+v, want 3 failures, connection refused", st)
	}
	// 3 checks 50 ms apart: at least 2 intervals after the first failure.
	if took < 100*time.Millisecond {
		t.Errorf("failing after %s: fewer than fall checks", took)
	}
	if n := changes.Load(); n != 2 {
		t.Errorf("%d changes, want 2", n)
	}

	s.restart()
	st = waitResult(t, c, tg, Passing, 2*time.Second)
	if st.Passes != 2 || st.Since.Before(start) {
		t.Errorf("passing again: %+v, want 2 passes", st)
	}
	if n := changes.Load(); n != 3 {
		t.Errorf("%d changes, want 3", n)
	}
	t.Logf("failing %s after the server stopped", took.Round(time.Millisecond))
}

// TestFirstFailure: a target that fails its first check fails at once,
// without waiting for fall failures.
func TestFirstFailure(t *testing.T) {
	s := newServer(t)
	s.stop()
	c := New(Options{})
	defer c.Close()
	sp := spec(TCP)
	sp.Fall = 10
	tg := Target{Addr: s.addr, Spec: sp}
	c.SetTargets([]Target{tg})
	c.WaitChecked(context.Background(), []Target{tg})
	if st, _ := c.Status(tg); st.Result != Failing || st.Failures != 1 {
		t.Errorf("after one failed check: %+v, want failing", st)
	}
}

// TestHTTP: the request carries the path and Host header; a status other
// than the expected one fails, with what was answered.
func TestHTTP(t *testing.T) {
	s := newServer(t)
	c := New(Options{})
	defer c.Close()
	sp := spec(HTTP)
	sp.Path, sp.Host, sp.ExpectStatus, sp.Fall = "/healthz", "svc.example", 204, 1
	tg := Target{Addr: s.addr, Spec: sp}
	c.SetTargets([]Target{tg})
	st := waitResult(t, c, tg, Failing, time.Second)
	if st.Last != "HTTP 200, want 204" {
		t.Errorf("last result %q", st.Last)
	}
	if h, p := <-s.hosts, <-s.paths; h != "svc.example" || p != "/healthz" {
		t.Errorf("request for %s%s, want svc.example/healthz", h, p)
	}
	s.status.Store(204)
	st = waitResult(t, c, tg, Passing, time.Second)
	if !strings.HasPrefix(st.Last, "HTTP 204 in ") {
		t.Errorf("last result %q", st.Last)
	}

	// Default Host: the backend's address.
	def := Target{Addr: s.addr, Spec: spec(HTTP)}
	c.SetTargets([]Target{def})
	for len(s.hosts) > 0 {
		<-s.hosts
	}
	c.WaitChecked(context.Background(), []Target{def})
	if h := <-s.hosts; h != s.addr.String() {
		t.Errorf("default Host %q, want %s", h, s.addr)
	}
}

// TestTimeout: a server that accepts but answers too late fails the
// check within its timeout.
func TestTimeout(t *testing.T) {
	s := newServer(t)
	s.delay.Store(int64(time.Second))
	c := New(Options{})
	defer c.Close()
	tg := Target{Addr: s.addr, Spec: spec(HTTP)}
	start := time.Now()
	c.SetTargets([]Target{tg})
	c.WaitChecked(context.Background(), []Target{tg})
	st, _ := c.Status(tg)
	if st.Result != Failing || st.Last != "timed out after 200ms" {
		t.Errorf("%+v, want failing: timed out after 200ms", st)
	}
	if d := time.Since(start); d > 700*time.Millisecond {
		t.Errorf("the first check took %s, timeout 200ms", d)
	}
}

// TestConcurrency: checks of many targets never run more than
// Concurrency at once.
func TestConcurrency(t *testing.T) {
	s := newServer(t)
	s.delay.Store(int64(20 * time.Millisecond))
	const limit = 3
	c := New(Options{Concurrency: limit})
	defer c.Close()
	var ts []Target
	for i := 0; i < 12; i++ {
		sp := spec(HTTP)
		sp.Path = fmt.Sprintf("/%d", i) // twelve targets on one server
		ts = append(ts, Target{Addr: s.addr, Spec: sp})
	}
	c.SetTargets(ts)
	c.WaitChecked(context.Background(), ts)
	time.Sleep(300 * time.Millisecond)
	if p := s.peak.Load(); p > limit || p < 2 {
		t.Errorf("at most %d checks at once, want 2..%d", p, limit)
	}
	for _, tg := range ts {
		if st, _ := c.Status(tg); st.Result != Passing {
			t.Errorf("%s: %+v", tg.Spec.Path, st)
		}
	}
}

// TestReservedPorts: checks never use a local port Reserved says the data
// path takes, and say so when every ephemeral port is.
func TestReservedPorts(t *testing.T) {
	s := newServer(t)
	c := New(Options{Concurrency: 8, Reserved: func(l netip.AddrPort) bool { return l.Port()%4 != 1 }})
	defer c.Close()
	var ts []Target
	for i := 0; i < 20; i++ {
		sp := spec(TCP)
		sp.Rise = i + 1 // twenty targets on one server
		ts = append(ts, Target{Addr: s.addr, Spec: sp})
	}
	c.SetTargets(ts)
	c.WaitChecked(context.Background(), ts)
	time.Sleep(200 * time.Millisecond)
	c.SetTargets(nil)
	n := 0
	for len(s.ports) > 0 {
		if p := <-s.ports; p%4 != 1 {
			t.Errorf("a check came from reserved port %d", p)
		}
		n++
	}
	if n < 20 {
		t.Errorf("%d checks seen, want at least 20", n)
	}

	all := New(Options{Reserved: func(netip.AddrPort) bool { return true }})
	defer all.Close()
	tg := Target{Addr: s.addr, Spec: spec(TCP)}
	all.SetTargets([]Target{tg})
	all.WaitChecked(context.Background(), []Target{tg})
	if st, _ := all.Status(tg); st.Result != Failing || !strings.Contains(st.Last, "no local port on 127.0.0.1") {
		t.Errorf("every port reserved: %+v", st)
	}
}

// TestSetTargets: a target that goes is forgotten and no longer checked;
// Close stops everything.
func TestSetTargets(t *testing.T) {
	s := newServer(t)
	c := New(Options{})
	tg := Target{Addr: s.addr, Spec: spec(TCP)}
	c.SetTargets([]Target{tg})
	c.WaitChecked(context.Background(), []Target{tg})
	c.SetTargets(nil)
	if _, ok := c.Status(tg); ok {
		t.Error("a removed target still has a status")
	}
	time.Sleep(100 * time.Millisecond)
	for len(s.ports) > 0 {
		<-s.ports
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(s.ports); n != 0 {
		t.Errorf("%d checks of a removed target", n)
	}
	c.SetTargets([]Target{tg})
	done := make(chan struct{})
	go func() {
		c.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not return")
	}
}
