package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	controlpb "github.com/xlb-project/xlb/internal/control/proto"
	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/vipfilter"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// Restarts, upgrades and crashes under traffic: every case keeps
// streamConns long-lived connections streaming both ways through xlb while
// new connections arrive at newPerSec, and counts broken connections and
// failed requests.

const (
	streamPort  = 7000 // the backends' echo service, and its VIP port
	streamConns = 30
	newPerSec   = 20
	// streamStall is how long a long-lived connection may go without an
	// echo before it counts as broken.
	streamStall = 5 * time.Second
)

// serveEcho serves TCP echo on host h's port: every byte a client sends
// comes back.
func serveEcho(t testing.TB, h *testnet.Host, port int) {
	t.Helper()
	serveEchoAt(t, h, addr(h, port))
}

// serveEchoAt is serveEcho on another address of h (its IPv6 one).
func serveEchoAt(t testing.TB, h *testnet.Host, at string) {
	t.Helper()
	l, err := h.NS.Listen("tcp", at)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
}

// stream is one long-lived connection of the traffic.
type stream struct {
	from string // client and local address
	mu   sync.Mutex
	msgs int
	last time.Time // of the last echo that came back right
	err  error     // why it broke; nil while it streams
}

// traffic is the load every case runs.
type traffic struct {
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	streams []*stream
	mu      sync.Mutex
	reqs    []attempt
}

// startTraffic opens streamConns connections from the clients to
// vip:streamPort, each sending a 256-byte message every 20 ms and checking
// its echo, and makes newPerSec new HTTP connections per second to vip:80.
// It fails the test if a long-lived connection cannot be opened.
func startTraffic(t *testing.T, clients []*testnet.Host, vip netip.Addr) *traffic {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tr := &traffic{cancel: cancel}
	t.Cleanup(func() { tr.stop() })
	for i := range streamConns {
		h := clients[i%len(clients)]
		dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := h.NS.Dial(dctx, "tcp", netip.AddrPortFrom(vip, streamPort).String())
		dcancel()
		if err != nil {
			t.Fatalf("open long-lived connection %d: %v", i, err)
		}
		s := &stream{from: h.Name + " " + conn.LocalAddr().String(), last: time.Now()}
		tr.streams = append(tr.streams, s)
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			defer conn.Close()
			tr.runStream(ctx, conn, s, uint64(i))
		}()
	}
	url := "http://" + netip.AddrPortFrom(vip, 80).String() + "/"
	httpClients := make([]*http.Client, len(clients))
	for i, h := range clients {
		httpClients[i] = h.NS.HTTPClient(false)
		httpClients[i].Timeout = 5 * time.Second
	}
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		tick := time.NewTicker(time.Second / newPerSec)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			c := httpClients[i%len(httpClients)]
			tr.wg.Add(1)
			go func() {
				defer tr.wg.Done()
				start := time.Now()
				b, err := testnet.Get(context.Background(), c, url)
				if err != nil && ctx.Err() != nil {
					return // stopped meanwhile
				}
				tr.mu.Lock()
				tr.reqs = append(tr.reqs, attempt{start: start, took: time.Since(start), backend: b, err: err})
				tr.mu.Unlock()
			}()
		}
	}()
	return tr
}

func (tr *traffic) runStream(ctx context.Context, conn net.Conn, s *stream, id uint64) {
	out := make([]byte, 256)
	in := make([]byte, 256)
	for seq := uint64(0); ctx.Err() == nil; seq++ {
		binary.BigEndian.PutUint64(out[0:], id)
		binary.BigEndian.PutUint64(out[8:], seq)
		for i := 16; i < len(out); i++ {
			out[i] = byte(seq) + byte(i)
		}
		err := conn.SetDeadline(time.Now().Add(streamStall))
		if err == nil {
			_, err = conn.Write(out)
		}
		if err == nil {
			_, err = io.ReadFull(conn, in)
		}
		if err == nil && !bytes.Equal(in, out) {
			err = fmt.Errorf("message %d came back changed", seq)
		}
		if err != nil {
			if ctx.Err() == nil {
				s.mu.Lock()
				s.err = err
				s.mu.Unlock()
			}
			return
		}
		s.mu.Lock()
		s.msgs++
		s.last = time.Now()
		s.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop ends the traffic.
func (tr *traffic) stop() {
	tr.cancel()
	tr.wg.Wait()
}

// broken lists the long-lived connections that broke.
func (tr *traffic) broken() []string {
	var out []string
	for _, s := range tr.streams {
		s.mu.Lock()
		if s.err != nil {
			out = append(out, fmt.Sprintf("%s: %v", s.from, s.err))
		}
		s.mu.Unlock()
	}
	return out
}

// attempts returns the new connections made so far.
func (tr *traffic) attempts() []attempt {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return slices.Clone(tr.reqs)
}

// check stops the traffic and fails the test for any broken connection,
// any failed request, and any long-lived connection that sent nothing
// after since.
func (tr *traffic) check(t *testing.T, what string, since time.Time) {
	t.Helper()
	tr.stop()
	broken := tr.broken()
	reqs := tr.attempts()
	var failed []string
	var worst time.Duration
	for _, a := range reqs {
		worst = max(worst, a.took)
		if a.err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", a.start.Format("15:04:05.000"), a.err))
		}
	}
	msgs, stale := 0, 0
	for _, s := range tr.streams {
		s.mu.Lock()
		msgs += s.msgs
		if s.err == nil && !s.last.After(since) {
			stale++
		}
		s.mu.Unlock()
	}
	t.Logf("%s: %d long-lived connections, %d broken, %d messages echoed; %d new connections, %d failed, slowest %v",
		what, len(tr.streams), len(broken), msgs, len(reqs), len(failed), worst)
	for i, b := range broken {
		if i == 5 {
			t.Errorf("... and %d more broken", len(broken)-5)
			break
		}
		t.Errorf("%s: broken: %s", what, b)
	}
	for i, f := range failed {
		if i == 5 {
			t.Errorf("... and %d more failed", len(failed)-5)
			break
		}
		t.Errorf("%s: failed request at %s", what, f)
	}
	if stale > 0 {
		t.Errorf("%s: %d long-lived connections echoed nothing after %s", what, stale, since.Format("15:04:05.000"))
	}
	if len(reqs) < 10 {
		t.Errorf("%s: only %d new connections made", what, len(reqs))
	}
}

// restartTopo is configTopo with the echo service on every backend and a
// VIP that xlbd adds to the interface, streamPort and 80 on it.
type restartTopo struct {
	*configTopo
	vipAddr netip.Addr
	pin     string
	yaml    string
}

func newRestartTopo(t *testing.T, extraYAML string) *restartTopo {
	t.Helper()
	ct := newConfigTopo(t, "native")
	rt := &restartTopo{configTopo: ct, vipAddr: ct.lan.AddrInSubnet(100), pin: xlbtest.NewPinPath()}
	for _, h := range []*testnet.Host{ct.ba, ct.bb, ct.bc} {
		serveEcho(t, h, streamPort)
	}
	rt.yaml = fmt.Sprintf("iface: eth0\npin-path: %s\n%sservices:\n  - vip: %s:80\n    backends: [%s, %s]\n  - vip: %s:%d\n    policy: least-conn\n    backends: [%s, %s]\n",
		rt.pin, extraYAML, rt.vipAddr, addr(ct.ba, backendPort), addr(ct.bb, backendPort),
		rt.vipAddr, streamPort, addr(ct.ba, streamPort), addr(ct.bb, streamPort))
	return rt
}

// startXlbd starts an xlbd (binary, or the one built from this tree when
// "") with the topology's configuration and pin path.
func (rt *restartTopo) startXlbd(t *testing.T) {
	t.Helper()
	rt.start(t, rt.yaml)
}

// xlbctl runs xlbctl against the running xlbd.
func (rt *restartTopo) xlbctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(rt.d.Dir, "xlbctl"), append([]string{"--socket", rt.d.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// waitExit waits for xlbd to exit and returns its error.
func waitExit(t *testing.T, d *xlbtest.Daemon, within time.Duration) error {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if done, err := d.Exited(); done {
			return err
		}
		if time.Now().After(deadline) {
			t.Fatalf("xlbd still running after %v", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pluginPids are the policy plugins' pids in a status.
func pluginPids(st *controlpb.Status) []int {
	var out []int
	for _, p := range st.GetPolicies() {
		if p.GetPid() > 0 {
			out = append(out, int(p.GetPid()))
		}
	}
	return out
}

// waitGone waits until every process of pids has exited.
func waitGone(t *testing.T, pids []int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, pid := range pids {
		for !xlbtest.ProcessGone(pid) {
			if time.Now().After(deadline) {
				t.Errorf("plugin process %d still runs %v after xlbd stopped", pid, within)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// backendIDs maps "vip backend" to its backend id in a status.
func backendIDs(st *controlpb.Status) map[string]uint32 {
	out := map[string]uint32{}
	for _, s := range st.GetServices() {
		for _, b := range s.GetBackends() {
			out[s.GetVip()+" "+b.GetAddress()] = b.GetId()
		}
	}
	return out
}

// activeSum is the open connections over every backend in a status.
func activeSum(st *controlpb.Status) int64 {
	var n int64
	for _, s := range st.GetServices() {
		for _, b := range s.GetBackends() {
			n += b.GetActive()
		}
	}
	return n
}

// TestRestartKeepDatapath stops xlbd with `xlbctl shutdown --keep-datapath`
// under traffic, checks that the data path stayed (link, pins, addresses)
// while the plugins went, starts a new xlbd on the same pin path and checks
// that it adopted everything: same backend ids, the connections counted,
// the secrets (long-lived connections keep their sequence translation). No
// connection breaks, no request fails.
func TestRestartKeepDatapath(t *testing.T) {
	rt := newRestartTopo(t, fmt.Sprintf("chain:\n  - {name: filter, object: %s, program: xdpfilt_alw_ip}\n", xdpFilterIP))
	rt.startXlbd(t)
	// The chain member's state: backend-c, no backend of these services,
	// is denied by xdp-filter.
	filterMap := filepath.Join(rt.pin, "chain", "filter", "filter_ipv4")
	denyClient2(t, filterMap, rt.bc)
	filterID := xlbtest.PinnedMapID(t, filterMap)
	if got := dialResult(rt.bc, netip.AddrPortFrom(rt.vipAddr, 80)); got == "connected" {
		t.Fatalf("backend-c reaches the VIP through the filter")
	}
	tr := startTraffic(t, []*testnet.Host{rt.c1, rt.c2}, rt.vipAddr)
	time.Sleep(2 * time.Second)
	ctx := context.Background()
	before, err := rt.d.Client().Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if before.GetState().GetAdopted() != nil || before.GetState().GetPinPath() != rt.pin {
		t.Fatalf("first xlbd's state: %+v, want a fresh start pinned at %s", before.GetState(), rt.pin)
	}
	first := rt.d
	_, after := rt.restartKeeping(t, func() {
		waitGone(t, pluginPids(before), 3*time.Second)
		for _, pin := range []string{"xlb_link", "xlb_conns", "xlb_progs", "xlb_layout", "xlb_host"} {
			if _, err := os.Stat(filepath.Join(rt.pin, pin)); err != nil {
				t.Errorf("pin %s: %v", pin, err)
			}
		}
	})
	a := after.GetState().GetAdopted()
	if a == nil || a.GetServices() != 2 || a.GetConnections() < streamConns {
		t.Errorf("second xlbd adopted %+v, want 2 services and at least %d connections", a, streamConns)
	}
	if b, a := backendIDs(before), backendIDs(after); !mapsEqual(b, a) {
		t.Errorf("backend ids before %v, after %v", b, a)
	}
	if n := activeSum(after); n < streamConns {
		t.Errorf("%d active connections counted after the restart, want at least %d", n, streamConns)
	}
	if !strings.Contains(rt.d.Output(), "adopted the pinned state") || strings.Contains(first.Output(), "adopted the pinned state") {
		t.Errorf("logs do not say which xlbd adopted")
	}
	if out, err := rt.xlbctl(t, "status"); err != nil || !strings.Contains(out, "state pinned at "+rt.pin+" (layout ") ||
		!strings.Contains(out, "adopted at start: 2 services, 4 backend ids (0 retired)") {
		t.Errorf("xlbctl status after the restart: %v\n%s", err, out)
	} else {
		t.Logf("xlbctl status after the restart:\n%s", out)
	}
	if id := xlbtest.PinnedMapID(t, filterMap); id != filterID {
		t.Errorf("chain member's map is %d after the restart, was %d: not adopted", id, filterID)
	}
	if got := dialResult(rt.bc, netip.AddrPortFrom(rt.vipAddr, 80)); got == "connected" {
		t.Errorf("backend-c reaches the VIP after the restart: the filter's rule is gone")
	}
	time.Sleep(2 * time.Second)

	// Again, stopped with SIGUSR2 this time, adopting what an adopting
	// xlbd left.
	second := rt.d
	if err := second.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	if err := waitExit(t, second, 5*time.Second); err != nil {
		t.Errorf("xlbd exited with %v after SIGUSR2, want status 0", err)
	}
	if xdpProgID(t, rt.lb) == 0 {
		t.Fatalf("no XDP program after SIGUSR2")
	}
	rt.startXlbd(t)
	ready := time.Now()
	if st, err := rt.d.Client().Status(ctx); err != nil || st.GetState().GetAdopted() == nil || !mapsEqual(backendIDs(before), backendIDs(st)) {
		t.Errorf("after the second restart: %v, adopted %+v, backend ids %v, want %v", err, st.GetState().GetAdopted(), backendIDs(st), backendIDs(before))
	}
	time.Sleep(3 * time.Second)
	tr.check(t, "two restarts keeping the data path", ready)
	c := rt.counters(t)
	for _, name := range []string{"reset_no_conn", "drop_no_conn", "drop_stale"} {
		if v, ok := c[name]; !ok || v != 0 {
			t.Errorf("counter %s: %d (known: %v)", name, v, ok)
		}
	}
}

// restartKeeping stops the running xlbd with `xlbctl shutdown
// --keep-datapath`, checks that it exits with status 0 and leaves the host
// as it was (link, addresses, forwarding), runs whileStopped (if not nil),
// lets the traffic run 1 s with no daemon, and starts a new xlbd. It
// returns when that one is ready, with its status.
func (rt *restartTopo) restartKeeping(t *testing.T, whileStopped func()) (time.Time, *controlpb.Status) {
	t.Helper()
	running := lbState(t, rt.lb)
	out, err := rt.xlbctl(t, "shutdown", "--keep-datapath")
	if err != nil {
		t.Fatalf("xlbctl shutdown --keep-datapath: %v\n%s", err, out)
	}
	stopped := time.Now()
	if err := waitExit(t, rt.d, 5*time.Second); err != nil {
		t.Errorf("xlbd exited with %v, want status 0", err)
	}
	t.Logf("xlbctl: %s", strings.TrimSpace(out))
	if now := lbState(t, rt.lb); !now.equal(running) {
		t.Errorf("host while no xlbd runs:\n  %v\nwhile it ran:\n  %v", now, running)
	}
	if whileStopped != nil {
		whileStopped()
	}
	time.Sleep(time.Second) // traffic with no daemon
	rt.startXlbd(t)
	ready := time.Now()
	t.Logf("restart: %v from the shutdown to the new xlbd ready (1 s of it waiting on purpose)", ready.Sub(stopped))
	st, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ready, st
}

// TestRestartIPv6 restarts xlbd with --keep-datapath while an IPv6
// service (its VIP a /128 xlbd added, its source address the
// interface's IPv6 one) and an IPv4 one each carry the traffic of every
// case: the new xlbd adopts both families' services, backend ids and
// connections, keeps the IPv6 VIP and forwarding as they were, and no
// connection of either family breaks, no request fails. SIGTERM then
// removes everything, the IPv6 VIP and forwarding included.
func TestRestartIPv6(t *testing.T) {
	rt := newRestartTopo(t, "")
	vip6 := rt.lan.AddrInSubnet6(100)
	for _, h := range []*testnet.Host{rt.ba, rt.bb} {
		h.NS.ServeHTTP(t, netip.AddrPortFrom(h.IP6, backendPort).String(), h.Name+"-v6")
		serveEchoAt(t, h, netip.AddrPortFrom(h.IP6, streamPort).String())
	}
	rt.yaml += fmt.Sprintf("  - vip: \"%s\"\n    backends: [\"%s\", \"%s\"]\n  - vip: \"%s\"\n    policy: least-conn\n    backends: [\"%s\", \"%s\"]\n",
		netip.AddrPortFrom(vip6, 80), netip.AddrPortFrom(rt.ba.IP6, backendPort), netip.AddrPortFrom(rt.bb.IP6, backendPort),
		netip.AddrPortFrom(vip6, streamPort), netip.AddrPortFrom(rt.ba.IP6, streamPort), netip.AddrPortFrom(rt.bb.IP6, streamPort))
	before := lbState(t, rt.lb)
	rt.startXlbd(t)
	running := lbState(t, rt.lb)
	if !slices.Contains(running.Addrs, vip6.String()+"/128") || running.Forward6 != "1" {
		t.Fatalf("while running: %v; want %s/128 added and IPv6 forwarding on", running, vip6)
	}
	clients := []*testnet.Host{rt.c1, rt.c2}
	tr6 := startTraffic(t, clients, vip6)
	tr4 := startTraffic(t, clients, rt.vipAddr)
	time.Sleep(2 * time.Second)
	st, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ready, after := rt.restartKeeping(t, nil)
	if a := after.GetState().GetAdopted(); a == nil || a.GetServices() != 4 || a.GetConnections() < 2*streamConns {
		t.Errorf("adopted %+v, want 4 services and at least %d connections", a, 2*streamConns)
	}
	if b, a := backendIDs(st), backendIDs(after); !mapsEqual(b, a) || len(a) != 8 {
		t.Errorf("backend ids before %v, after %v", b, a)
	}
	if !slices.Equal(st.GetSourceAddresses(), after.GetSourceAddresses()) || !slices.Contains(after.GetSourceAddresses(), rt.lb.IP6.String()) {
		t.Errorf("source addresses %v after the restart, %v before; want the interface's IPv6 %s among them", after.GetSourceAddresses(), st.GetSourceAddresses(), rt.lb.IP6)
	}
	if now := lbState(t, rt.lb); !now.equal(running) {
		t.Errorf("host after the restart:\n  %v\nbefore:\n  %v", now, running)
	}
	time.Sleep(3 * time.Second)
	tr6.check(t, "IPv6, a restart keeping the data path", ready)
	tr4.check(t, "IPv4 beside it", ready)
	if err := rt.d.Stop(); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	if now := lbState(t, rt.lb); !now.equal(before) {
		t.Errorf("host after SIGTERM:\n  %v\nbefore xlbd started:\n  %v", now, before)
	}
	if left := xlbtest.LeftPins(rt.pin); left != nil {
		t.Errorf("pins after SIGTERM: %v", left)
	}
}

// xdpProgID is the id of the XDP program attached to host h's interface,
// 0 when there is none.
func xdpProgID(t *testing.T, h *testnet.Host) uint32 { return h.NS.XDPProgram(t, h.Iface) }

// TestCrashRecovery kills xlbd with SIGKILL under traffic: the data path
// keeps forwarding, established and new connections, with the tables in
// force; the plugins die with xlbd. A new xlbd started 5 s later adopts
// it all. Nothing breaks, nothing fails.
func TestCrashRecovery(t *testing.T) {
	rt := newRestartTopo(t, "")
	rt.startXlbd(t)
	tr := startTraffic(t, []*testnet.Host{rt.c1, rt.c2}, rt.vipAddr)
	time.Sleep(2 * time.Second)
	before, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	running := lbState(t, rt.lb)
	prog := xdpProgID(t, rt.lb)
	if err := rt.d.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitExit(t, rt.d, 5*time.Second)
	killed := time.Now()
	waitGone(t, pluginPids(before), 2*time.Second)
	if now := lbState(t, rt.lb); !now.equal(running) || xdpProgID(t, rt.lb) != prog {
		t.Errorf("host after kill -9:\n  %v (program %d)\nwhile xlbd ran:\n  %v (program %d)", now, xdpProgID(t, rt.lb), running, prog)
	}
	time.Sleep(5 * time.Second)
	restarting := time.Now()
	rt.startXlbd(t)
	ready := time.Now()
	t.Logf("new xlbd ready %v after it started", ready.Sub(restarting))
	served, failed := 0, 0
	for _, a := range tr.attempts() {
		if a.start.After(killed) && a.start.Before(restarting) {
			if a.err == nil {
				served++
			} else {
				failed++
			}
		}
	}
	t.Logf("while no xlbd ran (%v): %d new connections served, %d failed", restarting.Sub(killed), served, failed)
	if served < 4*newPerSec || failed > 0 {
		t.Errorf("while no xlbd ran: %d new connections served, %d failed; want about %d served, none failed", served, failed, 5*newPerSec)
	}
	after, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if a := after.GetState().GetAdopted(); a == nil || a.GetConnections() < streamConns {
		t.Errorf("new xlbd adopted %+v, want at least %d connections", a, streamConns)
	}
	if b, a := backendIDs(before), backendIDs(after); !mapsEqual(b, a) {
		t.Errorf("backend ids before %v, after %v", b, a)
	}
	if now := xdpProgID(t, rt.lb); now == prog || now == 0 {
		t.Errorf("xdp program %d after the restart, was %d: not replaced", now, prog)
	}
	time.Sleep(3 * time.Second)
	tr.check(t, "kill -9, then a new xlbd 5 s later", ready)
}

// buildVariant builds xlbd from a copy of this module changed by edit
// (paths relative to the module root), regenerating the BPF object with
// bpf2go: another build, as an upgrade brings.
func buildVariant(t *testing.T, name string, edit func(root string) error) string {
	t.Helper()
	root, err := xlbtest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tarOut := exec.Command("tar", "-C", root, "--exclude=./.git", "--exclude=./bin", "-cf", "-", ".")
	tarIn := exec.Command("tar", "-C", dir, "-xf", "-")
	pipe, err := tarOut.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	tarIn.Stdin = pipe
	if err := tarIn.Start(); err != nil {
		t.Fatal(err)
	}
	if err := tarOut.Run(); err != nil {
		t.Fatalf("copy module: %v", err)
	}
	if err := tarIn.Wait(); err != nil {
		t.Fatalf("copy module: %v", err)
	}
	if err := edit(dir); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"generate", "./dispatcher/"}, {"build", "-o", "xlbd-" + name, "./cmd/xlbd"}} {
		cmd := exec.Command("go", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %v in the %s copy: %v\n%s", args, name, err, out)
		}
	}
	return filepath.Join(dir, "xlbd-"+name)
}

// appendTo appends text to the file at path.
func appendTo(path, text string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// programNamed tells whether a BPF program of that name is loaded.
func programNamed(t *testing.T, name string) bool {
	t.Helper()
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			return false
		}
		id = next
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		info, err := p.Info()
		p.Close()
		if err == nil && info.Name == name {
			return true
		}
	}
}

// TestUpgrade replaces a running xlbd with a build of other code and the
// same layout, under traffic: the new build adopts the pinned state and
// its programs replace the old ones in the link, nothing breaks. A build
// whose layout differs (a field added to struct xlb_backend) is refused
// with the documented message, and changes nothing.
func TestUpgrade(t *testing.T) {
	testnet.RequirePrivileged(t)
	const marker = "xlb_v2_marker"
	upgrade := buildVariant(t, "upgrade", func(root string) error {
		return appendTo(filepath.Join(root, "programs/xlb.c"),
			"\n/* A program only this build has, to tell its programs loaded. */\nSEC(\"xdp\") int "+marker+"(struct xdp_md *ctx) { return XDP_PASS; }\n")
	})
	changed := buildVariant(t, "layout", func(root string) error {
		path := filepath.Join(root, "programs/include/xlb_structs.h")
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		old := "\t__u16 weight; /* 0: not selectable */\n};"
		if !bytes.Contains(b, []byte(old)) {
			return fmt.Errorf("struct xlb_backend not as expected in %s", path)
		}
		return os.WriteFile(path, bytes.Replace(b, []byte(old), []byte("\t__u16 weight; /* 0: not selectable */\n\t__u32 spare;\n};"), 1), 0o644)
	})
	if programNamed(t, marker) {
		t.Fatalf("program %s loaded before the upgrade", marker)
	}
	rt := newRestartTopo(t, "")
	rt.startXlbd(t)
	tr := startTraffic(t, []*testnet.Host{rt.c1, rt.c2}, rt.vipAddr)
	time.Sleep(2 * time.Second)
	if out, err := rt.xlbctl(t, "shutdown", "--keep-datapath"); err != nil {
		t.Fatalf("xlbctl shutdown --keep-datapath: %v\n%s", err, out)
	}
	waitExit(t, rt.d, 5*time.Second)
	running := lbState(t, rt.lb)
	prog := xdpProgID(t, rt.lb)

	t.Run("changed layout refused", func(t *testing.T) {
		rt.writeConfig(t, rt.yaml)
		code, out := runXlbdBinary(t, rt.lb.NS, changed, nil, "--config", rt.file, "--plugin-dir", rt.d.Dir)
		t.Logf("xlbd with another layout:\n%s", out)
		if code != 1 {
			t.Errorf("exit status %d, want 1", code)
		}
		for _, want := range []string{"pinned state has another layout", "map xlb_backends", "struct xlb_backend", "spare", "xlbd cleanup", "--fresh-state"} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
		if now := lbState(t, rt.lb); !now.equal(running) || xdpProgID(t, rt.lb) != prog {
			t.Errorf("the refused xlbd changed the host:\n  %v\nwas\n  %v", now, running)
		}
	})

	t.Run("start that fails after adopting", func(t *testing.T) {
		// A chain member the verifier refuses fails the start after the
		// state was adopted: the data path stays as it was found.
		broken := compileBPF(t, "testdata/chain_broken.c", t.TempDir())
		rt.writeConfig(t, strings.Replace(rt.yaml, "services:", "chain:\n  - {name: broken, object: "+broken+"}\nservices:", 1))
		code, out := runXlbdBinary(t, rt.lb.NS, filepath.Join(rt.d.Dir, "xlbd"), nil, "--config", rt.file, "--plugin-dir", rt.d.Dir)
		if code != 1 || !strings.Contains(out, "adopted the pinned state") || !strings.Contains(out, "the adopted data path is left running") {
			t.Errorf("exit status %d, want 1 after adopting:\n%s", code, out)
		}
		if now := lbState(t, rt.lb); !now.equal(running) || xdpProgID(t, rt.lb) != prog {
			t.Errorf("the failed start changed the host:\n  %v\nwas\n  %v", now, running)
		}
		for _, pin := range []string{"xlb_link", "xlb_conns", "xlb_progs", "xlb_layout", "xlb_host"} {
			if _, err := os.Stat(filepath.Join(rt.pin, pin)); err != nil {
				t.Errorf("pin %s: %v", pin, err)
			}
		}
		if _, err := os.Stat(filepath.Join(rt.pin, "xlb_progs_next")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the failed start left its program array pinned: %v", err)
		}
		if b := tr.broken(); len(b) > 0 {
			t.Errorf("broken by the failed start: %v", b)
		}
		rt.writeConfig(t, rt.yaml)
	})

	rt.d = xlbtest.StartBinary(t, rt.lb.NS, upgrade, "--config", rt.file, "--plugin-dir", rt.d.Dir, "--log-level", "debug")
	ready := time.Now()
	if !programNamed(t, marker) {
		t.Errorf("program %s of the new build is not loaded", marker)
	}
	if now := xdpProgID(t, rt.lb); now == prog || now == 0 {
		t.Errorf("xdp program %d after the upgrade, was %d: not replaced", now, prog)
	}
	st, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if a := st.GetState().GetAdopted(); a == nil || a.GetConnections() < streamConns {
		t.Errorf("the new build adopted %+v, want at least %d connections", a, streamConns)
	}
	time.Sleep(3 * time.Second)
	tr.check(t, "upgrade to a build with the same layout", ready)

	// The documented way out of a layout change: --fresh-state starts
	// afresh (dropping the connections, none left now).
	if out, err := rt.xlbctl(t, "shutdown", "--keep-datapath"); err != nil {
		t.Fatalf("xlbctl shutdown --keep-datapath: %v\n%s", err, out)
	}
	waitExit(t, rt.d, 5*time.Second)
	rt.d = xlbtest.StartBinary(t, rt.lb.NS, changed, "--config", rt.file, "--plugin-dir", rt.d.Dir, "--fresh-state")
	st, err = rt.d.Client().Status(context.Background())
	if err != nil || st.GetState().GetAdopted() != nil {
		t.Errorf("the other layout with --fresh-state: %v, adopted %+v; want a fresh start", err, st.GetState().GetAdopted())
	}
	if !strings.Contains(rt.d.Output(), "--fresh-state: removing the pinned state") {
		t.Errorf("--fresh-state did not say it removed the pinned state")
	}
	if b, err := testnet.Get(t.Context(), rt.c1.NS.HTTPClient(false), "http://"+netip.AddrPortFrom(rt.vipAddr, 80).String()+"/"); err != nil {
		t.Errorf("after --fresh-state: %q, %v", b, err)
	}
}

// runXlbdBinary is runXlbd with another xlbd binary.
func runXlbdBinary(t *testing.T, ns *testnet.NS, xlbd string, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args = append(args, "--socket", filepath.Join(t.TempDir(), "xlbd.sock"))
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + ns.Path, "--", xlbd}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee) && ee.Exited():
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("run %s %v: %v\n%s", xlbd, args, err, out)
	return -1, ""
}

// hostEverything is what xlbd may leave on the load balancer host.
type hostEverything struct {
	host   hostState
	pins   bool // the pin directory holds more than the secrets
	filter bool // the VIP filter's nftables table exists
}

func (rt *restartTopo) everything(t *testing.T) hostEverything {
	t.Helper()
	e := hostEverything{host: lbState(t, rt.lb)}
	e.pins = xlbtest.LeftPins(rt.pin) != nil
	err := rt.lb.NS.Do(func() error {
		var err error
		e.filter, err = vipfilter.Exists(context.Background(), vipfilter.Table("eth0"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// checkNothingLeft fails the test unless the host is as before xlbd
// started: no XDP program, the same addresses, forwarding restored, no
// pins, no VIP filter, no plugin process.
func (rt *restartTopo) checkNothingLeft(t *testing.T, before hostEverything, plugins []int) {
	t.Helper()
	after := rt.everything(t)
	if !after.host.equal(before.host) {
		t.Errorf("host after:\n  %v\nbefore xlbd started:\n  %v", after.host, before.host)
	}
	if after.pins {
		t.Errorf("pins left in %s: %v", rt.pin, xlbtest.LeftPins(rt.pin))
	}
	if after.filter {
		t.Errorf("vip filter (nftables table inet %s) left", vipfilter.Table("eth0"))
	}
	waitGone(t, plugins, 2*time.Second)
}

// stopTopo is restartTopo with a source address xlbd adds, forwarding
// off at the start and a chain member, so that a stop has everything to
// remove.
func newStopTopo(t *testing.T) (*restartTopo, hostEverything) {
	t.Helper()
	rt := newRestartTopo(t, "")
	src := rt.lan.AddrInSubnet(101)
	rt.yaml = strings.Replace(rt.yaml, "iface: eth0\n", fmt.Sprintf("iface: eth0\nsource-addresses: [%s, %s]\nchain:\n  - {name: filter, object: %s, program: xdpfilt_alw_ip}\n", rt.lb.IP, src, xdpFilterIP), 1)
	rt.lb.NS.Sysctl(t, "net.ipv4.conf.eth0.forwarding", "0")
	before := rt.everything(t)
	if before.host.XDP != "" || before.pins || before.filter || before.host.Forwarding != "0" {
		t.Fatalf("host before xlbd started: %+v", before)
	}
	rt.startXlbd(t)
	now := rt.everything(t)
	if now.host.XDP == "" || !now.pins || !now.filter || now.host.Forwarding != "1" || len(now.host.Addrs) != len(before.host.Addrs)+2 {
		t.Fatalf("xlbd running, host: %+v; want xdp, pins, the vip filter, forwarding and two more addresses", now)
	}
	if _, err := os.Stat(filepath.Join(rt.pin, "chain", "filter")); err != nil {
		t.Fatalf("chain member's pins: %v", err)
	}
	return rt, before
}

// stopUnderTraffic starts xlbd on a newStopTopo, runs the traffic for 2 s
// and stops xlbd with sig; it returns the host before xlbd started and
// xlbd's last status.
func stopUnderTraffic(t *testing.T, sig syscall.Signal) (*restartTopo, hostEverything, *controlpb.Status, *traffic) {
	t.Helper()
	rt, before := newStopTopo(t)
	tr := startTraffic(t, []*testnet.Host{rt.c1, rt.c2}, rt.vipAddr)
	time.Sleep(2 * time.Second)
	st, err := rt.d.Client().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := rt.d.Signal(sig); err != nil {
		t.Fatal(err)
	}
	waitExit(t, rt.d, 10*time.Second)
	return rt, before, st, tr
}

// TestStopRemovesEverything: SIGTERM stops xlbd and removes everything it
// made: the link and its program, every pin (the data path's, the chain
// member's, the host record), the VIP and source addresses it added, the
// VIP filter, forwarding restored, the plugin processes gone. The
// long-lived connections then break: their data path is gone.
func TestStopRemovesEverything(t *testing.T) {
	rt, before, st, tr := stopUnderTraffic(t, syscall.SIGTERM)
	if done, err := rt.d.Exited(); !done || err != nil {
		t.Errorf("xlbd exited with %v after SIGTERM, want status 0", err)
	}
	rt.checkNothingLeft(t, before, pluginPids(st))
	time.Sleep(streamStall + time.Second)
	tr.stop()
	broken := tr.broken()
	t.Logf("after SIGTERM: %d of %d long-lived connections broken, as expected with the data path removed", len(broken), streamConns)
	if len(broken) != streamConns {
		t.Errorf("%d of %d long-lived connections broke after SIGTERM removed the data path", len(broken), streamConns)
	}
}

// TestCrashCleanup: after kill -9, `xlbd cleanup` removes everything xlbd
// left (the data path keeps running until then).
func TestCrashCleanup(t *testing.T) {
	rt, before, st, tr := stopUnderTraffic(t, syscall.SIGKILL)
	waitGone(t, pluginPids(st), 2*time.Second)
	if left := rt.everything(t); left.host.XDP == "" || !left.pins || !left.filter {
		t.Errorf("after kill -9 the data path is gone: %+v", left)
	}
	time.Sleep(time.Second)
	if b := tr.broken(); len(b) > 0 {
		t.Errorf("connections broken before the cleanup: %v", b)
	}
	out, err := exec.Command("nsenter", "--net="+rt.lb.NS.Path, "--", filepath.Join(rt.d.Dir, "xlbd"), "cleanup", "--config", rt.file).CombinedOutput()
	t.Logf("xlbd cleanup:\n%s", out)
	if err != nil {
		t.Fatalf("xlbd cleanup: %v", err)
	}
	for _, want := range []string{"detached the pinned XDP link", "removed address " + rt.vipAddr.String(), "restored net.ipv4.conf.eth0.forwarding to 0",
		"removed the VIP filter", "removed the chain members' pins", "removed the pins under", "removed the ISN and cookie secrets"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("cleanup output lacks %q", want)
		}
	}
	rt.checkNothingLeft(t, before, nil)
	if _, err := os.Stat(rt.pin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory after xlbd cleanup: %v", err)
	}
	out, err = exec.Command("nsenter", "--net="+rt.lb.NS.Path, "--", filepath.Join(rt.d.Dir, "xlbd"), "cleanup", "--pin-path", rt.pin).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "nothing of xlb") {
		t.Errorf("second xlbd cleanup: %v\n%s", err, out)
	}
	tr.stop()
}

// TestFullRestartPortReuse: after a full stop (SIGTERM) and a new xlbd on
// the same pin path, new connections reuse source ports whose last
// connections the backends still hold in TIME_WAIT, and none of them may
// wait for a SYN retransmission. The secrets pin that a stop leaves gives
// the new xlbd the same ISN secret, so its clock-driven ISNs lie after the
// old connections'. With a secret drawn anew, 92 of 400 such connections
// waited 1 to 6 s (measured before the pin existed).
func TestFullRestartPortReuse(t *testing.T) {
	ct := newConfigTopo(t, "native")
	pin := xlbtest.NewPinPath()
	t.Cleanup(func() { xlbtest.CleanupPinPath(ct.lb.NS, pin) })
	ct.start(t, fmt.Sprintf("iface: eth0\npin-path: %s\nservices:\n  - vip: %s\n    policy: random\n    backends: [%s, %s]\n",
		pin, ct.vip, addr(ct.ba, backendPort), addr(ct.bb, backendPort)))
	tp := ct.topo
	url := "http://" + ct.vip.String() + "/"
	clients := []*http.Client{tp.c1.NS.HTTPClient(false), tp.c2.NS.HTTPClient(false)}
	// Backends close first: each of these leaves a TIME_WAIT on a backend.
	getMany(t, clients, []string{url}, 2000, 8, nil)
	if err := tp.d.Stop(); err != nil {
		t.Fatal(err)
	}
	if left := xlbtest.LeftPins(pin); left != nil {
		t.Fatalf("pins after SIGTERM: %v", left)
	}
	if _, err := os.Stat(filepath.Join(pin, "xlb_secrets")); err != nil {
		t.Fatalf("the secrets did not outlive the stop: %v", err)
	}
	tp.d = xlbtest.Start(t, ct.lb.NS, "--config", ct.file)
	var slow []time.Duration
	getMany(t, clients, []string{url}, 400, 8, func(_ string, took time.Duration) {
		if took > 900*time.Millisecond {
			slow = append(slow, took)
		}
	})
	t.Logf("after a full restart: %d of 400 new connections waited over 0.9 s %v", len(slow), slow)
	if len(slow) > 0 {
		t.Errorf("%d of 400 connections after a full restart waited for a SYN retransmission: %v", len(slow), slow)
	}
}
