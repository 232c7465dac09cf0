// Package packaging_test checks what `make install` installs, the systemd
// unit, the default configuration and the Dockerfile.
package packaging_test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

// root is the repository's top directory.
func root(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// goLine is the go.mod's `go` version, such as 1.26.8.
func goLine(t testing.TB) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(root(t), "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(raw)
	if m == nil {
		t.Fatal("no go line in go.mod")
	}
	return string(m[1])
}

// makeInstall runs `make install` with vars (such as DESTDIR=...), the
// binaries built into a temporary directory rather than bin/.
func makeInstall(t testing.TB, vars ...string) {
	t.Helper()
	args := append([]string{"-C", root(t), "install", "BIN=" + filepath.Join(t.TempDir(), "bin")}, vars...)
	out, err := exec.Command("make", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// installedFiles lists the regular files under dir, relative to it.
func installedFiles(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out = append(out, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// unitValues returns the values of key in a unit file, in order.
func unitValues(t testing.TB, unit, key string) []string {
	t.Helper()
	raw, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(raw))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), key+"="); ok {
			out = append(out, v)
		}
	}
	return out
}

// TestSystemdUnit installs with real paths (no DESTDIR) so the unit's
// commands exist, and checks it with systemd-analyze verify, which must
// neither fail nor warn.
func TestSystemdUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed (.ci/install-deps installs it)")
	}
	prefix := filepath.Join(t.TempDir(), "usr")
	makeInstall(t, "PREFIX="+prefix, "SYSCONFDIR="+filepath.Join(prefix, "etc"))
	unit := filepath.Join(prefix, "lib/systemd/system/xlbd.service")
	cmd := exec.Command("systemd-analyze", "verify", unit)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}
	for key, want := range map[string]string{
		"Type":                     "notify",
		"ExecStart":                filepath.Join(prefix, "bin/xlbd") + " --config " + filepath.Join(prefix, "etc/xlb/xlb.yaml"),
		"ExecReload":               "/bin/kill -HUP $MAINPID",
		"CapabilityBoundingSet":    "CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
		"RestartPreventExitStatus": "2",
		"RuntimeDirectory":         "xlb",
	} {
		if got := unitValues(t, unit, key); len(got) != 1 || got[0] != want {
			t.Errorf("%s=%q, want %q", key, got, want)
		}
	}

	// verify must be able to fail: a unit with an unknown key.
	bad := filepath.Join(t.TempDir(), "bad.service")
	if err := os.WriteFile(bad, []byte("[Service]\nExecStart=/bin/true\nTyep=notify\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ = exec.Command("systemd-analyze", "verify", bad).CombinedOutput()
	if !strings.Contains(string(out), "Unknown key") {
		t.Errorf("systemd-analyze verify does not report an unknown key: %q", out)
	}
}

// TestFindGo checks that the Makefile's go finder passes over a go that
// is too old, as Debian 12's /usr/bin/go (1.19) is, and says what to do
// when it is all there is.
func TestFindGo(t *testing.T) {
	fake := t.TempDir()
	old := filepath.Join(fake, "go")
	script := "#!/bin/sh\n[ \"$1 $2\" = \"env GOVERSION\" ] && echo go1.19.8\n"
	if err := os.WriteFile(old, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	find := filepath.Join(root(t), "scripts/find-go")

	cmd := exec.Command(find, "--check", old)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("find-go --check accepted Go 1.19.8")
	}
	for _, want := range []string{"needs Go " + goLine(t) + " or newer", old + " is Go 1.19.8", "/usr/local/go", "make GO="} {
		if !strings.Contains(string(out), want) {
			t.Errorf("find-go --check output lacks %q:\n%s", want, out)
		}
	}

	// With the old go first in PATH the finder picks another, new enough.
	real, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(find)
	cmd.Env = append(os.Environ(), "PATH="+fake+":/usr/bin:/bin", "HOME="+t.TempDir())
	out, err = cmd.Output()
	got := strings.TrimSpace(string(out))
	switch {
	case err != nil && real != "/usr/local/go/bin/go":
		t.Skipf("this machine's go (%s) is not where find-go looks without PATH", real)
	case err != nil:
		t.Fatalf("find-go found nothing: %v", err)
	case got == old:
		t.Fatalf("find-go picked the old go %s", got)
	}
	if err := exec.Command(find, "--check", got).Run(); err != nil {
		t.Errorf("find-go picked %s, which its own check refuses", got)
	}
}

// TestDockerfile lints the Dockerfile with BuildKit's own parser and
// linter (the checks of `docker build --check`), as no Docker engine is
// at hand to build it, and checks what it relies on.
func TestDockerfile(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(root(t), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := parser.Parse(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("parse Dockerfile: %v", err)
	}
	for _, w := range res.Warnings {
		t.Errorf("parser: %s (line %d)", w.Short, w.Location.Start.Line)
	}
	lint := linter.New(&linter.Config{
		ExperimentalAll: true,
		Warn: func(rule, _, _, msg string, loc []parser.Range) {
			line := 0
			if len(loc) > 0 {
				line = loc[0].Start.Line
			}
			t.Errorf("lint %s: %s (line %d)", rule, msg, line)
		},
	})
	stages, metaArgs, err := instructions.Parse(res.AST, lint)
	if err != nil {
		t.Fatalf("Dockerfile instructions: %v", err)
	}
	if len(stages) < 2 {
		t.Fatalf("%d stages, want a build and a runtime stage", len(stages))
	}

	args := map[string]string{}
	for _, a := range metaArgs {
		for _, kv := range a.Args {
			if kv.Value != nil {
				args[kv.Key] = *kv.Value
			}
		}
	}
	if got, want := args["GO_VERSION"], goLine(t); got != want {
		t.Errorf("ARG GO_VERSION=%s, go.mod says go %s", got, want)
	}

	names := map[string]bool{}
	for _, s := range stages {
		names[s.Name] = true
		for _, c := range s.Commands {
			cp, ok := c.(*instructions.CopyCommand)
			if !ok {
				continue
			}
			if cp.From != "" {
				if !names[cp.From] {
					t.Errorf("COPY --from=%s: no earlier stage of that name", cp.From)
				}
				continue
			}
			for _, src := range cp.SourcePaths {
				if _, err := os.Stat(filepath.Join(root(t), src)); err != nil {
					t.Errorf("COPY %s: %v", src, err)
				}
			}
		}
	}

	// The runtime stage starts the installed xlbd with the packaged
	// configuration: both are where make install PREFIX=/usr puts them.
	final := stages[len(stages)-1]
	var entry, cmd []string
	for _, c := range final.Commands {
		switch c := c.(type) {
		case *instructions.EntrypointCommand:
			entry = c.CmdLine
		case *instructions.CmdCommand:
			cmd = c.CmdLine
		}
	}
	dest := t.TempDir()
	makeInstall(t, "DESTDIR="+dest, "PREFIX=/usr")
	if len(entry) != 1 {
		t.Fatalf("ENTRYPOINT %q, want the xlbd binary", entry)
	}
	if fi, err := os.Stat(filepath.Join(dest, entry[0])); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("ENTRYPOINT %s is not an installed executable: %v", entry[0], err)
	}
	if i := slices.Index(cmd, "--config"); i < 0 || i+1 >= len(cmd) {
		t.Errorf("CMD %q does not give --config", cmd)
	} else if _, err := os.Stat(filepath.Join(dest, cmd[i+1])); err != nil {
		t.Errorf("CMD's configuration %s is not installed: %v", cmd[i+1], err)
	}

	// The documented run line names the privileges xlb needs.
	for _, want := range []string{"--network host", "--privileged", "/sys/fs/bpf"} {
		if !strings.Contains(string(raw), want) {
			t.Errorf("the Dockerfile's usage lacks %q", want)
		}
	}

	// The linter must be able to fail: a Dockerfile with casing problems.
	var warned []string
	bad, _ := parser.Parse(strings.NewReader("FROM debian as build\nfrom debian:12\nCOPY --from=build /x /x\nENTRYPOINT /usr/bin/xlbd\n"))
	_, _, _ = instructions.Parse(bad.AST, linter.New(&linter.Config{Warn: func(rule, _, _, _ string, _ []parser.Range) {
		warned = append(warned, rule)
	}}))
	if len(warned) == 0 {
		t.Errorf("the linter found nothing wrong in a bad Dockerfile")
	}
}
