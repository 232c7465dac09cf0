// Package health checks backends from the host's own network stack: a TCP
// connect, or an HTTP GET whose status code must match, every interval, each
// within its timeout, with at most Options.Concurrency checks in flight.
//
// A target (a backend's address with its check) starts Unchecked and is
// checked at once; its first result makes it Passing or Failing. After that
// it takes Fall failed checks in a row to become Failing and Rise passed
// checks in a row to become Passing again. Every change of verdict is
// logged and reported through Options.OnChange.
//
// Checks choose their own local port, among the kernel's ephemeral ports
// (net.ipv4.ip_local_port_range) that Options.Reserved leaves free: replies
// to a local address and port the data path takes for its own (a source
// address's source-port range, a VIP) would never reach the checker.
package health

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/xlb-project/xlb/internal/host"
)

// Check kinds.
const (
	TCP  = "tcp"
	HTTP = "http"
)

// Spec is a backend's check. It is comparable: a target is a backend
// address with its Spec.
type Spec struct {
	Check    string // TCP or HTTP
	Interval time.Duration
	Timeout  time.Duration
	Rise     int
	Fall     int
	// HTTP: the request's path and Host header ("" means the backend's
	// IP:PORT), and the status code that passes.
	Path         string
	Host         string
	ExpectStatus int
}

// Target is a backend address checked with a Spec.
type Target struct {
	Addr netip.AddrPort
	Spec Spec
}

func (t Target) String() string { return t.Spec.Check + " " + t.Addr.String() }

// Result is a target's verdict.
type Result int

// The verdicts.
const (
	Unchecked Result = iota // no check has finished yet
	Passing
	Failing
)

func (r Result) String() string {
	switch r {
	case Passing:
		return "passing"
	case Failing:
		return "failing"
	}
	return "unchecked"
}

// Status is what the Checker knows of a target.
type Status struct {
	Result Result
	// Last says what the last check found: "connected in 1.2ms", "HTTP
	// 200 in 3ms", "connect: connection refused", "HTTP 503, want 200".
	Last   string
	LastAt time.Time // when the last check finished
	Since  time.Time // when Result last changed, or the target was added
	// Checks in a row that passed, failed.
	Passes, Failures int
}

// Options configure a Checker.
type Options struct {
	// Concurrency bounds the checks in flight; 1 when 0.
	Concurrency int
	// Reserved reports whether the data path takes packets to this local
	// address and port for its own; checks never use such a port.
	Reserved func(local netip.AddrPort) bool
	// Logger receives every change of verdict. Nil discards them.
	Logger *slog.Logger
	// OnChange is called after a target's verdict changed, with no lock
	// of the Checker held.
	OnChange func()
}

// Checker runs the checks of a set of targets, each on its own goroutine,
// from New until Close. Its methods are safe for concurrent use.
type Checker struct {
	opts Options
	log  *slog.Logger
	sem  chan struct{}
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu      sync.Mutex
	targets map[Target]*target
}

type target struct {
	cancel  context.CancelFunc
	st      Status
	checked chan struct{} // closed after the first check
}

// New returns a Checker with no targets.
func New(opts Options) *Checker {
	if opts.Concurrency <= 0 {
		opts.Concurrency = 1
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Reserved == nil {
		opts.Reserved = func(netip.AddrPort) bool { return false }
	}
	ctx, stop := context.WithCancel(context.Background())
	return &Checker{opts: opts, log: opts.Logger, sem: make(chan struct{}, opts.Concurrency), ctx: ctx, stop: stop,
		targets: make(map[Target]*target)}
}

// Close stops every check and waits for them to end.
func (c *Checker) Close() error {
	c.stop()
	c.wg.Wait()
	return nil
}

// SetTargets makes the Checker check exactly these targets: new ones are
// checked at once, and targets that go are forgotten.
func (c *Checker) SetTargets(ts []Target) {
	want := make(map[Target]bool, len(ts))
	for _, t := range ts {
		want[t] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for t, tg := range c.targets {
		if !want[t] {
			tg.cancel()
			delete(c.targets, t)
		}
	}
	for t := range want {
		if _, ok := c.targets[t]; ok || c.ctx.Err() != nil {
			continue
		}
		ctx, cancel := context.WithCancel(c.ctx)
		tg := &target{cancel: cancel, st: Status{Since: time.Now()}, checked: make(chan struct{})}
		c.targets[t] = tg
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.run(ctx, t, tg)
		}()
	}
}

// Status returns what the Checker knows of t; false when t is not a
// target.
func (c *Checker) Status(t Target) (Status, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	tg, ok := c.targets[t]
	if !ok {
		return Status{}, false
	}
	return tg.st, true
}

// WaitChecked waits until each of ts that is a target has finished its
// first check, or ctx ends.
func (c *Checker) WaitChecked(ctx context.Context, ts []Target) {
	var chans []chan struct{}
	c.mu.Lock()
	for _, t := range ts {
		if tg, ok := c.targets[t]; ok {
			chans = append(chans, tg.checked)
		}
	}
	c.mu.Unlock()
	for _, ch := range chans {
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
}

// run checks t at once, then every interval, until ctx ends. The first
// wait after the first check is random within the interval, so that
// targets added together are not checked together ever after.
func (c *Checker) run(ctx context.Context, t Target, tg *target) {
	wait := time.Duration(0)
	for first := true; ; first = false {
		if wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		select {
		case <-ctx.Done():
			return
		case c.sem <- struct{}{}:
		}
		start := time.Now()
		ok, what := c.check(ctx, t)
		<-c.sem
		if ctx.Err() != nil {
			return
		}
		c.record(t, tg, ok, what, start)
		wait = t.Spec.Interval
		if first {
			close(tg.checked)
			wait = time.Duration(rand.Int64N(int64(t.Spec.Interval))) + 1
		}
	}
}

// record applies a check's result to the target's verdict.
func (c *Checker) record(t Target, tg *target, ok bool, what string, at time.Time) {
	c.mu.Lock()
	if c.targets[t] != tg {
		c.mu.Unlock()
		return // no longer a target
	}
	st := &tg.st
	before := st.Result
	st.Last, st.LastAt = what, time.Now()
	if ok {
		st.Passes++
		st.Failures = 0
		if st.Result == Unchecked || (st.Result == Failing && st.Passes >= t.Spec.Rise) {
			st.Result = Passing
		}
	} else {
		st.Failures++
		st.Passes = 0
		if st.Result == Unchecked || (st.Result == Passing && st.Failures >= t.Spec.Fall) {
			st.Result = Failing
		}
	}
	changed := st.Result != before
	if changed {
		st.Since = at
	}
	snap := *st
	c.mu.Unlock()
	if !changed {
		return
	}
	attrs := []any{"backend", t.Addr.String(), "check", t.Spec.Check, "result", snap.Last}
	switch {
	case snap.Result == Failing:
		c.log.Warn("health check failing", append(attrs, "failures", snap.Failures, "was", before.String())...)
	case before == Unchecked:
		c.log.Info("health check passing", attrs...)
	default:
		c.log.Info("health check passing again", append(attrs, "passes", snap.Passes)...)
	}
	if c.opts.OnChange != nil {
		c.opts.OnChange()
	}
}

// check runs one check within the target's timeout, and says what it
// found.
func (c *Checker) check(ctx context.Context, t Target) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, t.Spec.Timeout)
	defer cancel()
	start := time.Now()
	conn, err := c.dial(ctx, t.Addr)
	if err != nil {
		return false, describe(err, t.Spec.Timeout)
	}
	defer func() {
		// Close with a RST, as health checkers do: no TIME_WAIT on this
		// side for a port chosen by hand.
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		conn.Close()
	}()
	if t.Spec.Check != HTTP {
		return true, "connected in " + roundDuration(time.Since(start))
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	host := t.Spec.Host
	if host == "" {
		host = t.Addr.String()
	}
	path := t.Spec.Path
	if path == "" {
		path = "/"
	}
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: xlb-health-check\r\nConnection: close\r\n\r\n", path, host); err != nil {
		return false, describe(err, t.Spec.Timeout)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return false, describe(err, t.Spec.Timeout)
	}
	resp.Body.Close()
	want := t.Spec.ExpectStatus
	if want == 0 {
		want = http.StatusOK
	}
	if resp.StatusCode != want {
		return false, fmt.Sprintf("HTTP %d, want %d", resp.StatusCode, want)
	}
	return true, fmt.Sprintf("HTTP %d in %s", resp.StatusCode, roundDuration(time.Since(start)))
}

// dial connects to dst from the source address the kernel would choose,
// on a local port that is not Reserved.
func (c *Checker) dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	src, err := sourceFor(dst)
	if err != nil {
		return nil, err
	}
	lo, hi, err := host.EphemeralPorts()
	if err != nil {
		return nil, err
	}
	const tries = 32
	for i := 0; i < tries; i++ {
		port, ok := c.pickPort(src, lo, hi)
		if !ok {
			return nil, fmt.Errorf("no local port on %s: the kernel's ephemeral ports %d-%d are all among the data path's (source-ports, VIPs)", src, lo, hi)
		}
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, port))}
		conn, err := d.DialContext(ctx, "tcp", dst.String())
		if errors.Is(err, syscall.EADDRINUSE) || errors.Is(err, syscall.EADDRNOTAVAIL) {
			continue
		}
		return conn, err
	}
	return nil, fmt.Errorf("no free local port on %s after %d tries", src, tries)
}

// pickPort chooses a random port of lo-hi that is not Reserved on src; it
// scans from there when the random one is.
func (c *Checker) pickPort(src netip.Addr, lo, hi uint16) (uint16, bool) {
	n := int(hi) - int(lo) + 1
	start := rand.IntN(n)
	for i := 0; i < n; i++ {
		p := uint16(int(lo) + (start+i)%n)
		if !c.opts.Reserved(netip.AddrPortFrom(src, p)) {
			return p, true
		}
	}
	return 0, false
}

// sourceFor returns the local address the kernel would send from to dst
// (a connected UDP socket sends nothing).
func sourceFor(dst netip.AddrPort) (netip.Addr, error) {
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to %s: %w", dst, err)
	}
	defer conn.Close()
	return conn.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), nil
}

// describe turns a check's error into a short line for status and logs.
func describe(err error, timeout time.Duration) string {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return "timed out after " + timeout.String()
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		var se *os.SyscallError
		if errors.As(oe.Err, &se) {
			return oe.Op + ": " + se.Err.Error()
		}
		return oe.Op + ": " + oe.Err.Error()
	}
	return err.Error()
}

func roundDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(time.Microsecond).String()
}
