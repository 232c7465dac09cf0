package packaging_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// notifySocket listens where xlbd's sd_notify messages go, as systemd's
// socket would.
type notifySocket struct {
	path string
	conn *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &notifySocket{path: path, conn: c}
}

// next returns the next message, waiting up to timeout.
func (n *notifySocket) next(t *testing.T, timeout time.Duration) string {
	t.Helper()
	buf := make([]byte, 4096)
	n.conn.SetReadDeadline(time.Now().Add(timeout))
	k, err := n.conn.Read(buf)
	if err != nil {
		t.Fatalf("no sd_notify message within %s: %v", timeout, err)
	}
	return string(buf[:k])
}

// capBits are the capability numbers of linux/capability.h that the unit
// may name.
var capBits = map[string]uint{"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}

// boundingSet turns the unit's CapabilityBoundingSet into setpriv's
// --bounding-set argument and the CapEff mask the process must have.
func boundingSet(t *testing.T, caps []string) (arg string, mask uint64) {
	t.Helper()
	arg = "-all"
	for _, c := range caps {
		bit, ok := capBits[c]
		if !ok {
			t.Fatalf("unit names %s, which this test does not know", c)
		}
		arg += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		mask |= 1 << bit
	}
	return arg, mask
}

// TestInstall installs into a DESTDIR and runs the installed xlbd from
// there in network namespaces, the way the installed systemd unit runs it:
// with exactly the unit's capabilities, with systemd's notification
// socket, reloaded by SIGHUP and stopped by SIGTERM. It finds its plugins
// in the installed plugin directory without being told where they are.
func TestInstall(t *testing.T) {
	testnet.RequirePrivileged(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is needed: %v", err)
	}
	dest := t.TempDir()
	makeInstall(t, "DESTDIR="+dest, "PREFIX=/usr/local")
	want := []string{
		"etc/xlb/xlb.yaml",
		"usr/local/bin/xlbctl",
		"usr/local/bin/xlbd",
		"usr/local/lib/systemd/system/xlbd.service",
		"usr/local/lib/xlb/plugins/xlb-policy-hash",
		"usr/local/lib/xlb/plugins/xlb-policy-least-conn",
		"usr/local/lib/xlb/plugins/xlb-policy-random",
		"usr/local/share/bash-completion/completions/xlbctl",
		"usr/local/share/doc/xlb/configuration.md",
		"usr/local/share/doc/xlb/grafana-dashboard.json",
		"usr/local/share/doc/xlb/operations.md",
		"usr/local/share/fish/vendor_completions.d/xlbctl.fish",
		"usr/local/share/zsh/site-functions/_xlbctl",
	}
	got := installedFiles(t, dest)
	for _, f := range want {
		fi, err := os.Stat(filepath.Join(dest, f))
		if err != nil {
			t.Errorf("not installed: %s (installed: %v)", f, got)
			continue
		}
		if exe := strings.Contains(f, "/bin/") || strings.Contains(f, "/plugins/"); exe != (fi.Mode()&0o111 != 0) {
			t.Errorf("%s has mode %v", f, fi.Mode())
		}
	}
	xlbd := filepath.Join(dest, "usr/local/bin/xlbd")
	xlbctl := filepath.Join(dest, "usr/local/bin/xlbctl")
	conf := filepath.Join(dest, "etc/xlb/xlb.yaml")
	unit := filepath.Join(dest, "usr/local/lib/systemd/system/xlbd.service")

	// A second install keeps the operator's configuration.
	if err := os.WriteFile(conf, []byte("# mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	makeInstall(t, "DESTDIR="+dest, "PREFIX=/usr/local")
	if raw, _ := os.ReadFile(conf); string(raw) != "# mine\n" {
		t.Errorf("make install overwrote the configuration: %q", raw)
	}
	packaged, err := os.ReadFile(filepath.Join(root(t), "packaging/xlb.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, packaged, 0o644); err != nil {
		t.Fatal(err)
	}

	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"client", "lb", "backend-a", "backend-b"}})
	client, lb := lan.Host("client"), lan.Host("lb")
	var backends []string
	for _, name := range []string{"backend-a", "backend-b"} {
		h := lan.Host(name)
		h.NS.ServeHTTP(t, fmt.Sprintf("%s:8080", h.IP), name)
		backends = append(backends, fmt.Sprintf("%s:8080", h.IP))
	}
	vip := fmt.Sprintf("%s:80", lb.IP)
	bset, mask := boundingSet(t, strings.Fields(strings.Join(unitValues(t, unit, "CapabilityBoundingSet"), " ")))
	run := func(caps string, env []string, args ...string) *exec.Cmd {
		cmd := exec.Command("nsenter", append([]string{"--net=" + lb.NS.Path, "--", "setpriv", "--bounding-set", caps, "--", xlbd}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		// Plugins hold xlbd's output open if xlbd dies without
		// stopping them: do not wait for them.
		cmd.WaitDelay = 2 * time.Second
		return cmd
	}

	t.Run("the default configuration is refused, naming what to fill in", func(t *testing.T) {
		out, err := run(bset, nil, "--config", conf).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Fatalf("exit: %v, want status 2\n%s", err, out)
		}
		for _, w := range []string{"iface: required", "services: none defined"} {
			if !strings.Contains(string(out), w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	})

	sock := filepath.Join(t.TempDir(), "xlbd.sock")
	// A pin path of its own: the default is the host's xlbd's.
	pin := xlbtest.NewPinPath()
	t.Cleanup(func() { xlbtest.CleanupPinPath(lb.NS, pin) })
	filled := fmt.Sprintf("iface: eth0\nxdp-mode: generic\nsocket: %s\npin-path: %s\nservices:\n  - vip: %s\n    backends: [%s]\n",
		sock, pin, vip, strings.Join(backends, ", "))
	if err := os.WriteFile(conf, []byte(filled), 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("each capability of the unit is needed", func(t *testing.T) {
		caps := strings.Fields(strings.Join(unitValues(t, unit, "CapabilityBoundingSet"), " "))
		for i, c := range caps {
			fewer, _ := boundingSet(t, append(append([]string{}, caps[:i]...), caps[i+1:]...))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			cmd := run(fewer, nil, "--config", conf)
			cmd = exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
			cmd.WaitDelay = 2 * time.Second
			out, err := cmd.CombinedOutput()
			cancel()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Errorf("without %s: %v, want exit status 1\n%s", c, err, out)
			}
		}
	})

	notify := newNotifySocket(t)
	out := &xlbtest.SyncBuffer{}
	cmd := run(bset, []string{"NOTIFY_SOCKET=" + notify.path}, "--config", conf)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var exitErr error
	go func() {
		exitErr = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() { xlbtest.Terminate(cmd.Process, done) })
	defer func() {
		if t.Failed() {
			t.Logf("xlbd output:\n%s", out)
		}
	}()

	if msg := notify.next(t, 20*time.Second); !strings.HasPrefix(msg, "READY=1\nSTATUS=serving 1 services on eth0") {
		t.Fatalf("first notification %q, want READY=1", msg)
	}
	if eff := capEff(t, cmd.Process.Pid); eff != mask {
		t.Errorf("xlbd's effective capabilities %#x, want %#x (the unit's)", eff, mask)
	}

	// Traffic through the installed xlbd and its installed plugin.
	seen := map[string]int{}
	hc := client.NS.HTTPClient(false)
	for i := 0; i < 30; i++ {
		b, err := testnet.Get(t.Context(), hc, "http://"+vip+"/")
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		seen[b]++
	}
	if seen["backend-a"] == 0 || seen["backend-b"] == 0 {
		t.Errorf("answers by backend %v, want both", seen)
	}
	status, err := exec.Command(xlbctl, "--socket", sock, "status").CombinedOutput()
	if err != nil {
		t.Fatalf("installed xlbctl status: %v\n%s", err, status)
	}
	plugin := filepath.Join(dest, "usr/local/lib/xlb/plugins/xlb-policy-random")
	if !strings.Contains(string(status), "policy plugin random") || !strings.Contains(string(status), plugin) {
		t.Errorf("status does not show the installed plugin %s:\n%s", plugin, status)
	}

	// systemctl reload sends SIGHUP: RELOADING=1, then READY=1.
	if err := os.WriteFile(conf, []byte(strings.Replace(filled, backends[1], backends[1]+"@3", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if msg := notify.next(t, 10*time.Second); !strings.HasPrefix(msg, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Errorf("notification after SIGHUP %q, want RELOADING=1", msg)
	}
	if msg := notify.next(t, 10*time.Second); !strings.HasPrefix(msg, "READY=1\nSTATUS=serving 1 services") {
		t.Errorf("notification after the reload %q, want READY=1", msg)
	}
	status, _ = exec.Command(xlbctl, "--socket", sock, "status").CombinedOutput()
	if !strings.Contains(string(status), "weight 3") {
		t.Errorf("reload not applied:\n%s", status)
	}

	// systemctl stop sends SIGTERM: STOPPING=1 and a clean exit.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if msg := notify.next(t, 10*time.Second); msg != "STOPPING=1" {
		t.Errorf("notification after SIGTERM %q, want STOPPING=1", msg)
	}
	select {
	case <-done:
		if exitErr != nil {
			t.Errorf("xlbd exit: %v", exitErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("xlbd did not exit within 10 s of SIGTERM")
	}
}

// capEff reads a process's effective capabilities.
func capEff(t *testing.T, pid int) uint64 {
	t.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no CapEff in /proc/PID/status")
	return 0
}
