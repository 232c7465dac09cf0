package dispatcher

import (
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/xlb-project/xlb/internal/testnet"
)

// XDP verdicts as the test run returns them.
const (
	xdpAborted  = uint32(Aborted)
	xdpDrop     = uint32(Drop)
	xdpPass     = uint32(Pass)
	xdpTX       = uint32(TX)
	xdpRedirect = uint32(Redirect)
)

func verdictName(v uint32) string { return Verdict(v).String() }

// xdpMd is struct xdp_md, the context BPF_PROG_TEST_RUN accepts for XDP:
// data must be 0 and data_end the packet length; ingress_ifindex names a
// device of the calling thread's network namespace.
type xdpMd struct {
	Data           uint32
	DataEnd        uint32
	DataMeta       uint32
	IngressIfindex uint32
	RxQueueIndex   uint32
	EgressIfindex  uint32
}

// The test network, inside the test's own namespace:
//
//	lb0 10.50.0.1/24  backends .2 .3 .4, client .100 (neighbour entries),
//	                  client .101 (none: learned next hop), backend .9 (none),
//	                  default route via .254 (neighbour entry)
//	lb1 10.60.0.1/24  backend 10.60.0.2 (neighbour entry): reached by redirect
//
// and the same in IPv6 (fd00:50::/64 on lb0, fd00:60::/64 on lb1, VIP
// fd00:50:100::1, default route via fd00:50::fe).
var (
	lbAddr     = netip.MustParseAddr("10.50.0.1")
	vipAddr    = netip.MustParseAddr("10.50.100.1")
	vip        = netip.AddrPortFrom(vipAddr, 80)
	vip2       = netip.AddrPortFrom(vipAddr, 443)
	backendA   = netip.MustParseAddrPort("10.50.0.2:8080")
	backendB   = netip.MustParseAddrPort("10.50.0.3:8080")
	backendC   = netip.MustParseAddrPort("10.50.0.4:8081")
	backendNoN = netip.MustParseAddrPort("10.50.0.9:8080") // no neighbour
	backendL1  = netip.MustParseAddrPort("10.60.0.2:8080") // behind lb1
	client1    = netip.MustParseAddr("10.50.0.100")        // neighbour entry
	client2    = netip.MustParseAddr("10.50.0.101")        // no neighbour entry
	gateway    = netip.MustParseAddr("10.50.0.254")        // default route
	portLo     = uint16(20000)
	portHi     = uint16(29999)

	lbMAC      = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	lb1MAC     = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x01, 0x01}
	peerMAC    = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0xfe}
	peer1MAC   = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x01, 0xfe}
	client2MAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x65} // seen only on the wire

	lbAddr6    = netip.MustParseAddr("fd00:50::1")
	vipAddr6   = netip.MustParseAddr("fd00:50:100::1")
	vip6       = netip.AddrPortFrom(vipAddr6, 80)
	vip6udp    = netip.AddrPortFrom(vipAddr6, 53)
	backend6A  = netip.MustParseAddrPort("[fd00:50::2]:8080")
	backend6B  = netip.MustParseAddrPort("[fd00:50::3]:8080")
	backend6L1 = netip.MustParseAddrPort("[fd00:60::2]:8080") // behind lb1
	client6    = netip.MustParseAddr("fd00:50::100")          // neighbour entry
	client6b   = netip.MustParseAddr("fd00:50::101")          // no neighbour entry
	gateway6   = netip.MustParseAddr("fd00:50::fe")           // default route
	neighbours = map[netip.Addr]net.HardwareAddr{
		backendA.Addr():  {0x02, 0x00, 0x00, 0x00, 0x00, 0x02},
		backendB.Addr():  {0x02, 0x00, 0x00, 0x00, 0x00, 0x03},
		backendC.Addr():  {0x02, 0x00, 0x00, 0x00, 0x00, 0x04},
		client1:          {0x02, 0x00, 0x00, 0x00, 0x00, 0x64},
		gateway:          {0x02, 0x00, 0x00, 0x00, 0x00, 0xfd},
		backendL1.Addr(): {0x02, 0x00, 0x00, 0x00, 0x01, 0x02},

		backend6A.Addr():  {0x02, 0x00, 0x00, 0x00, 0x06, 0x02},
		backend6B.Addr():  {0x02, 0x00, 0x00, 0x00, 0x06, 0x03},
		client6:           {0x02, 0x00, 0x00, 0x00, 0x06, 0x64},
		gateway6:          {0x02, 0x00, 0x00, 0x00, 0x06, 0xfd},
		backend6L1.Addr(): {0x02, 0x00, 0x00, 0x00, 0x07, 0x02},
	}
)

// Backend ids used by the tests.
const (
	idA   = 1
	idB   = 2
	idC   = 3
	idNoN = 4
	idL1  = 5
	// IPv6 backends, of service 3 (vip6, TCP) and 4 (vip6udp, UDP).
	id6A  = 11
	id6B  = 12
	id6L1 = 13
)

// nsThread is an OS thread in a fresh network namespace of its own. Programs
// run through Do see that namespace's devices, routes and neighbours
// (BPF_PROG_TEST_RUN resolves ingress_ifindex and bpf_fib_lookup answers in
// the calling thread's namespace). The thread is pinned to one CPU so
// per-CPU state (round-robin positions, counters) and timings are stable.
type nsThread struct {
	reqs chan func()
	done chan struct{}
}

func newNSThread(t testing.TB) *nsThread {
	t.Helper()
	nt := &nsThread{reqs: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() {
		defer close(nt.done)
		// Never unlocked: the thread is discarded, with the namespace,
		// when this goroutine returns.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare network namespace: %w", err)
			return
		}
		var cpus unix.CPUSet
		cpus.Set(0)
		if err := unix.SchedSetaffinity(0, &cpus); err != nil {
			errc <- fmt.Errorf("pin thread to cpu 0: %w", err)
			return
		}
		errc <- nil
		for fn := range nt.reqs {
			fn()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(nt.reqs)
		<-nt.done
	})
	return nt
}

// Do runs fn on the namespace's thread and waits for it.
func (nt *nsThread) Do(fn func()) {
	done := make(chan struct{})
	var p any
	nt.reqs <- func() {
		defer close(done)
		defer func() { p = recover() }()
		fn()
	}
	<-done
	if p != nil {
		panic(p)
	}
}

// env is a loaded pipeline in a namespace laid out as described above.
type env struct {
	t    testing.TB
	p    *Pipeline
	ns   *nsThread
	lb0  uint32 // ifindex
	lb1  uint32
	opts Settings
}

var defaultTimeouts = Timeouts{SYN: time.Minute, Established: time.Hour, FIN: time.Minute, Closed: 10 * time.Second}

// newEnv loads the pipeline with a conntrack size, builds the namespace
// and configures VIP :80 (service 1, random over A and B) and VIP :443
// (service 2, no selection table yet). Everything is released in cleanup.
func newEnv(t testing.TB, ctSize uint32) *env {
	t.Helper()
	return newEnvPorts(t, ctSize, portLo, portHi)
}

// newEnvPorts is newEnv with another source-port range (the return table
// is sized for it at load).
func newEnvPorts(t testing.TB, ctSize uint32, lo, hi uint16) *env {
	t.Helper()
	return newEnvOpts(t, Options{ConntrackSize: ctSize, PortLo: lo, PortHi: hi})
}

// newEnvOpts is newEnv with the pipeline loaded with opts (one source
// address, lbAddr, set whatever opts.Sources allows).
func newEnvOpts(t testing.TB, opts Options) *env {
	t.Helper()
	testnet.RequirePrivileged(t)
	lo, hi := opts.PortLo, opts.PortHi
	p, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("close pipeline: %v", err)
		}
	})
	e := &env{t: t, p: p, ns: newNSThread(t)}
	var nerr error
	e.ns.Do(func() { e.lb0, e.lb1, nerr = setupNetwork() })
	if nerr != nil {
		t.Fatalf("set up test network: %v", nerr)
	}
	e.opts = Settings{SourceAddresses: []netip.Addr{lbAddr}, PortLo: lo, PortHi: hi, ConntrackTimeout: defaultTimeouts}
	e.must(p.SetSettings(e.opts))
	for _, b := range []struct {
		id   uint32
		addr netip.AddrPort
	}{{idA, backendA}, {idB, backendB}, {idC, backendC}, {idNoN, backendNoN}, {idL1, backendL1}} {
		e.must(p.SetBackend(b.id, b.addr, 1))
	}
	e.must(p.SetService(1, vip, TCP, []int{0}))
	e.must(p.SetService(2, vip2, TCP, []int{0}))
	e.must(p.SetSelection(1, ModeRandom, []uint32{idA, idB}))
	if opts.Sources6 > 0 {
		e.opts.SourceAddresses6 = []netip.Addr{lbAddr6}
		e.must(p.SetSettings(e.opts))
		for _, b := range []struct {
			id   uint32
			addr netip.AddrPort
		}{{id6A, backend6A}, {id6B, backend6B}, {id6L1, backend6L1}} {
			e.must(p.SetBackend(b.id, b.addr, 1))
		}
		e.must(p.SetService(3, vip6, TCP, []int{0}))
		e.must(p.SetService(4, vip6udp, UDP, []int{0}))
		e.must(p.SetSelection(3, ModeRandom, []uint32{id6A, id6B}))
		e.must(p.SetSelection(4, ModeRandom, []uint32{id6A}))
	}
	return e
}

func (e *env) must(err error) {
	e.t.Helper()
	if err != nil {
		e.t.Fatal(err)
	}
}

// setupNetwork runs on the namespace's thread.
func setupNetwork() (lb0, lb1 uint32, err error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return 0, 0, fmt.Errorf("open netlink: %w", err)
	}
	defer h.Close()
	links := []struct {
		name, peer   string
		mac, peerMAC net.HardwareAddr
		addr, addr6  string
	}{
		{"lb0", "lb0p", lbMAC, peerMAC, "10.50.0.1/24", "fd00:50::1/64"},
		{"lb1", "lb1p", lb1MAC, peer1MAC, "10.60.0.1/24", "fd00:60::1/64"},
	}
	idx := make([]uint32, len(links))
	for i, l := range links {
		veth := &netlink.Veth{
			LinkAttrs:        netlink.LinkAttrs{Name: l.name, HardwareAddr: l.mac},
			PeerName:         l.peer,
			PeerHardwareAddr: l.peerMAC,
		}
		if err := h.LinkAdd(veth); err != nil {
			return 0, 0, fmt.Errorf("add veth %s: %w", l.name, err)
		}
		for _, name := range []string{l.name, l.peer} {
			link, err := h.LinkByName(name)
			if err != nil {
				return 0, 0, fmt.Errorf("find %s: %w", name, err)
			}
			if err := h.LinkSetUp(link); err != nil {
				return 0, 0, fmt.Errorf("set %s up: %w", name, err)
			}
		}
		link, err := h.LinkByName(l.name)
		if err != nil {
			return 0, 0, fmt.Errorf("find %s: %w", l.name, err)
		}
		addr, err := netlink.ParseAddr(l.addr)
		if err != nil {
			return 0, 0, err
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return 0, 0, fmt.Errorf("add address %s to %s: %w", l.addr, l.name, err)
		}
		addr6, err := netlink.ParseAddr(l.addr6)
		if err != nil {
			return 0, 0, err
		}
		addr6.Flags = unix.IFA_F_NODAD
		if err := h.AddrAdd(link, addr6); err != nil {
			return 0, 0, fmt.Errorf("add address %s to %s: %w", l.addr6, l.name, err)
		}
		idx[i] = uint32(link.Attrs().Index)
	}
	// bpf_fib_lookup answers "forwarding disabled" without these. Writing
	// all.forwarding also turns on every existing interface's.
	for _, key := range []string{"ipv4/conf/all/forwarding", "ipv4/conf/lb0/forwarding", "ipv4/conf/lb1/forwarding",
		"ipv6/conf/all/forwarding", "ipv6/conf/lb0/forwarding", "ipv6/conf/lb1/forwarding"} {
		if err := os.WriteFile("/proc/sys/net/"+key, []byte("1"), 0); err != nil {
			return 0, 0, fmt.Errorf("set %s: %w", key, err)
		}
	}
	for ip, mac := range neighbours {
		link := int(idx[0])
		if ip == backendL1.Addr() || ip == backend6L1.Addr() {
			link = int(idx[1])
		}
		family := unix.AF_INET
		if ip.Is6() {
			family = unix.AF_INET6
		}
		n := &netlink.Neigh{LinkIndex: link, Family: family, State: netlink.NUD_PERMANENT, IP: net.IP(ip.AsSlice()), HardwareAddr: mac}
		if err := h.NeighSet(n); err != nil {
			return 0, 0, fmt.Errorf("add neighbour %s: %w", ip, err)
		}
	}
	gw := &netlink.Route{LinkIndex: int(idx[0]), Gw: net.IP(gateway.AsSlice())}
	if err := h.RouteAdd(gw); err != nil {
		return 0, 0, fmt.Errorf("add default route: %w", err)
	}
	gw6 := &netlink.Route{LinkIndex: int(idx[0]), Gw: net.IP(gateway6.AsSlice()), Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}
	if err := h.RouteAdd(gw6); err != nil {
		return 0, 0, fmt.Errorf("add IPv6 default route: %w", err)
	}
	return idx[0], idx[1], nil
}

// run runs prog once on a copy of in, arriving on lb0, and returns the
// verdict and the packet as the program left it.
func (e *env) run(prog *ebpf.Program, in []byte) (uint32, []byte) {
	e.t.Helper()
	return e.runOn(prog, in, e.lb0)
}

func (e *env) runOn(prog *ebpf.Program, in []byte, ifindex uint32) (uint32, []byte) {
	e.t.Helper()
	recordFrame(e.t, in)
	var (
		verdict uint32
		err     error
	)
	opts := ebpf.RunOptions{
		Data:    slices.Clone(in),
		DataOut: make([]byte, len(in)+256),
		Context: &xdpMd{DataEnd: uint32(len(in)), IngressIfindex: ifindex},
		Repeat:  1,
	}
	e.ns.Do(func() { verdict, err = prog.Run(&opts) })
	if err != nil {
		e.t.Fatalf("run %s: %v", prog, err)
	}
	return verdict, opts.DataOut
}

func (e *env) stats() map[string]uint64 {
	e.t.Helper()
	s, err := e.p.Stats()
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// statsDelta returns the counters that changed since before.
func statsDelta(before, after map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// checkDelta compares counter changes with want; unlisted counters must
// not have moved.
func checkDelta(t testing.TB, before, after, want map[string]uint64) {
	t.Helper()
	got := statsDelta(before, after)
	w := map[string]uint64{}
	for k, v := range want {
		if v != 0 {
			w[k] = v
		}
	}
	if !maps.Equal(got, w) {
		t.Errorf("counter changes: got %v, want %v", got, w)
	}
}

// conn returns the tracked connection of a client flow.
func (e *env) conn(client, to netip.AddrPort) (Conn, bool) {
	e.t.Helper()
	conns, err := e.p.Conns()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, c := range conns {
		if c.Client == client && c.VIP == to {
			return c, true
		}
	}
	return Conn{}, false
}

func (e *env) mustConn(client, to netip.AddrPort) Conn {
	e.t.Helper()
	c, ok := e.conn(client, to)
	if !ok {
		e.t.Fatalf("no connection tracked for %s -> %s", client, to)
	}
	return c
}

func (e *env) backendStats(id uint32) BackendStats {
	e.t.Helper()
	s, err := e.p.BackendStats(id)
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// retEntries counts the source-port ways held by connections (not the
// holds kept for a backend's TIME_WAIT).
func (e *env) retEntries() int {
	e.t.Helper()
	used, _ := e.p.PortsInUse()
	return used
}

// orphan frees the connection slot of client cl's TCP connection to to
// behind the data path's back, leaving its source-port way an orphan for
// GC to find. It finds the slot through the Go mirror of the flow hash.
func (e *env) orphan(cl, to netip.AddrPort) {
	e.t.Helper()
	t := &e.p.t4
	if cl.Addr().Is6() {
		t = &e.p.t6
	}
	k := keyOf(cl, to, TCP)
	s, ok := t.find(&k)
	if !ok || !t.take(&s) {
		e.t.Fatalf("cannot take the connection slot of %s (found %v)", cl, ok)
	}
	t.head(s.idx).Flags = ctDead
	t.release(s.idx)
}

// clearConntrack empties the connection table, every source-port way and
// the backends' counts.
func (e *env) clearConntrack() {
	e.t.Helper()
	for _, t := range e.p.tables() {
		clear(t.conns)
		clear(t.ports)
	}
	for _, id := range []uint32{idA, idB, idC, idNoN, idL1} {
		e.must(e.p.ResetBackendStats(id))
	}
}

// testRun is BPF_PROG_TEST_RUN called directly, because cilium/ebpf's
// Program.Run drops the kernel's duration and Program.Benchmark cannot pass
// a context (without ingress_ifindex the packet arrives on lo and the
// rewrite stage redirects instead of transmitting). The buffers are pinned
// for the syscall.
type testRun struct {
	attr   progRunAttr
	in     []byte
	out    []byte
	ctx    xdpMd
	pinner runtime.Pinner
}

// progRunAttr is the BPF_PROG_TEST_RUN part of union bpf_attr.
type progRunAttr struct {
	progFd      uint32
	retval      uint32
	dataSizeIn  uint32
	dataSizeOut uint32
	dataIn      uint64
	dataOut     uint64
	repeat      uint32
	duration    uint32
	ctxSizeIn   uint32
	ctxSizeOut  uint32
	ctxIn       uint64
	ctxOut      uint64
	flags       uint32
	cpu         uint32
	batchSize   uint32
	_           uint32
}

func newTestRun(prog *ebpf.Program, ifindex uint32, maxLen int) *testRun {
	r := &testRun{in: make([]byte, maxLen), out: make([]byte, maxLen+256)}
	r.pinner.Pin(&r.in[0])
	r.pinner.Pin(&r.out[0])
	r.pinner.Pin(&r.ctx)
	r.ctx.IngressIfindex = ifindex
	r.attr.progFd = uint32(prog.FD())
	r.attr.dataIn = uint64(uintptr(unsafe.Pointer(&r.in[0])))
	r.attr.dataOut = uint64(uintptr(unsafe.Pointer(&r.out[0])))
	r.attr.ctxIn = uint64(uintptr(unsafe.Pointer(&r.ctx)))
	r.attr.ctxSizeIn = uint32(unsafe.Sizeof(r.ctx))
	return r
}

func (r *testRun) close() { r.pinner.Unpin() }

// run runs the program once on pkt (never on a previous output) and returns
// its verdict and the kernel's measured duration of that run. It must be
// called on the namespace's thread.
func (r *testRun) run(pkt []byte) (uint32, uint32, error) {
	n := copy(r.in, pkt)
	r.ctx.DataEnd = uint32(n)
	r.attr.dataSizeIn = uint32(n)
	r.attr.dataSizeOut = uint32(len(r.out))
	r.attr.repeat = 1
	r.attr.duration = 0
	for {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&r.attr)), unsafe.Sizeof(r.attr))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, 0, fmt.Errorf("bpf_prog_test_run: %w", errno)
		}
		return r.attr.retval, r.attr.duration, nil
	}
}
