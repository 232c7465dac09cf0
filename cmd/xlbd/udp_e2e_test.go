package main

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/xlb-project/xlb/internal/testnet"
)

// serveDNS runs a DNS server (github.com/miekg/dns) on host h's UDP port
// that answers every A query for NAME with a TXT record naming h, until
// cleanup.
func serveDNS(t *testing.T, h *testnet.Host, port int) {
	t.Helper()
	pc, err := listenUDP(h, addr(h, port))
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Answer = append(m.Answer, &dns.TXT{
			Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 0},
			Txt: []string{h.Name},
		})
		_ = w.WriteMsg(m)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
}

func listenUDP(h *testnet.Host, a string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := h.NS.Do(func() (err error) {
		pc, err = net.ListenPacket("udp", a)
		return err
	})
	return pc, err
}

// TestUDPDNS balances DNS over UDP: two backends running a DNS server, 10,000
// queries from two clients (each query from a socket of its own, so a flow
// of its own), none lost, both backends used. A flow then expires after
// the UDP idle timeout: it leaves the connection table and its backend's
// count.
func TestUDPDNS(t *testing.T) {
	ct := newConfigTopo(t, "native")
	for _, h := range []*testnet.Host{ct.ba, ct.bb} {
		serveDNS(t, h, 5353)
	}
	vip := netip.AddrPortFrom(ct.lb.IP, 53)
	ct.start(t, fmt.Sprintf(`iface: eth0
conntrack: {timeouts: {udp: 2s}}
services:
  - vip: %s
    protocol: udp
    policy: hash
    backends: [%s, %s]
  - vip: %s
    backends: [%s]
`, vip, addr(ct.ba, 5353), addr(ct.bb, 5353), ct.vip, addr(ct.ba, backendPort)))

	const n, workers = 10000, 8
	var (
		mu     sync.Mutex
		by     = map[string]int{}
		failed []error
		wg     sync.WaitGroup
	)
	work := make(chan int)
	for w := range workers {
		h := []*testnet.Host{ct.c1, ct.c2}[w%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				who, err := queryFrom(h, vip, fmt.Sprintf("q%d.example.", i))
				mu.Lock()
				if err != nil {
					failed = append(failed, err)
				} else {
					by[who]++
				}
				mu.Unlock()
			}
		}()
	}
	start := time.Now()
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	t.Logf("%d queries in %v, answered by %v, %d lost", n, time.Since(start), by, len(failed))
	if len(failed) > 0 {
		t.Errorf("%d of %d queries lost, first: %v", len(failed), n, failed[0])
	}
	if by["backend-a"] == 0 || by["backend-b"] == 0 {
		t.Errorf("answers by backend %v, want both", by)
	}
	// TCP on the other VIP is unaffected.
	if _, err := testnet.Get(t.Context(), ct.c1.NS.HTTPClient(false), "http://"+ct.vip.String()+"/"); err != nil {
		t.Errorf("tcp beside udp: %v", err)
	}

	// A flow kept open a while, then idle: it expires after 2 s.
	pc, err := listenUDP(ct.c1, ct.c1.IP.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := exchange(pc, vip, "idle.example."); err != nil {
		t.Fatal(err)
	}
	local := pc.LocalAddr().String()
	if c, ok := ct.conn(t, local); !ok || c.Protocol != "udp" || c.State != "udp" {
		t.Fatalf("flow of %s: %+v, %v; want a udp flow", local, c, ok)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := ct.conn(t, local); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the idle UDP flow of %s still tracked 5 s on", local)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("the idle flow expired")
}

// queryFrom sends one DNS query from a new socket of host h and returns
// the backend named in the answer.
func queryFrom(h *testnet.Host, vip netip.AddrPort, name string) (string, error) {
	pc, err := listenUDP(h, h.IP.String()+":0")
	if err != nil {
		return "", err
	}
	defer pc.Close()
	return exchange(pc, vip, name)
}

// exchange sends a query for name to vip on pc and waits 2 s for its
// answer.
func exchange(pc net.PacketConn, vip netip.AddrPort, name string) (string, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, dns.TypeA)
	out, err := q.Pack()
	if err != nil {
		return "", err
	}
	if _, err := pc.WriteTo(out, net.UDPAddrFromAddrPort(vip)); err != nil {
		return "", err
	}
	pc.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 1500)
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		return "", fmt.Errorf("query %s: %w", name, err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		return "", err
	}
	if m.Id != q.Id || len(m.Answer) != 1 {
		return "", fmt.Errorf("query %s: answer %v", name, m)
	}
	txt, ok := m.Answer[0].(*dns.TXT)
	if !ok || len(txt.Txt) != 1 {
		return "", fmt.Errorf("query %s: answer %v", name, m.Answer[0])
	}
	return txt.Txt[0], nil
}
