// Package xlbtest starts the real xlbd (and its plugins) for end-to-end
// tests and the demo: binaries built from this module, run as processes
// inside a network namespace, stopped by their own pid at cleanup.
package xlbtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/xlb-project/xlb/dispatcher"
	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/control"
	"github.com/xlb-project/xlb/internal/testnet"
)

// Binaries are the commands Build makes, by output name and package.
var Binaries = map[string]string{
	"xlbd":                  "./cmd/xlbd",
	"xlbctl":                "./cmd/xlbctl",
	"xlb-policy-random":     "./plugins/random/cmd/xlb-policy-random",
	"xlb-policy-hash":       "./plugins/hash/cmd/xlb-policy-hash",
	"xlb-policy-least-conn": "./plugins/leastconn/cmd/xlb-policy-least-conn",
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// ModuleRoot finds the directory holding go.mod, from the working directory up.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find module root: no go.mod above the working directory")
		}
		dir = parent
	}
}

// UseBinaries makes Build return dir, holding already built binaries,
// instead of compiling them (the demo runs what `make build` made).
func UseBinaries(dir string) {
	buildOnce.Do(func() { buildDir = dir })
	prebuilt = true
}

var prebuilt bool

// Build compiles every entry of Binaries into one directory (once per
// process) and returns it. The directory is removed by Cleanup.
func Build() (string, error) {
	buildOnce.Do(func() {
		root, err := ModuleRoot()
		if err != nil {
			buildErr = err
			return
		}
		buildDir, buildErr = os.MkdirTemp("", "xlb-bin-")
		if buildErr != nil {
			return
		}
		for name, pkg := range Binaries {
			if _, err := os.Stat(filepath.Join(root, pkg)); err != nil {
				continue // not in this tree yet
			}
			cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, name), pkg)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("build %s: %v\n%s", pkg, err, out)
				return
			}
		}
	})
	return buildDir, buildErr
}

// Cleanup removes the build directory; call it from TestMain.
func Cleanup() {
	if buildDir != "" && !prebuilt {
		os.RemoveAll(buildDir)
	}
}

// Daemon is a running xlbd.
type Daemon struct {
	Socket  string
	PinPath string // where it pins its state
	Dir     string // the binaries' directory (xlbd's default plugin dir)
	cmd     *exec.Cmd
	log     *syncBuffer
	done    chan struct{}
	err     error

	clientOnce sync.Once
	client     *control.Client
}

// SyncBuffer collects a process's output; it is safe for concurrent use.
type SyncBuffer = syncBuffer

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start runs xlbd with args inside ns (a --socket in a fresh directory is
// added unless args has one) and waits until its control socket answers.
// Cleanup stops it with SIGTERM (SIGKILL after 5 s) and logs its output
// if the test failed.
func Start(t testnet.TB, ns *testnet.NS, args ...string) *Daemon {
	t.Helper()
	return StartBinary(t, ns, "", args...)
}

// StartBinary is Start with another xlbd binary ("" is the one Build
// made), such as a build of another version for an upgrade. Its default
// plugin directory is its own; Dir is still Build's, for xlbctl.
func StartBinary(t testnet.TB, ns *testnet.NS, xlbd string, args ...string) *Daemon {
	t.Helper()
	dir, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	if xlbd == "" {
		xlbd = filepath.Join(dir, "xlbd")
	}
	d := &Daemon{Dir: dir, log: &syncBuffer{}, done: make(chan struct{})}
	if !hasFlag(args, "--socket") {
		d.Socket = filepath.Join(TempDir(t, "", "xlbd-sock-"), "xlbd.sock")
		args = append(args, "--socket", d.Socket)
	} else {
		d.Socket = flagValue(args, "--socket")
	}
	if d.PinPath = ConfigPinPath(args); d.PinPath == "" {
		d.PinPath = NewPinPath()
		args = append(args, "--pin-path", d.PinPath)
	}
	// Registered before the stop below, so it runs after it: whatever
	// the daemon left (it may have been killed, or told to keep its data
	// path) is removed.
	t.Cleanup(func() { CleanupPinPath(ns, d.PinPath) })
	d.cmd = exec.Command("nsenter", append([]string{"--net=" + ns.Path, "--", xlbd}, args...)...)
	d.cmd.Stdout = d.log
	d.cmd.Stderr = d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start xlbd: %v", err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.Stop()
		if d.client != nil {
			d.client.Close()
		}
		if f, ok := t.(interface{ Failed() bool }); ok && f.Failed() {
			if l, ok := t.(interface{ Logf(string, ...any) }); ok {
				l.Logf("xlbd output:\n%s", d.log.String())
			}
		}
	})
	if err := d.waitReady(15 * time.Second); err != nil {
		t.Fatalf("xlbd did not become ready: %v\noutput:\n%s", err, d.log.String())
	}
	return d
}

func (d *Daemon) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c := d.Client()
	for {
		select {
		case <-d.done:
			return fmt.Errorf("exited: %v", d.err)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Status(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client returns the daemon's control client (one per daemon, closed at
// cleanup).
func (d *Daemon) Client() *control.Client {
	d.clientOnce.Do(func() {
		var err error
		if d.client, err = control.Dial(d.Socket); err != nil {
			panic(fmt.Sprintf("dial %s: %v", d.Socket, err)) // only for a malformed target
		}
	})
	return d.client
}

// Pid is xlbd's process id (of nsenter, which execs xlbd in place).
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Signal sends sig to xlbd.
func (d *Daemon) Signal(sig os.Signal) error { return d.cmd.Process.Signal(sig) }

// Output is what xlbd logged so far.
func (d *Daemon) Output() string { return d.log.String() }

// Exited reports whether xlbd has exited, and its error.
func (d *Daemon) Exited() (bool, error) {
	select {
	case <-d.done:
		return true, d.err
	default:
		return false, nil
	}
}

// Stop ends xlbd: SIGTERM, then SIGKILL after 5 s. It returns the exit error.
func (d *Daemon) Stop() error {
	Terminate(d.cmd.Process, d.done)
	return d.err
}

// Terminate ends process p, whose waiter closes done once it has exited:
// SIGTERM, then SIGKILL after 5 s. It returns when done is closed, at once
// if it already is.
func Terminate(p *os.Process, done <-chan struct{}) {
	select {
	case <-done:
		return
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = p.Kill()
		<-done
	}
}

// ProcessGone reports whether process pid has exited: it is gone, or a
// zombie nobody reaped yet.
func ProcessGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// "pid (comm) state ...": the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}

// PinnedMapID is the id of the map pinned at pin: the same id after a
// change means the same map, its contents kept.
func PinnedMapID(t testnet.TB, pin string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// TempDir creates a directory in parent (os.TempDir() when "") named
// pattern and a random suffix, as os.MkdirTemp does, and removes it with
// its contents at cleanup. Unlike t.TempDir the directory can be on the
// bpffs ("/sys/fs/bpf", for a pin path), and its path is short enough for
// a unix socket.
func TempDir(t testnet.TB, parent, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp(parent, pattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// NewPinPath returns a fresh pin path on the bpffs for one test's xlbd (not
// created): tests never share the default one, which another xlbd on the
// machine may use.
func NewPinPath() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("/sys/fs/bpf/xlbt-%x", b)
}

// CleanupPinPath removes what an xlbd left under pinPath, as `xlbd cleanup`
// run in ns does; when that fails (the namespace is gone) it removes the
// pins.
func CleanupPinPath(ns *testnet.NS, pinPath string) {
	if _, err := os.Stat(pinPath); err != nil {
		return
	}
	if dir, err := Build(); err == nil {
		cmd := exec.Command("nsenter", "--net="+ns.Path, "--", filepath.Join(dir, "xlbd"), "cleanup", "--pin-path", pinPath)
		if cmd.Run() == nil {
			return
		}
	}
	_ = os.RemoveAll(pinPath)
}

// LeftPins lists what is left in the pin directory pinPath besides the
// ISN and cookie secrets, which a full stop keeps on purpose
// (dispatcher.SecretsPin); nil when the directory is gone.
func LeftPins(pinPath string) []string {
	ents, err := os.ReadDir(pinPath)
	if err != nil {
		return nil
	}
	var left []string
	for _, e := range ents {
		if e.Name() != dispatcher.SecretsPin {
			left = append(left, e.Name())
		}
	}
	return left
}

// ConfigPinPath is the pin path args give: --pin-path, or a --config
// file's pin-path.
func ConfigPinPath(args []string) string {
	if p := flagValue(args, "--pin-path"); p != "" {
		return p
	}
	if f := flagValue(args, "--config"); f != "" {
		if p, err := config.PinPathOf(f); err == nil {
			return p
		}
	}
	return ""
}

func hasFlag(args []string, name string) bool {
	for _, a := range args {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// pipelineBTF reads the BTF of the pipeline's committed bpf2go object
// (dispatcher/xlb_*_bpfel.o): the C definitions as the data path has them.
func pipelineBTF() (*btf.Spec, error) {
	root, err := ModuleRoot()
	if err != nil {
		return nil, err
	}
	objs, err := filepath.Glob(filepath.Join(root, "dispatcher", "xlb*_bpfel.o"))
	if err != nil || len(objs) != 1 {
		return nil, fmt.Errorf("find the pipeline's object in dispatcher/: %v %v", objs, err)
	}
	return btf.LoadSpec(objs[0])
}

// PipelineEnum returns the values of an enum of the pipeline's committed
// object (read by pipelineBTF), by name, and fails the test when it cannot.
func PipelineEnum(t testnet.TB, name string) []btf.EnumValue {
	t.Helper()
	spec, err := pipelineBTF()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.TypeByName(name, &enum); err != nil {
		t.Fatalf("enum %s in the pipeline's BTF: %v", name, err)
	}
	return enum.Values
}
