package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/version"
	"github.com/xlb-project/xlb/internal/xlbtest"
)

// xlbctl runs the command in-process and returns its output and exit
// status as main would.
func xlbctl(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	code = exitCode(run(ctx, args, &out, &errOut), &errOut)
	return out.String(), errOut.String(), code
}

// wantAll fails the test for each of want that text, named what, lacks.
func wantAll(t *testing.T, what, text string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, text)
		}
	}
}

func TestHelp(t *testing.T) {
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"Usage:", "status", "conns", "stats", "config", "reload", "backend", "service", "policy", "chain", "completion",
			"--socket", "--timeout", "--json", "--version"}},
		{[]string{"backend", "--help"}, []string{"add", "remove", "set-weight", "drain", "kept across reloads"}},
		{[]string{"backend", "drain", "--help"}, []string{"weight becomes 0", "--protocol"}},
		{[]string{"service", "add", "--help"}, []string{"--backend IP:PORT[@WEIGHT]", "--check", "--check-interval", "--rise", "--fall", "--http-path",
			"--expect-status", "--all-down", "--reset-established"}},
		{[]string{"reload", "--help"}, []string{"SIGHUP", "refused"}},
		{[]string{"config", "--help"}, []string{"as a configuration file", "live changes applied"}},
		{[]string{"-h"}, []string{"Usage:"}},
		{[]string{"help"}, []string{"Usage:"}},
		{nil, []string{"Usage:", "status"}},
		{[]string{"conns", "--help"}, []string{"--vip VIP:PORT", "--backend IP:PORT", "--state state", "syn, syn-recv, established, fin, closed, udp"}},
		{[]string{"stats", "--help"}, []string{"ipvsadm", "--rate", "--interval"}},
		{[]string{"policy", "set", "--help"}, []string{"--service VIP:PORT", "least-conn"}},
		{[]string{"chain", "--help"}, []string{"add", "list", "remove"}},
		{[]string{"chain", "add", "--help"}, []string{"--object file", "--priority", "--continue-on"}},
		{[]string{"help", "stats"}, []string{"--rate"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, errOut, code := xlbctl(t, tt.args...)
			if code != 0 || errOut != "" {
				t.Fatalf("exit status %d, stderr %q, want 0 and nothing", code, errOut)
			}
			wantAll(t, "help", out, tt.want...)
		})
	}
}

func TestVersionFlag(t *testing.T) {
	out, errOut, code := xlbctl(t, "--version")
	if code != 0 || errOut != "" {
		t.Fatalf("exit status %d, stderr %q", code, errOut)
	}
	if want := "xlbctl " + version.Read().String() + "\n"; out != want {
		t.Errorf("--version printed %q, want %q", out, want)
	}
}

// TestVersionFromVCS builds both binaries with VCS stamping, as `make
// build` does, from a clone of this checkout (the go command finds no VCS
// in a `git worktree` checkout, whose .git is a file), and checks that
// --version names the clone's revision and commit time.
func TestVersionFromVCS(t *testing.T) {
	root, err := xlbtest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "src")
	if out, err := exec.Command("git", "clone", "--quiet", root, src).CombinedOutput(); err != nil {
		t.Fatalf("git clone: %v\n%s", err, out)
	}
	rev, err := exec.Command("git", "-C", src, "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatal(err)
	}
	when, err := exec.Command("git", "-C", src, "log", "-1", "--format=%cd", "--date=format-local:%Y-%m-%dT%H:%M:%SZ").Output()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, name := range []string{"xlbctl", "xlbd"} {
		build := exec.Command("go", "build", "-buildvcs=auto", "-o", filepath.Join(dir, name), "./cmd/"+name)
		build.Dir = src
		build.Env = append(os.Environ(), "TZ=UTC")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", name, err, out)
		}
		cmd := exec.Command(filepath.Join(dir, name), "--version")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s --version: %v\n%s", name, err, out)
		}
		// A clean checkout's module version is a pseudo-version made from
		// the revision (go 1.24 and later), such as v0.0.0-20261204172621-1cf3a19adedf.
		short := strings.TrimSpace(string(rev))[:12]
		for _, want := range []string{name + " v0.0.0-", "-" + short + " github.com/xlb-project/xlb", "revision " + strings.TrimSpace(string(rev)) + ",",
			"committed " + strings.TrimSpace(string(when)), "go1."} {
			if !strings.Contains(string(out), want) {
				t.Errorf("%s --version = %q, lacks %q", name, out, want)
			}
		}
	}
}

func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{
		"bash": "__start_xlbctl",
		"zsh":  "#compdef xlbctl",
		"fish": "complete -c xlbctl",
	} {
		t.Run(shell, func(t *testing.T) {
			out, errOut, code := xlbctl(t, "completion", shell)
			if code != 0 || errOut != "" {
				t.Fatalf("exit status %d, stderr %q", code, errOut)
			}
			if !strings.Contains(out, want) {
				t.Errorf("completion script lacks %q", want)
			}
		})
	}
	// What the scripts ask xlbctl for as the user presses tab.
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{"__complete", ""}, []string{"status", "conns", "stats", "config", "reload", "backend", "service", "policy", "chain", "completion"}},
		{[]string{"__complete", "backend", ""}, []string{"add", "remove", "set-weight", "drain"}},
		{[]string{"__complete", "service", "add", "10.0.0.10:80", "--check", ""}, []string{"tcp", "http", "none"}},
		{[]string{"__complete", "chain", ""}, []string{"add", "list", "remove"}},
		{[]string{"__complete", "conns", "--state", ""}, []string{"syn", "established", "fin", "closed"}},
		{[]string{"__complete", "chain", "add", "fw", "--continue-on", ""}, []string{"aborted", "drop", "pass", "tx", "redirect"}},
		// No xlbd: the built-in policies still complete.
		{[]string{"__complete", "--socket", "/nonexistent/xlbd.sock", "policy", "set", ""}, []string{"random", "hash", "least-conn"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, _, code := xlbctl(t, tt.args...)
			if code != 0 {
				t.Fatalf("exit status %d", code)
			}
			lines := strings.Split(out, "\n")
			for _, w := range tt.want {
				found := false
				for _, l := range lines {
					if l == w || strings.HasPrefix(l, w+"\t") {
						found = true
					}
				}
				if !found {
					t.Errorf("completions lack %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{"bogus"}, []string{`unknown command "bogus" for "xlbctl"`, "Run 'xlbctl --help' for usage."}},
		{[]string{"chain", "bogus"}, []string{`unknown command "bogus" for "xlbctl chain"`, "Run 'xlbctl chain --help'"}},
		{[]string{"status", "--bogus"}, []string{"unknown flag: --bogus", "Run 'xlbctl status --help'"}},
		{[]string{"policy", "set"}, []string{"policy set takes one policy NAME or plugin path, not 0 arguments"}},
		{[]string{"policy", "set", "hash", "--service", "10.0.0.1"}, []string{`--service "10.0.0.1" is not VIP:PORT`}},
		{[]string{"chain", "remove", "a", "b"}, []string{"chain remove takes one member NAME, not 2 arguments"}},
		{[]string{"chain", "add", "fw"}, []string{`required flag(s) "object" not set`}},
		{[]string{"conns", "--vip", "10.0.0.1"}, []string{`vip filter "10.0.0.1" is not IP:PORT`}},
		{[]string{"conns", "--backend", "backend-a:80"}, []string{`backend filter "backend-a:80" is not IP:PORT`}},
		{[]string{"conns", "--state", "open"}, []string{`state filter "open" is not one of syn, syn-recv, established, fin, closed, udp`}},
		{[]string{"conns", "--protocol", "sctp"}, []string{`protocol filter "sctp" is not one of tcp, udp`}},
		{[]string{"stats", "--interval", "0s", "--rate"}, []string{"--interval 0s: want a positive duration"}},
		{[]string{"--timeout", "soon", "status"}, []string{`invalid argument "soon" for "--timeout"`}},
		{[]string{"backend", "add", "10.0.0.10:80"}, []string{"backend add takes a service VIP:PORT and a backend IP:PORT, not 1 arguments"}},
		{[]string{"backend", "add", "10.0.0.10", "10.0.0.2:80"}, []string{`service "10.0.0.10" is not VIP:PORT`}},
		{[]string{"backend", "remove", "10.0.0.10:80", "backend-a"}, []string{`backend "backend-a" is not IP:PORT`}},
		{[]string{"backend", "set-weight", "10.0.0.10:80", "10.0.0.2:80", "heavy"}, []string{`weight "heavy" is not a whole number from 0 to 65535`}},
		{[]string{"backend", "set-weight", "10.0.0.10:80", "10.0.0.2:80", "70000"}, []string{`weight "70000" is not a whole number`}},
		{[]string{"backend", "drain", "10.0.0.10:80", "10.0.0.2:80", "--protocol", "sctp"}, []string{`--protocol "sctp" is not tcp or udp`}},
		{[]string{"service", "add", "10.0.0.10:80"}, []string{`required flag(s) "backend" not set`}},
		{[]string{"service", "add", "10.0.0.10:80", "--backend", "10.0.0.2"}, []string{`--backend "10.0.0.2" is not IP:PORT[@WEIGHT]`}},
		{[]string{"service", "add", "10.0.0.10:80", "--backend", "10.0.0.2:80@x"}, []string{`weight "x" is not a whole number`}},
		{[]string{"service", "remove"}, []string{"service remove takes a service VIP:PORT, not 0 arguments"}},
		{[]string{"reload", "now"}, []string{`unknown command "now" for "xlbctl reload"`}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, errOut, code := xlbctl(t, append(tt.args, "--socket", "/nonexistent/xlbd.sock")...)
			if code != 2 {
				t.Errorf("exit status %d, want 2", code)
			}
			if out != "" {
				t.Errorf("stdout %q, want nothing", out)
			}
			wantAll(t, "stderr", errOut, tt.want...)
		})
	}
}

// TestUnreachable checks the messages when xlbd cannot be reached: each
// names the socket and says what to do, and none shows the control
// protocol's internals.
func TestUnreachable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")

	// A socket file nobody listens on, as a killed xlbd leaves it.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	// A socket that accepts but never answers, as a stuck xlbd would.
	stuck := filepath.Join(dir, "stuck.sock")
	sl, err := net.Listen("unix", stuck)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sl.Close() })
	go func() {
		for {
			c, err := sl.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()

	notSock := filepath.Join(dir, "plain-file")
	if err := os.WriteFile(notSock, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"no socket", []string{"--socket", missing, "status"},
			[]string{"no xlbd socket at " + missing, "is xlbd running?", "systemctl start xlbd", "--socket or XLB_SOCKET"}},
		{"stale socket", []string{"--socket", stale, "conns"},
			[]string{"nothing answers on " + stale, "xlbd is not running there", "journalctl -u xlbd"}},
		{"stuck xlbd", []string{"--socket", stuck, "--timeout", "300ms", "stats"},
			[]string{"xlbd at " + stuck + " did not answer within 300ms", "--timeout"}},
		{"not a socket", []string{"--socket", notSock, "chain", "list"},
			[]string{notSock + " is not a socket", "--socket or XLB_SOCKET"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, code := xlbctl(t, tt.args...)
			if code != 1 || out != "" {
				t.Errorf("exit status %d, stdout %q; want 1 and nothing", code, out)
			}
			wantAll(t, "stderr", errOut, tt.want...)
			for _, bad := range []string{"http://", "/v1/", "Get \"", "dial unix"} {
				if strings.Contains(errOut, bad) {
					t.Errorf("stderr shows internals %q:\n%s", bad, errOut)
				}
			}
		})
	}
	t.Run("environment", func(t *testing.T) {
		t.Setenv("XLB_SOCKET", missing)
		_, errOut, code := xlbctl(t, "status")
		if code != 1 || !strings.Contains(errOut, "no xlbd socket at "+missing) {
			t.Errorf("exit status %d, stderr %q; want 1 naming %s", code, errOut, missing)
		}
	})
}

// TestPermissionDenied runs the real binary as an unprivileged user
// against a root-only socket, as xlbd makes it.
func TestPermissionDenied(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run xlbctl as another user")
	}
	// Every directory on the way must be open to the other user.
	dir := xlbtest.TempDir(t, "", "xlbctl-perm-")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "xlbctl")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "xlbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(sock, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--socket", sock, "status")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v, want status 1; output %q", err, out)
	}
	wantAll(t, "output", string(out), "permission denied on "+sock, "run xlbctl as root")
}
