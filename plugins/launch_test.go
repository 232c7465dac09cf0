package plugins_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/xlbtest"
	"github.com/xlb-project/xlb/plugins"
	"github.com/xlb-project/xlb/plugins/random"
)

// buildPlugin builds package pkg into dir/name and returns the path.
func buildPlugin(t *testing.T, dir, name, pkg string) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("no go command to build %s: %v", pkg, err)
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command(gobin, "build", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// recorder is a slog.Handler that keeps every record.
type recorder struct {
	mu      sync.Mutex
	records []string
	attrs   []slog.Attr
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }

func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %q", rec.Level, rec.Message)
	for _, a := range r.attrs {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
	}
	rec.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, b.String())
	return nil
}

func (r *recorder) WithAttrs(as []slog.Attr) slog.Handler {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &child{r, append(append([]slog.Attr(nil), r.attrs...), as...)}
}

func (r *recorder) WithGroup(string) slog.Handler { return r }

// find returns the first record holding every one of the substrings.
func (r *recorder) find(subs ...string) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
next:
	for _, rec := range r.records {
		for _, s := range subs {
			if !strings.Contains(rec, s) {
				continue next
			}
		}
		return rec, true
	}
	return "", false
}

// child is the recorder with attributes attached.
type child struct {
	root  *recorder
	attrs []slog.Attr
}

func (c *child) Enabled(context.Context, slog.Level) bool { return true }
func (c *child) Handle(ctx context.Context, rec slog.Record) error {
	r2 := rec.Clone()
	r2.AddAttrs(c.attrs...)
	return c.root.Handle(ctx, r2)
}
func (c *child) WithAttrs(as []slog.Attr) slog.Handler {
	return &child{c.root, append(append([]slog.Attr(nil), c.attrs...), as...)}
}
func (c *child) WithGroup(string) slog.Handler { return c }

func testRequest() plugins.Request {
	return plugins.Request{
		Service: netip.MustParseAddrPort("192.0.2.10:80"),
		Backends: []plugins.Backend{
			{Address: netip.MustParseAddrPort("10.0.0.1:8080"), Weight: 2},
			{Address: netip.MustParseAddrPort("10.0.0.2:8080"), Weight: 4},
			{Address: netip.MustParseAddrPort("10.0.0.3:8080"), Weight: 6, State: plugins.StateDraining},
		},
	}
}

// waitFor polls cond for up to 10 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLaunchRandom runs the real xlb-policy-random process.
func TestLaunchRandom(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	bin := buildPlugin(t, dir, "xlb-policy-random", "./random/cmd/xlb-policy-random")
	path, err := plugins.Resolve("random", dir)
	if err != nil || path != bin {
		t.Fatalf("Resolve = %q, %v; want %q", path, err, bin)
	}
	raw, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)

	t.Run("wrong checksum", func(t *testing.T) {
		wrong := sha256.Sum256([]byte("not the plugin"))
		c, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: bin, SHA256: wrong[:]})
		if err == nil {
			c.Close()
			t.Fatal("Launch with a wrong sha256: no error")
		}
		want := fmt.Sprintf("launch policy %s: checksum mismatch: pinned sha256 %x, file has sha256 %x", bin, wrong, sum)
		if err.Error() != want || !errors.Is(err, plugins.ErrChecksumMismatch) {
			t.Fatalf("err = %v\nwant %s", err, want)
		}
	})

	rec := &recorder{}
	c, err := plugins.Launch(ctx, plugins.LaunchConfig{
		Path:         bin,
		SHA256:       sum[:],
		Logger:       slog.New(rec),
		StartTimeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info != (plugins.Info{Name: random.Name, Version: random.Version, APIVersion: plugins.ProtocolVersion, Needs: random.Needs}) {
		t.Errorf("Info = %+v", info)
	}
	sel, err := c.Select(ctx, testRequest())
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeRandom || fmt.Sprint(sel.Table) != "[0 1 1]" {
		t.Errorf("Select = %+v, want random [0 1 1]", sel)
	}
	if c.Pid() <= 0 {
		t.Fatalf("Pid = %d", c.Pid())
	}

	// The plugin's own log lines reach the host's slog logger.
	waitFor(t, "the plugin's log line", func() bool {
		_, ok := rec.find(`"serving policy"`, "plugin=xlb-policy-random", "name=random", fmt.Sprintf("pid=%d", c.Pid()))
		return ok
	})
	waitFor(t, "the plugin's select log line", func() bool {
		_, ok := rec.find(`DEBUG "select"`, "plugin=xlb-policy-random", "mode=random", "table_len=3")
		return ok
	})

	// Kill the plugin behind the host's back.
	if err := syscall.Kill(c.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "Exited", c.Exited)
	_, err = c.Select(ctx, testRequest())
	if !errors.Is(err, plugins.ErrExited) {
		t.Fatalf("Select after SIGKILL = %v, want ErrExited", err)
	}
	if want := "policy random: select 192.0.2.10:80: plugin process exited"; err.Error() != want {
		t.Errorf("err = %q, want %q", err, want)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after exit: %v", err)
	}
	if testing.Verbose() {
		for _, r := range rec.records {
			t.Log(r)
		}
	}
}

func TestLaunchClose(t *testing.T) {
	ctx := context.Background()
	bin := buildPlugin(t, t.TempDir(), "xlb-policy-hash", "./hash/cmd/xlb-policy-hash")
	c, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: bin})
	if err != nil {
		t.Fatal(err)
	}
	sel, err := c.Select(ctx, testRequest())
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeHash || len(sel.Table) != 1021 {
		t.Errorf("Select = %s, %d entries", sel.Mode, len(sel.Table))
	}
	pid := c.Pid()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if !c.Exited() {
		t.Error("Exited = false after Close")
	}
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("process %d still there after Close", pid)
	}
}

func TestLaunchErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	notPlugin := filepath.Join(dir, "xlb-policy-false")
	if err := os.WriteFile(notPlugin, []byte("#!/bin/sh\necho not a plugin >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: notPlugin, StartTimeout: 10 * time.Second})
	if err == nil || !strings.HasPrefix(err.Error(), "launch policy "+notPlugin+": ") {
		t.Errorf("Launch of a non-plugin = %v", err)
	}
	_, err = plugins.Launch(ctx, plugins.LaunchConfig{Path: filepath.Join(dir, "missing"), SHA256: make([]byte, 32)})
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("Launch of a missing file = %v", err)
	}

	// A plugin that never completes the handshake: ctx ends the wait.
	hang := filepath.Join(dir, "xlb-policy-hang")
	if err := os.WriteFile(hang, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = plugins.Launch(cctx, plugins.LaunchConfig{Path: hang})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Launch of a hanging plugin = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Launch took %s after its context ended", d)
	}
}

// TestLaunchV1Plugin runs a plugin built as the version 1 SDK built them:
// the handshake settles on version 1, the host assumes it reads live load
// every second, and a backend that is down reaches it as draining, so it
// leaves it out.
func TestLaunchV1Plugin(t *testing.T) {
	ctx := context.Background()
	bin := buildPlugin(t, t.TempDir(), "xlb-policy-v1", "./testdata/policy-v1")
	c, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: bin})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.APIVersion() != 1 || c.Name() != "v1" {
		t.Errorf("APIVersion, Name = %d, %q; want 1, v1", c.APIVersion(), c.Name())
	}
	if want := (plugins.Needs{LiveLoad: true, RefreshInterval: time.Second}); c.Needs() != want {
		t.Errorf("Needs = %+v, want %+v", c.Needs(), want)
	}
	req := testRequest()
	req.Backends[0].State = plugins.StateDown
	sel, err := c.Select(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != plugins.ModeRandom || fmt.Sprint(sel.Table) != "[1]" {
		t.Errorf("Select = %+v, want random [1]: only the backend that is up", sel)
	}
}

// stopped stops pid with SIGSTOP and makes sure it is neither left stopped
// nor alive when the test ends.
func stopped(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !xlbtest.ProcessGone(pid) {
			_ = syscall.Kill(pid, syscall.SIGCONT)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// TestLaunchStoppedPlugin: a stopped plugin (SIGSTOP) makes a call fail
// with ErrHung once the call deadline has passed, and is killed; Close of
// a stopped plugin returns within its shutdown deadline, the process
// killed.
func TestLaunchStoppedPlugin(t *testing.T) {
	ctx := context.Background()
	bin := buildPlugin(t, t.TempDir(), "xlb-policy-random", "./random/cmd/xlb-policy-random")
	const callTimeout, shutdownTimeout = 500 * time.Millisecond, 300 * time.Millisecond
	launch := func() *plugins.Client {
		c, err := plugins.Launch(ctx, plugins.LaunchConfig{Path: bin, CallTimeout: callTimeout, ShutdownTimeout: shutdownTimeout})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	t.Run("call", func(t *testing.T) {
		c := launch()
		stopped(t, c.Pid())
		start := time.Now()
		_, err := c.Select(ctx, testRequest())
		took := time.Since(start)
		if !errors.Is(err, plugins.ErrHung) || !strings.Contains(err.Error(), "no answer within 500ms, plugin killed") {
			t.Fatalf("Select of a stopped plugin = %v, want ErrHung", err)
		}
		if took < callTimeout || took > callTimeout+time.Second {
			t.Errorf("Select took %s, want about %s", took, callTimeout)
		}
		waitFor(t, "the stopped plugin's death", func() bool { return xlbtest.ProcessGone(c.Pid()) })
		if !c.Exited() {
			t.Error("Exited = false after the kill")
		}
		if err := c.Ping(ctx); !errors.Is(err, plugins.ErrExited) {
			t.Errorf("Ping after the kill = %v, want ErrExited", err)
		}
		t.Logf("Select failed after %s; process gone %s after the call began", took, time.Since(start))
	})

	t.Run("close", func(t *testing.T) {
		c := launch()
		stopped(t, c.Pid())
		start := time.Now()
		c.Close()
		took := time.Since(start)
		if took > shutdownTimeout+time.Second {
			t.Errorf("Close of a stopped plugin took %s, want about %s", took, shutdownTimeout)
		}
		if !xlbtest.ProcessGone(c.Pid()) {
			t.Errorf("process %d still there after Close", c.Pid())
		}
		t.Logf("Close of a stopped plugin took %s", took)
	})
}

// TestPluginDiesWithHost kills (SIGKILL) a host that launched a plugin and
// keeps making OS threads exit: the plugin survives the thread exits while
// the host lives, and is gone within a second of the host's death.
func TestPluginDiesWithHost(t *testing.T) {
	dir := t.TempDir()
	bin := buildPlugin(t, dir, "xlb-policy-random", "./random/cmd/xlb-policy-random")
	host := buildPlugin(t, dir, "policy-host", "./testdata/policy-host")
	cmd := exec.Command(host, bin)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	var pid int
	if _, err := fmt.Fscan(out, &pid); err != nil || pid <= 0 {
		t.Fatalf("read the plugin's pid: %d, %v", pid, err)
	}
	t.Cleanup(func() {
		if !xlbtest.ProcessGone(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	time.Sleep(500 * time.Millisecond) // about 50 thread exits in the host
	if xlbtest.ProcessGone(pid) {
		t.Fatal("the plugin died while its host lives (a thread exit fired its parent-death signal)")
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for !xlbtest.ProcessGone(pid) {
		if time.Since(killed) > time.Second {
			t.Fatalf("plugin %d still alive %s after its host got SIGKILL", pid, time.Since(killed))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("plugin gone %s after its host got SIGKILL", time.Since(killed).Round(time.Millisecond))
}
