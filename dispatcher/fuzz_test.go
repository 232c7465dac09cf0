package dispatcher

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/xlb-project/xlb/internal/packet"
)

// FuzzPipeline runs arbitrary frames through the whole pipeline
// (xlb_dispatch and its stages, BPF_PROG_TEST_RUN) and checks, frame by
// frame:
//
//   - a connection is created only by a valid SYN to a TCP VIP, or a
//     valid datagram to a UDP VIP, with a selection table: IPv4 without
//     options, not a fragment, or IPv6 without extension headers; a TCP
//     SYN without ACK or RST, correct checksums, a source address a
//     client can have;
//   - a rewritten packet (XDP_TX or redirect) has correct checksums: a
//     reply xlb builds (RST, challenge) always, a forwarded one or a
//     translated ICMP error whenever the frame had them;
//   - the counters add up: every frame moves exactly one outcome counter
//     by one, the one its verdict allows (docs/stage-abi.md), and side
//     counters only with the outcomes they go with; XDP_PASS leaves the
//     frame untouched; nothing is aborted.
//
// An input is a sequence of frames, each a 2-byte little-endian length
// and that many bytes (the last one cut to what is left), run in order
// from an empty connection table, so one input can open a connection and
// then act on it. The seed corpus (testdata/fuzz/FuzzPipeline) holds the
// frames of every test of this package, in their order, as `make
// fuzz-seeds` records them.
func FuzzPipeline(f *testing.F) {
	// Each fuzz worker process runs this function, so each builds its
	// own namespace and pipeline here.
	// Services 3 and 4 are IPv6 (vip6, vip6udp): see newEnvOpts.
	e := newEnvOpts(f, Options{ConntrackSize: 64, PortLo: portLo, PortHi: portLo + 63, Sources6: 1})
	e.must(e.p.SetSelection(2, ModeHash, []uint32{idA, idB, idC, idL1}))
	e.must(e.p.SetService(5, vipDNS, UDP, []int{0}))
	e.must(e.p.SetSelection(5, ModeRandom, []uint32{idA, idB}))
	fz := newFuzzer(e)
	for _, fr := range fuzzSeedFrames() {
		f.Add(encodeFrames(fr))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		e.t = t
		fz.reset()
		for i, fr := range decodeFrames(data) {
			if err := fz.check(fr); err != nil {
				t.Fatalf("frame %d of %d (% x): %v", i, len(decodeFrames(data)), fr, err)
			}
		}
	})
}

// fuzzMaxFrames and fuzzMaxLen bound an input: frames per input, bytes
// per frame.
const (
	fuzzMaxFrames = 16
	fuzzMaxLen    = 1600
)

func decodeFrames(data []byte) [][]byte {
	var out [][]byte
	for len(data) >= 2 && len(out) < fuzzMaxFrames {
		n := int(binary.LittleEndian.Uint16(data))
		data = data[2:]
		n = min(n, len(data), fuzzMaxLen)
		out = append(out, data[:n])
		data = data[n:]
	}
	return out
}

func encodeFrames(frames [][]byte) []byte {
	var b []byte
	for _, fr := range frames {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(fr)))
		b = append(b, fr...)
	}
	return b
}

// fuzzSeedFrames are a few sequences built here, beside the recorded
// corpus: a connection's life and the packets around it.
func fuzzSeedFrames() [][][]byte {
	cl, cl6 := netip.AddrPortFrom(client1, 40000), netip.AddrPortFrom(client6, 40000)
	syn := fromClient(cl, vip, seg{flags: "S", seq: 1000})
	return [][][]byte{
		{syn},
		{syn, fromClient(cl, vip, seg{flags: "A", seq: 1001, ack: 1}), fromClient(cl, vip, seg{flags: "R", seq: 1001})},
		{fromClient(netip.AddrPortFrom(client2, 1234), vip2, seg{flags: "S", seq: 7})},
		{fromBackend(backendA, portLo, seg{flags: "SA", seq: 5, ack: 1001})},
		{udpFrom(cl, vipDNS, clientMAC(client1), []byte("q")), udpTo(backendA, netip.AddrPortFrom(lbAddr, portLo), lbMAC, []byte("a"))},
		{fromClient(cl6, vip6, seg{flags: "S", seq: 1000}), fromClient(cl6, vip6, seg{flags: "A", seq: 1001, ack: 1})},
		{fromBackend(backend6A, portLo, seg{flags: "SA", seq: 5, ack: 1001})},
		{udpFrom(cl6, vip6udp, clientMAC(client6), []byte("q"))},
	}
}

// Outcome counters: each frame moves exactly one of them by one. The
// verdicts each may go with (docs/stage-abi.md, "Verdicts" and parse's
// table).
var fuzzOutcomes = map[string][]Verdict{
	"fwd": {TX, Redirect}, "ret": {TX, Redirect},
	"rst_no_backend": {TX}, "rst_no_port": {TX}, "syn_challenge": {TX}, "reset_no_conn": {TX},
	"icmp_error":    {TX, Redirect},
	"pass_not_ipv4": {Pass}, "pass_not_tcp": {Pass}, "pass_ip_options": {Pass},
	"pass_fragment": {Pass}, "pass_not_ours": {Pass}, "tailcall_fail": {Pass}, "pass_ipv6_ext": {Pass},
	"drop_eth_trunc": {Drop}, "drop_ip_hdr": {Drop}, "drop_ip_len": {Drop},
	"drop_tcp_hdr": {Drop}, "drop_ip_options": {Drop}, "drop_fragment": {Drop},
	"drop_no_conn": {Drop}, "drop_bad_source": {Drop}, "drop_bad_csum": {Drop},
	"drop_fib": {Drop}, "drop_ct_race": {Drop}, "drop_stale": {Drop},
	"drop_internal": {Drop}, "syn_validated": {Drop},
	"drop_no_backend": {Drop}, "drop_no_port": {Drop}, "drop_udp_hdr": {Drop},
}

// Side counters: at most one per frame, and only with these outcomes.
var fuzzSides = map[string][]string{
	"new_conn": {"fwd"},
	// A SYN or a new flow's datagram replaces an ended connection
	// (recycled) or evicts a live one from a full window before it knows
	// its backend and port.
	"recycled": {"fwd", "rst_no_backend", "rst_no_port", "drop_no_backend", "drop_no_port", "drop_fib", "syn_challenge"},
	"evicted":  {"fwd", "rst_no_backend", "rst_no_port", "drop_no_backend", "drop_no_port", "drop_fib", "syn_challenge"},
	// An in-window RST or FIN ends a connection on its way through.
	"closed":            {"fwd", "ret", "drop_fib", "drop_ct_race"},
	"untrusted_rst_fin": {"fwd", "ret", "drop_fib", "drop_ct_race"},
	"redirect":          {"fwd", "ret", "icmp_error"},
}

// fuzzer checks frames against one pipeline.
type fuzzer struct {
	e     *env
	stats *ebpf.Map
	names []string
	ncpu  int
	keys  []uint32
	vals  []uint64
	prev  []uint64
	vips  map[netip.AddrPort]uint8 // VIPs with a selection table, by protocol
}

func newFuzzer(e *env) *fuzzer {
	ncpu, err := ebpf.PossibleCPU()
	e.must(err)
	names := e.p.StatNames()
	fz := &fuzzer{
		e: e, stats: e.p.objs.XlbStats, names: names, ncpu: ncpu,
		keys: make([]uint32, len(names)), vals: make([]uint64, len(names)*ncpu),
		vips: map[netip.AddrPort]uint8{vip: TCP, vip2: TCP, vipDNS: UDP, vip6: TCP, vip6udp: UDP},
	}
	for _, m := range [][]string{slices.Collect(maps.Keys(fuzzOutcomes)), slices.Collect(maps.Keys(fuzzSides))} {
		for _, n := range m {
			if !slices.Contains(names, n) {
				e.t.Fatalf("counter %s is not in enum xlb_stat", n)
			}
		}
	}
	for _, n := range names {
		_, out := fuzzOutcomes[n]
		_, side := fuzzSides[n]
		if !out && !side {
			e.t.Fatalf("counter %s is neither an outcome nor a side counter of the fuzz test: classify it", n)
		}
	}
	fz.prev = fz.read()
	return fz
}

// read returns every counter summed over CPUs, in enum order, with one
// batch lookup.
func (fz *fuzzer) read() []uint64 {
	var cursor ebpf.MapBatchCursor
	n, err := fz.stats.BatchLookup(&cursor, fz.keys, fz.vals, nil)
	if n != len(fz.names) {
		fz.e.t.Fatalf("read counters: %d of %d, %v", n, len(fz.names), err)
	}
	out := make([]uint64, len(fz.names))
	for i, k := range fz.keys[:n] {
		for c := range fz.ncpu {
			out[k] += fz.vals[i*fz.ncpu+c]
		}
	}
	return out
}

// reset empties the connection table, the source ports and the test
// backends' counts and cached next hops, so every input starts alike.
func (fz *fuzzer) reset() {
	p := fz.e.p
	for _, t := range p.tables() {
		clear(t.conns)
		clear(t.ports)
		clear(t.ctBusy)
		clear(t.portBusy)
	}
	clear(p.bkStats[:(idL1+1)*unsafe.Sizeof(xlbXlbBackendStats{})])
}

// flows returns the live connections by flow, each with where and at
// which sequence its slot was written: a connection that replaced an
// ended one of its flow is a new one.
func (fz *fuzzer) flows() map[fuzzFlow][2]uint32 {
	out := map[fuzzFlow][2]uint32{}
	var s snapshot
	for _, t := range fz.e.p.tables() {
		bitmap(t.ctBusy).each(func(i uint32) {
			if t.read(i, &s) {
				k := s.key()
				out[fuzzFlow{addrPortOf(k.saddr, k.sport), addrPortOf(k.daddr, k.dport), k.proto}] = [2]uint32{s.idx, s.seq}
			}
		})
	}
	return out
}

// fuzzFlow names a connection: client, VIP, protocol.
type fuzzFlow struct {
	src, dst netip.AddrPort
	proto    uint8
}

// check runs one frame and checks the three properties.
func (fz *fuzzer) check(in []byte) error {
	if len(in) < 14 {
		return nil // BPF_PROG_TEST_RUN refuses XDP input under an Ethernet header
	}
	before := fz.flows()
	v, out := fz.e.run(fz.e.p.Entry(), in)
	verdict := Verdict(v)
	after := fz.read()
	delta := map[string]uint64{}
	for i, n := range fz.names {
		if d := after[i] - fz.prev[i]; d != 0 {
			delta[n] = d
		}
	}
	fz.prev = after

	// The counters add up.
	outcome := ""
	for n, d := range delta {
		if _, ok := fuzzOutcomes[n]; !ok {
			continue
		}
		if outcome != "" || d != 1 {
			return fmt.Errorf("verdict %s, counters %v: want exactly one outcome counter moved by one", verdict, delta)
		}
		outcome = n
	}
	if outcome == "" || !slices.Contains(fuzzOutcomes[outcome], verdict) {
		return fmt.Errorf("verdict %s with counters %v", verdict, delta)
	}
	for n, d := range delta {
		with, ok := fuzzSides[n]
		if ok && (d != 1 || !slices.Contains(with, outcome)) {
			return fmt.Errorf("verdict %s: counter %s moved by %d with %s (counters %v)", verdict, n, d, outcome, delta)
		}
	}
	if (delta["redirect"] == 1) != (verdict == Redirect) {
		return fmt.Errorf("verdict %s, counters %v: redirect counted %d times", verdict, delta, delta["redirect"])
	}
	if verdict == Pass && !bytes.Equal(out, in) {
		return fmt.Errorf("passed frame changed:\n in  % x\n out % x", in, out)
	}

	// Connections only from valid SYNs to a VIP.
	var made []fuzzFlow
	for k, at := range fz.flows() {
		if was, ok := before[k]; !ok || was != at {
			made = append(made, k)
		}
	}
	if len(made) != int(delta["new_conn"]) {
		return fmt.Errorf("%d connections appeared, new_conn moved by %d", len(made), delta["new_conn"])
	}
	if len(made) > 0 {
		if why := fz.notValidNew(in); why != "" {
			return fmt.Errorf("connection %v created by a frame that is not a valid SYN or datagram to a VIP: %s", made, why)
		}
		src, dst := fz.flowOf(in)
		if k := made[0]; k.src != src || k.dst != dst {
			return fmt.Errorf("connection %v created for frame %s -> %s", k, src, dst)
		}
	}

	// Rewritten packets have correct checksums.
	if verdict == TX || verdict == Redirect {
		built := outcome != "fwd" && outcome != "ret" && outcome != "icmp_error" // a RST or challenge xlb wrote
		if err := packet.Verify(out); err != nil && (built || packet.Verify(in) == nil) {
			return fmt.Errorf("%s output (%s): %v\n in  % x\n out % x", verdict, outcome, err, in, out)
		}
	}
	return nil
}

// flowOf returns a TCP frame's addresses and ports.
func (fz *fuzzer) flowOf(in []byte) (src, dst netip.AddrPort) {
	d, err := packet.Decode(in)
	if err != nil {
		return
	}
	return d.Src, d.Dst
}

// notValidNew says why a frame is not a valid SYN to a TCP VIP or a
// valid datagram to a UDP VIP, with a selection table, or "" when it is
// one. Written from the protocols, not from the data path.
func (fz *fuzzer) notValidNew(in []byte) string {
	if err := verifyAsReceiver(in); err != nil {
		return err.Error()
	}
	d, err := packet.Decode(in)
	if err != nil {
		return err.Error()
	}
	ip, hlen := in[14:], 40 // Decode took no IPv6 extension headers
	if d.Src.Addr().Is4() {
		hlen = 20
		switch {
		case ip[0]&0x0f != 5:
			return "IPv4 options"
		case binary.BigEndian.Uint16(ip[6:])&0x3fff != 0:
			return "a fragment"
		}
	}
	switch {
	case fz.vips[d.Dst] != d.Proto:
		return fmt.Sprintf("to %s protocol %d, not a VIP with a table", d.Dst, d.Proto)
	case d.Proto == packet.ProtoTCP && ip[hlen+13]&(0x02|0x10|0x04) != 0x02:
		return fmt.Sprintf("flags %s", d.Flags)
	case d.Src.Addr() == d.Dst.Addr():
		return "from the VIP itself"
	}
	if a := d.Src.Addr(); a.Is4() {
		if b := a.As4(); b[0] == 0 || b[0] == 127 || b[0] >= 224 {
			return fmt.Sprintf("from %s", a)
		}
	} else if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.Is4In6() {
		return fmt.Sprintf("from %s", a)
	}
	return ""
}

// verifyAsReceiver is packet.Verify as a receiver checks: a checksum
// field may hold either form of one's-complement zero, 0x0000 or 0xffff,
// where the other is due (RFC 1624, section 3: a receiver sums the field
// in, and both give the same sum).
//
// A UDP datagram shorter than its IPv4 payload is accepted, as Linux
// accepts it: the receiver trims the payload to the UDP length.
func verifyAsReceiver(b []byte) error {
	b = slices.Clone(b)
	if len(b) >= 14+20 && binary.BigEndian.Uint16(b[12:]) == 0x0800 && b[14+9] == packet.ProtoUDP {
		ihl := int(b[14]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(b[14+2:]))
		if ihl >= 20 && len(b) >= 14+ihl+8 && total <= len(b)-14 {
			if ulen := int(binary.BigEndian.Uint16(b[14+ihl+4:])); ulen >= 8 && ihl+ulen < total {
				if ipHeaderSum(b[14:14+ihl]) != 0xffff {
					return errors.New("verify ipv4: bad checksum")
				}
				binary.BigEndian.PutUint16(b[14+2:], uint16(ihl+ulen))
				binary.BigEndian.PutUint16(b[14+10:], 0)
				binary.BigEndian.PutUint16(b[14+10:], ^ipHeaderSum(b[14:14+ihl]))
			}
		}
	}
	for range 2 {
		err := packet.Verify(b)
		var ce *packet.ChecksumError
		if !errors.As(err, &ce) || !(ce.Want == 0 && ce.Got == 0xffff || ce.Want == 0xffff && ce.Got == 0) {
			return err
		}
		hlen := int(b[14]&0x0f) * 4
		if b[14]>>4 == 6 {
			hlen = 40
		}
		var off int
		switch ce.Layer {
		case "ipv4":
			off = 14 + 10
		case "tcp":
			off = 14 + hlen + 16
		case "udp":
			off = 14 + hlen + 6
		default:
			return err
		}
		binary.BigEndian.PutUint16(b[off:], ce.Want)
	}
	return packet.Verify(b)
}

// ipHeaderSum is the one's-complement sum of an IPv4 header (0xffff when
// its checksum is right).
func ipHeaderSum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// Recording the seed corpus: with XLB_FUZZ_SEEDS set to a directory,
// every frame a test of this package runs through env.run is kept, in
// order per test (and subtest), and written there in chunks of
// fuzzMaxFrames as FuzzPipeline inputs when the test ends. At most
// fuzzSeedsPerTest chunks per test: the tests that drive thousands of
// flows repeat themselves after that.
const fuzzSeedsPerTest = 4

var seedRec struct {
	sync.Mutex
	frames map[string][][]byte
}

func recordFrame(t testing.TB, in []byte) {
	dir := os.Getenv("XLB_FUZZ_SEEDS")
	if dir == "" || t == nil {
		return
	}
	if strings.HasPrefix(t.Name(), "Fuzz") {
		return
	}
	seedRec.Lock()
	defer seedRec.Unlock()
	name := t.Name()
	if seedRec.frames == nil {
		seedRec.frames = map[string][][]byte{}
	}
	if _, ok := seedRec.frames[name]; !ok {
		t.Cleanup(func() { writeSeeds(t, dir, name) })
	}
	if len(seedRec.frames[name]) < fuzzSeedsPerTest*fuzzMaxFrames {
		seedRec.frames[name] = append(seedRec.frames[name], slices.Clone(in))
	}
}

func writeSeeds(t testing.TB, dir, name string) {
	seedRec.Lock()
	frames := seedRec.frames[name]
	delete(seedRec.frames, name)
	seedRec.Unlock()
	for chunk := range slices.Chunk(frames, fuzzMaxFrames) {
		data := encodeFrames(chunk)
		sum := sha256.Sum256(data)
		file := filepath.Join(dir, "seed-"+hex.EncodeToString(sum[:8]))
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		if err := os.WriteFile(file, []byte(body), 0o644); err != nil {
			t.Errorf("write fuzz seed: %v", err)
		}
	}
}
