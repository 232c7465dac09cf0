package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

// TestPathMTU puts a router with a 1280-byte link between the load
// balancer and the backend (the LAN has 1500). The client uploads 4 MiB
// and downloads 4 MiB through the VIP: its full-size segments reach the
// router, which answers with ICMP "fragmentation needed" to the load
// balancer's source address; xlb translates the error back to the client,
// whose path MTU to the VIP drops, and the transfer completes byte-exact.
// Without the translation the upload stalls (a path MTU black hole).
func TestPathMTU(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"client1", "lb", "router"}, NativePeerXDP: true})
	c1, lb, router := lan.Host("client1"), lan.Host("lb"), lan.Host("router")
	far := testnet.NewNS(t, "far")
	farNet := netip.MustParsePrefix("10.201.0.0/24")
	testnet.Link(t, router.NS, far, "narrow", 1280, netip.MustParsePrefix("10.201.0.1/24"), netip.MustParsePrefix("10.201.0.2/24"))
	router.NS.Sysctl(t, "net.ipv4.ip_forward", "1")
	router.NS.Exec(t, "ip", "route", "replace", lan.Subnet.String(), "dev", "eth0")
	// The backend announces the LAN's MSS, as a host behind a
	// narrower hop than its own link does: the client's segments are
	// then too big for the hop.
	far.Exec(t, "ip", "route", "add", "default", "via", "10.201.0.1", "advmss", "1460")
	lb.NS.Exec(t, "ip", "route", "add", farNet.String(), "via", router.IP.String())
	backend := netip.AddrPortFrom(netip.MustParseAddr("10.201.0.2"), 9000)

	pmtuTransfer(t, lan, c1, lb, far, netip.AddrPortFrom(lb.IP, 80), backend)
	route := c1.NS.Exec(t, "ip", "route", "get", lb.IP.String())
	t.Logf("client's route to the VIP: %s", route)
}

// pmtuTransfer serves 4 MiB of random bytes from backend, an address of
// far behind the narrow hop, starts xlbd on lb with one service from vip
// to it, and uploads then downloads the bytes from c1 through the VIP:
// both must arrive byte-exact. Counters must show a translated ICMP
// error, or the test did not exercise path MTU discovery.
func pmtuTransfer(t *testing.T, lan *testnet.LAN, c1, lb *testnet.Host, far *testnet.NS, vip, backend netip.AddrPort) {
	t.Helper()
	blob := make([]byte, 4<<20)
	if _, err := rand.Read(blob); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(blob)
	serveBlob(t, &testnet.Host{Name: "far", NS: far, IP: backend.Addr()}, int(backend.Port()), blob)
	ct := &configTopo{topo: &topo{lan: lan, c1: c1, lb: lb}, file: filepath.Join(t.TempDir(), "xlbd.yaml")}
	ct.start(t, fmt.Sprintf("iface: eth0\nservices:\n  - vip: \"%s\"\n    backends: [\"%s\"]\n", vip, backend))

	c := c1.NS.HTTPClient(false)
	c.Timeout = 30 * time.Second
	start := time.Now()
	resp, err := c.Post("http://"+vip.String()+"/upload", "application/octet-stream", bytes.NewReader(blob))
	if err != nil {
		t.Fatalf("upload through a 1280-byte hop: %v (counters %v)", err, ct.counters(t))
	}
	echo, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(echo) != hex.EncodeToString(sum[:]) {
		t.Fatalf("upload: backend got sha256 %q (%v), want %x", echo, err, sum)
	}
	t.Logf("upload of %d bytes in %v", len(blob), time.Since(start))
	start = time.Now()
	resp, err = c.Get("http://" + vip.String() + "/blob")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || sha256.Sum256(got) != sum {
		t.Fatalf("download: %d bytes, %v", len(got), err)
	}
	t.Logf("download of %d bytes in %v", len(got), time.Since(start))
	counters := ct.counters(t)
	t.Logf("counters: icmp_error=%d fwd=%d ret=%d", counters["icmp_error"], counters["fwd"], counters["ret"])
	if counters["icmp_error"] == 0 {
		t.Errorf("no ICMP error was translated: the test did not exercise path MTU discovery")
	}
}
