// Package testnet builds network namespaces, veth links and a bridged LAN
// for the end-to-end tests of xlb.
//
// Every helper takes a testing.TB and registers its own cleanup with
// t.Cleanup, so what it created is removed even when the test fails. Names
// carry a random suffix, so parallel runs and leftovers of a killed run never
// collide, and cleanup only ever removes what the helper itself created.
// Everything here needs root; call RequirePrivileged first.
package testnet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces are bind-mounted, as by
// `ip netns add`.
const NetnsDir = "/run/netns"

// NamePrefix starts the name of every namespace this package creates, so a
// person can spot leftovers of a killed test run (`ip netns list | grep xlbt-`).
const NamePrefix = "xlbt-"

var (
	privOnce   sync.Once
	privReason string // empty when privileged tests can run
)

// TB is the part of testing.TB the helpers use, so that a program (the
// demo) can build the same topology with its own cleanup stack.
type TB interface {
	Helper()
	Cleanup(func())
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// RequirePrivileged skips the test, saying why, unless the process is root
// and can load a BPF program and create a network namespace. When the
// environment variable CI is set it fails the test instead: CI must never
// silently skip a privileged suite.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	privOnce.Do(func() { privReason = probePrivileges() })
	if privReason == "" {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("privileged test cannot run in CI: %s", privReason)
	}
	t.Skipf("privileged test skipped: %s", privReason)
}

func probePrivileges() string {
	if os.Geteuid() != 0 {
		return fmt.Sprintf("not root (euid %d)", os.Geteuid())
	}
	prog, err := newPassProgram()
	if err != nil {
		return err.Error()
	}
	prog.Close()
	if err := inNewNetns(func() error { return nil }); err != nil {
		return err.Error()
	}
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return fmt.Sprintf("create %s: %v", NetnsDir, err)
	}
	return ""
}

// newPassProgram loads an XDP program that returns XDP_PASS.
func newPassProgram() (*ebpf.Program, error) { return NewPassProgram("xlbt_pass") }

// NewPassProgram loads an XDP program named name that returns XDP_PASS,
// such as another tool's program found on an interface.
func NewPassProgram(name string) (*ebpf.Program, error) {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: name,
		Type: ebpf.XDP,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 2), // XDP_PASS
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return nil, fmt.Errorf("load xdp pass program: %w", err)
	}
	return prog, nil
}

// newLossProgram loads an XDP program that drops percent per cent of
// frames at random and passes the rest.
func newLossProgram(percent int) (*ebpf.Program, error) {
	if percent < 0 || percent > 100 {
		return nil, fmt.Errorf("loss %d%%: out of range", percent)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "xlbt_loss",
		Type: ebpf.XDP,
		Instructions: asm.Instructions{
			asm.FnGetPrandomU32.Call(),
			asm.Mod.Imm32(asm.R0, 100),
			asm.JGE.Imm(asm.R0, int32(percent), "pass"),
			asm.Mov.Imm(asm.R0, 1), // XDP_DROP
			asm.Return(),
			asm.Mov.Imm(asm.R0, 2).WithSymbol("pass"), // XDP_PASS
			asm.Return(),
		},
		License: "GPL",
	})
	if err != nil {
		return nil, fmt.Errorf("load xdp loss program: %w", err)
	}
	return prog, nil
}

// NS is a named network namespace owned by one test.
type NS struct {
	Name string // the name under NetnsDir, random suffix included
	Path string // NetnsDir/Name, for `nsenter --net=PATH`

	handle netns.NsHandle

	mu         sync.Mutex
	transports []*http.Transport
}

// NewNS creates a named network namespace "xlbt-<name>-<random>" under
// NetnsDir with its loopback up. Cleanup closes the idle connections of
// the namespace's HTTP clients and deletes the namespace.
func NewNS(t TB, name string) *NS {
	t.Helper()
	full := NamePrefix + name + "-" + randomSuffix()
	ns, err := createNS(full)
	if err != nil {
		t.Fatalf("create netns %s: %v", full, err)
	}
	t.Cleanup(func() {
		if err := ns.delete(); err != nil {
			t.Errorf("delete netns %s: %v", ns.Name, err)
		}
	})
	err = ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		t.Fatalf("set lo up in %s: %v", ns.Name, err)
	}
	return ns
}

func createNS(name string) (_ *NS, err error) {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(NetnsDir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, err
	}
	f.Close()
	defer func() {
		if err != nil {
			os.Remove(path)
		}
	}()

	err = inNewNetns(func() error {
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		unix.Unmount(path, unix.MNT_DETACH)
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &NS{Name: name, Path: path, handle: h}, nil
}

// inNewNetns runs fn on a thread of its own in a new, unnamed network
// namespace, and returns the error of unsharing or of fn. The thread stays
// locked and so is discarded when fn returns: it never goes back to the
// root namespace.
func inNewNetns(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func (ns *NS) delete() error {
	ns.mu.Lock()
	for _, tr := range ns.transports {
		tr.CloseIdleConnections()
	}
	ns.transports = nil
	ns.mu.Unlock()

	var errs []error
	if err := ns.handle.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close handle: %w", err))
	}
	if err := unix.Unmount(ns.Path, unix.MNT_DETACH); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s: %w", ns.Path, err))
	}
	if err := os.Remove(ns.Path); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", ns.Path, err))
	}
	return errors.Join(errs...)
}

// Do runs fn on a locked OS thread switched into the namespace, and returns
// its error. Sockets, netlink requests and BPF link attachments by ifindex
// made by fn belong to the namespace; goroutines fn starts do not run in it.
// The thread is switched back afterwards, or discarded if that fails. fn
// runs on a goroutine of its own, so it must not call t.Fatal; a panic in fn
// is re-raised in the caller.
func (ns *NS) Do(fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("open current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns.handle); err != nil {
			// The thread stays locked and is discarded.
			done <- result{err: fmt.Errorf("enter netns %s: %w", ns.Name, err)}
			return
		}
		var res result
		func() {
			defer func() { res.panic = recover() }()
			res.err = fn()
		}()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and is discarded.
			res.err = errors.Join(res.err, fmt.Errorf("leave netns %s: %w", ns.Name, err))
		} else {
			runtime.UnlockOSThread()
		}
		done <- res
	}()
	res := <-done
	if res.panic != nil {
		panic(res.panic)
	}
	return res.err
}

// Exec runs a command in the namespace with nsenter and returns its combined
// output; it fails the test, showing the output, if the command fails.
func (ns *NS) Exec(t TB, args ...string) string {
	t.Helper()
	out, err := ns.ExecErr(args...)
	if err != nil {
		t.Fatalf("%s in %s: %v\n%s", strings.Join(args, " "), ns.Name, err, out)
	}
	return out
}

// ExecErr runs a command in the namespace with `nsenter --net=PATH` (which,
// unlike `ip netns exec`, leaves /sys and so bpffs alone) and returns its
// combined output.
func (ns *NS) ExecErr(args ...string) (string, error) {
	if len(args) == 0 {
		return "", errors.New("exec: no command")
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + ns.Path, "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Sysctl writes value to the sysctl key ("net.ipv4.ip_forward", or a path
// under /proc/sys with slashes) inside the namespace, failing the test on
// error. The namespace is the test's own, so nothing is restored.
func (ns *NS) Sysctl(t TB, key, value string) {
	t.Helper()
	path := key
	if !strings.Contains(key, "/") {
		path = strings.ReplaceAll(key, ".", "/")
	}
	path = filepath.Join("/proc/sys", strings.TrimPrefix(path, "/proc/sys"))
	err := ns.Do(func() error { return os.WriteFile(path, []byte(value), 0) })
	if err != nil {
		t.Fatalf("set sysctl %s=%s in %s: %v", key, value, ns.Name, err)
	}
}

// Listen listens inside the namespace. The listener may be used from any
// goroutine; closing it is the caller's job.
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := ns.Do(func() (err error) {
		l, err = (&net.ListenConfig{}).Listen(context.Background(), network, addr)
		return err
	})
	return l, err
}

// Dial connects from inside the namespace. The connection may be used from
// any goroutine; closing it is the caller's job.
func (ns *NS) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return ns.dial(ctx, &net.Dialer{}, network, addr)
}

// DialFrom opens a TCP connection from inside the namespace from the fixed
// local address laddr ("IP:port") to raddr. The socket has SO_REUSEADDR set,
// so the port can be bound again right after a close; reconnecting the same
// four-tuple while it is in TIME_WAIT still fails, so close with
// SetLinger(0) when a test reuses it.
func (ns *NS) DialFrom(ctx context.Context, laddr, raddr string) (net.Conn, error) {
	lap, err := netip.ParseAddrPort(laddr)
	if err != nil {
		return nil, fmt.Errorf("parse local address: %w", err)
	}
	d := &net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(lap),
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("set SO_REUSEADDR: %w", serr)
			}
			return nil
		},
	}
	return ns.dial(ctx, d, "tcp", raddr)
}

func (ns *NS) dial(ctx context.Context, d *net.Dialer, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// HTTPClient returns an HTTP client whose connections are dialled inside
// the namespace, with no proxy and a 10-second overall timeout. With
// keepAlive false every request uses a new connection (and so, through a
// load balancer, possibly a new backend). Idle connections are closed when
// the namespace is cleaned up.
func (ns *NS) HTTPClient(keepAlive bool) *http.Client {
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         ns.Dial,
		DisableKeepAlives:   !keepAlive,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}
	ns.mu.Lock()
	ns.transports = append(ns.transports, tr)
	ns.mu.Unlock()
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// BackendHeader is the response header ServeHTTP sets to its body.
const BackendHeader = "X-Backend"

// ServeHTTP serves HTTP inside the namespace on addr ("IP:port"; port 0
// picks one), answering every request with body and the header
// "X-Backend: body". It returns once the server listens, with the bound
// address; cleanup stops the server and closes its connections.
func (ns *NS) ServeHTTP(t TB, addr, body string) netip.AddrPort {
	t.Helper()
	l, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, ns.Name, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set(BackendHeader, body)
			w.Header().Set("Content-Type", "text/plain")
			_, _ = w.Write([]byte(body))
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve http on %s in %s: %v", addr, ns.Name, err)
		}
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	ap := l.Addr().(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Get sends a GET request for url with c and returns the body of the
// answer: the name of the backend, from a ServeHTTP server. Anything but
// 200 OK with a BackendHeader equal to the body is an error, so an answer
// from another server is never taken for a backend's.
func Get(ctx context.Context, c *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %s", resp.Status)
	}
	if h := resp.Header.Get(BackendHeader); h != string(body) {
		return "", fmt.Errorf("header %q and body %q disagree", h, body)
	}
	return string(body), nil
}

func randomSuffix() string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("testnet: read random: %v", err))
	}
	return hex.EncodeToString(b[:])
}
