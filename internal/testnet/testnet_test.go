package testnet

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// rootLinks lists the interfaces of the test process's own namespace.
func rootLinks(t *testing.T) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatalf("list links: %v", err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	slices.Sort(names)
	return names
}

// TestLAN runs each case in a sub-test and checks, once the sub-test's
// cleanup has run, that none of its namespaces remain and that the root
// namespace has exactly the links it had before.
func TestLAN(t *testing.T) {
	RequirePrivileged(t)
	before := rootLinks(t)

	tests := []struct {
		name string
		opts LANOptions
		run  func(t *testing.T, lan *LAN)
	}{
		{"tx offload off", LANOptions{}, testHTTP},
		{"native peer xdp", LANOptions{NativePeerXDP: true}, testHTTP},
		{"keep tx offload", LANOptions{KeepTxOffload: true}, testHTTP},
		{"dial from fixed port", LANOptions{}, testDialFrom},
		{"sysctl", LANOptions{}, testSysctl},
	}
	for _, tt := range tests {
		var created []string
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Hosts = []string{"client", "lb", "backend"}
			lan := NewLAN(t, tt.opts)
			created = append(created, lan.Switch.Path)
			for _, h := range lan.Hosts {
				created = append(created, h.NS.Path)
			}
			checkLAN(t, lan, tt.opts)
			tt.run(t, lan)
		})
		if len(created) != 4 {
			t.Fatalf("%s: %d namespaces recorded, want 4", tt.name, len(created))
		}
		for _, p := range created {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("%s: namespace %s left behind (stat: %v)", tt.name, p, err)
			}
		}
		if after := rootLinks(t); !slices.Equal(before, after) {
			t.Errorf("%s: root links changed: before %v, after %v", tt.name, before, after)
		}
	}
}

func checkLAN(t *testing.T, lan *LAN, opts LANOptions) {
	t.Helper()
	for i, h := range lan.Hosts {
		if want := lan.AddrInSubnet(i + 2); h.IP != want {
			t.Errorf("%s: IP %v, want %v", h.Name, h.IP, want)
		}
		if !strings.HasPrefix(filepath.Base(h.NS.Path), NamePrefix+h.Name+"-") {
			t.Errorf("%s: namespace %s lacks the expected name", h.Name, h.NS.Path)
		}
		if len(h.MAC) != 6 {
			t.Errorf("%s: MAC %v", h.Name, h.MAC)
		}
		var tx bool
		err := h.NS.Do(func() (err error) {
			tx, err = ethtoolTxChecksum(h.Iface, nil)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if tx != opts.KeepTxOffload {
			t.Errorf("%s: tx checksum offload %v, want %v", h.Name, tx, opts.KeepTxOffload)
		}
		// Cross-check with ethtool itself where it is installed.
		if _, err := exec.LookPath("ethtool"); err == nil {
			out := h.NS.Exec(t, "ethtool", "-k", h.Iface)
			want := "tx-checksumming: off"
			if opts.KeepTxOffload {
				want = "tx-checksumming: on"
			}
			if !strings.Contains(out, want) {
				t.Errorf("%s: ethtool -k lacks %q:\n%s", h.Name, want, out)
			}
		}

		err = lan.Switch.Do(func() error {
			l, err := netlink.LinkByName(h.PeerIface)
			if err != nil {
				return err
			}
			if l.Attrs().MasterIndex == 0 {
				t.Errorf("%s: %s has no master", h.Name, h.PeerIface)
			}
			xdp := l.Attrs().Xdp
			attached := xdp != nil && xdp.Attached
			if attached != opts.NativePeerXDP {
				t.Errorf("%s: xdp attached to %s: %v, want %v", h.Name, h.PeerIface, attached, opts.NativePeerXDP)
			}
			if attached && xdp.AttachMode != 1 { // XDP_ATTACHED_DRV
				t.Errorf("%s: xdp attach mode %d on %s, want native (1)", h.Name, xdp.AttachMode, h.PeerIface)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := lan.Host("lb"); got != lan.Hosts[1] {
		t.Errorf("Host(lb) = %v", got)
	}
}

func testHTTP(t *testing.T, lan *LAN) {
	client, backend := lan.Host("client"), lan.Host("backend")
	addr := backend.NS.ServeHTTP(t, backend.IP.String()+":8080", "backend")
	if addr.Addr() != backend.IP || addr.Port() != 8080 {
		t.Fatalf("ServeHTTP bound %v", addr)
	}
	for _, keepAlive := range []bool{false, true} {
		c := client.NS.HTTPClient(keepAlive)
		for range 3 {
			resp, err := c.Get("http://" + addr.String() + "/")
			if err != nil {
				t.Fatalf("get (keep-alive %v): %v", keepAlive, err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if string(body) != "backend" || resp.Header.Get(BackendHeader) != "backend" {
				t.Errorf("response %q, %s: %q", body, BackendHeader, resp.Header.Get(BackendHeader))
			}
		}
	}

	// The server listens in the backend's namespace only.
	l, err := client.NS.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	// (This machine's egress may answer for any address, so look for the
	// backend's header rather than for a connection error.)
	root := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	if resp, err := root.Get("http://" + addr.String() + "/"); err == nil {
		resp.Body.Close()
		if resp.Header.Get(BackendHeader) != "" {
			t.Errorf("backend reachable from the root namespace")
		}
	}
}

func testDialFrom(t *testing.T, lan *LAN) {
	client, backend := lan.Host("client"), lan.Host("backend")
	l, err := backend.NS.Listen("tcp", backend.IP.String()+":9000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	laddr := client.IP.String() + ":40000"
	for i := range 2 {
		c, err := client.NS.DialFrom(ctx, laddr, l.Addr().String())
		if err != nil {
			t.Fatalf("dial %d from %s: %v", i, laddr, err)
		}
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if got := s.RemoteAddr().String(); got != laddr {
			t.Errorf("dial %d: server sees %s, want %s", i, got, laddr)
		}
		s.Close()
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
}

func testSysctl(t *testing.T, lan *LAN) {
	lb := lan.Host("lb")
	root, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	lb.NS.Sysctl(t, "net.ipv4.ip_forward", "1")
	if got := strings.TrimSpace(lb.NS.Exec(t, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "1" {
		t.Errorf("ip_forward in %s = %q, want 1", lb.Name, got)
	}
	if got := strings.TrimSpace(lan.Host("client").NS.Exec(t, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "0" {
		t.Errorf("ip_forward in client = %q, want 0", got)
	}
	after, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	if string(root) != string(after) {
		t.Errorf("root ip_forward changed from %q to %q", root, after)
	}
	if _, err := lb.NS.ExecErr("false"); err == nil {
		t.Errorf("ExecErr(false) succeeded")
	}
}

func TestNSDoRunsInsideAndReturns(t *testing.T) {
	RequirePrivileged(t)
	ns := NewNS(t, "do")
	var inside []string
	if err := ns.Do(func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			inside = append(inside, l.Attrs().Name)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(inside, []string{"lo"}) {
		t.Errorf("links inside a new namespace: %v, want [lo]", inside)
	}
	if got := rootLinks(t); slices.Equal(got, []string{"lo"}) {
		t.Errorf("root namespace looks like the new one: %v", got)
	}
	if out := ns.Exec(t, "ip", "-br", "link", "show", "lo"); !strings.Contains(out, "UP") {
		t.Errorf("lo is not up: %s", out)
	}
}
