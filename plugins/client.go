package plugins

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults of LaunchConfig.
const (
	DefaultStartTimeout    = time.Minute
	DefaultCallTimeout     = 2 * time.Second
	DefaultShutdownTimeout = time.Second
)

// LaunchConfig says which policy plugin to start and how.
type LaunchConfig struct {
	// Path is the plugin executable (see Resolve).
	Path string
	// SHA256, when set, pins the executable: Launch refuses a binary whose
	// SHA-256 differs (go-plugin's SecureConfig checks it again at exec).
	SHA256 []byte
	// Logger receives go-plugin's messages and everything the plugin logs,
	// each record with the key "plugin". Nil discards them.
	Logger *slog.Logger
	// StartTimeout bounds the handshake; 0 means DefaultStartTimeout.
	StartTimeout time.Duration
	// CallTimeout bounds every call (Info, Select, Ping), whatever the
	// caller's context says: a plugin that does not answer in time is taken
	// for hung and killed (SIGKILL). 0 means DefaultCallTimeout.
	CallTimeout time.Duration
	// ShutdownTimeout bounds Close's clean shutdown, after which the
	// process is killed (SIGKILL). 0 means DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
}

// Client is a running policy plugin as seen by the host. Its methods are
// safe for concurrent use. The plugin process gets SIGKILL when the host
// process dies, even by SIGKILL (a parent-death signal).
type Client struct {
	name            string // policy name (executable name until Info), for errors
	proc            *plugin.Client
	rpc             *grpcClient
	cmd             *exec.Cmd
	pid             int
	version         int   // the negotiated API version
	needs           Needs // what the plugin reads
	callTimeout     time.Duration
	shutdownTimeout time.Duration
	log             *slog.Logger
	stop            context.CancelFunc

	killed    atomic.Bool
	closeOnce sync.Once
	gone      chan struct{} // closed once the process is gone (Close, kill)
}

// Launch starts the policy plugin at cfg.Path, completes the go-plugin
// handshake (gRPC only, automatic mutual TLS, API version negotiated among
// MinProtocolVersion..ProtocolVersion) and checks the API version the
// plugin reports. ctx bounds the start only: cancelling it later does not
// stop the plugin; Close does.
//
// The process is started from an OS thread of its own that stays locked
// until the process is gone, with a parent-death signal (SIGKILL): the
// kernel sends that signal when the thread that started the process exits,
// which is then only when the host process dies.
func Launch(ctx context.Context, cfg LaunchConfig) (_ *Client, err error) {
	name := filepath.Base(cfg.Path)
	if cfg.Path == "" {
		return nil, errors.New("launch policy: no plugin path")
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("plugin", name)
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = DefaultStartTimeout
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	}

	var secure *plugin.SecureConfig
	if len(cfg.SHA256) > 0 {
		if len(cfg.SHA256) != sha256.Size {
			return nil, fmt.Errorf("launch policy %s: pinned sha256 has %d bytes, want %d", cfg.Path, len(cfg.SHA256), sha256.Size)
		}
		if err := VerifySHA256(cfg.Path, cfg.SHA256); err != nil {
			return nil, err
		}
		secure = &plugin.SecureConfig{Checksum: cfg.SHA256, Hash: sha256.New()}
	}

	// procCtx ends the process if ctx ends during the start (go-plugin's
	// Kill waits for the start to finish), and after a failed start; Close
	// ends it after go-plugin's Kill.
	procCtx, stop := context.WithCancel(context.Background())
	cmd := exec.CommandContext(procCtx, cfg.Path)
	setParentDeathSignal(cmd)
	stdio := &lineLogger{log: newSlogHCLog(logger.With("stream", "stdio")), level: hclog.Debug}
	versions := make(map[int]plugin.PluginSet)
	for v := MinProtocolVersion; v <= ProtocolVersion; v++ {
		versions[v] = PluginMap(Info{}, nil)
	}
	proc := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  Handshake,
		VersionedPlugins: versions,
		Cmd:              cmd,
		SecureConfig:     secure,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		StartTimeout:     cfg.StartTimeout,
		Logger:           newSlogHCLog(logger),
		SyncStdout:       stdio,
		SyncStderr:       stdio,
	})
	c := &Client{
		name: name, proc: proc, cmd: cmd, stop: stop, log: logger,
		callTimeout: cfg.CallTimeout, shutdownTimeout: cfg.ShutdownTimeout,
		gone: make(chan struct{}),
	}
	defer func() {
		if err != nil {
			c.kill()
		}
	}()

	type started struct {
		conn plugin.ClientProtocol
		err  error
	}
	ch := make(chan started, 1)
	go func() {
		// The start forks on this thread, which is never unlocked: it
		// exits with this goroutine, once the process is gone. Until then
		// no other goroutine runs on it, so it cannot exit early (as a
		// thread does when a goroutine that locked it returns) and fire the
		// parent-death signal too soon.
		runtime.LockOSThread()
		conn, err := proc.Client()
		ch <- started{conn, err}
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for !proc.Exited() {
			select {
			case <-c.gone:
				return
			case <-t.C:
			}
		}
	}()
	var st started
	select {
	case st = <-ch:
	case <-ctx.Done():
		stop()
		<-ch
		return nil, fmt.Errorf("launch policy %s: %w", cfg.Path, ctx.Err())
	}
	if st.err != nil {
		if errors.Is(st.err, plugin.ErrChecksumsDoNotMatch) {
			sum, _ := fileSHA256(cfg.Path)
			return nil, checksumError(cfg.Path, cfg.SHA256, sum)
		}
		return nil, fmt.Errorf("launch policy %s: %w", cfg.Path, st.err)
	}
	if rc := proc.ReattachConfig(); rc != nil {
		c.pid = rc.Pid
	}
	raw, err := st.conn.Dispense(PluginName)
	if err != nil {
		return nil, fmt.Errorf("launch policy %s: dispense: %w", cfg.Path, err)
	}
	rpc, ok := raw.(*grpcClient)
	if !ok {
		return nil, fmt.Errorf("launch policy %s: dispense: unexpected %T", cfg.Path, raw)
	}
	c.rpc = rpc
	c.version = proc.NegotiatedVersion()
	if err := c.handshake(ctx); err != nil {
		return nil, fmt.Errorf("launch policy %s: %w", cfg.Path, err)
	}
	return c, nil
}

// handshake asks the plugin's Info and checks its API version against the
// negotiated one.
func (c *Client) handshake(ctx context.Context) error {
	info, err := c.info(ctx)
	if err != nil {
		return fmt.Errorf("info: %w", err)
	}
	if info.APIVersion != c.version {
		return fmt.Errorf("%w: plugin %q speaks %d, host speaks %d", ErrIncompatible, info.Name, info.APIVersion, c.version)
	}
	if info.Name == "" {
		return errors.New("info: plugin has no name")
	}
	c.name = info.Name
	c.needs = info.Needs
	if c.version < 2 {
		c.needs = v1Needs
	}
	return nil
}

// VerifySHA256 checks a plugin binary against its pinned SHA-256, so a
// host can refuse a bad pin before it starts anything.
func VerifySHA256(path string, want []byte) error {
	sum, err := fileSHA256(path)
	if err != nil {
		return fmt.Errorf("launch policy %s: %w", path, err)
	}
	if !bytes.Equal(sum, want) {
		return checksumError(path, want, sum)
	}
	return nil
}

func checksumError(path string, want, have []byte) error {
	return fmt.Errorf("launch policy %s: %w: pinned sha256 %x, file has sha256 %x", path, ErrChecksumMismatch, want, have)
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("hash %s: %w", path, err)
	}
	return h.Sum(nil), nil
}

// call runs fn with the call deadline. When the deadline passes before the
// plugin answered (and the caller's own context is still live), the plugin
// is taken for hung: its process is killed and the error wraps ErrHung.
func (c *Client) call(ctx context.Context, fn func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, c.callTimeout)
	defer cancel()
	err := fn(cctx)
	if err == nil {
		return nil
	}
	// gRPC may report the deadline a moment before the context's own timer
	// fires: either says the plugin did not answer.
	hung := errors.Is(cctx.Err(), context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded
	if hung && ctx.Err() == nil {
		c.kill()
		return fmt.Errorf("%w: no answer within %s, plugin killed", ErrHung, c.callTimeout)
	}
	if c.Exited() {
		return fmt.Errorf("%w: %w", ErrExited, err)
	}
	return err
}

func (c *Client) info(ctx context.Context) (Info, error) {
	var info Info
	err := c.call(ctx, func(ctx context.Context) (err error) {
		info, err = c.rpc.Info(ctx)
		return err
	})
	return info, err
}

// Info asks the plugin for its name, version, API version and needs.
func (c *Client) Info(ctx context.Context) (Info, error) {
	if c.Exited() {
		return Info{}, fmt.Errorf("policy %s: info: %w", c.name, ErrExited)
	}
	info, err := c.info(ctx)
	if err != nil {
		return Info{}, fmt.Errorf("policy %s: info: %w", c.name, err)
	}
	return info, nil
}

// Ping checks that the plugin answers (an Info call within the call
// deadline); a plugin that does not is killed, and the error wraps ErrHung.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.Info(ctx)
	return err
}

// Select asks the plugin for the selection state of req and checks the
// answer with Selection.ValidateFor. A request without an eligible backend
// returns ErrNoBackends without asking the plugin, and so does the plugin's
// "no backend" answer (API version 2).
func (c *Client) Select(ctx context.Context, req Request) (Selection, error) {
	if len(req.Eligible()) == 0 {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, ErrNoBackends)
	}
	if c.Exited() {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, ErrExited)
	}
	if c.version < 3 {
		// Health is version 3's: an older plugin must not see it.
		req.Backends = slices.Clone(req.Backends)
		for i := range req.Backends {
			req.Backends[i].Health = HealthNone
		}
	}
	var sel Selection
	err := c.call(ctx, func(ctx context.Context) (err error) {
		sel, err = c.rpc.Select(ctx, req)
		return err
	})
	if err != nil {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, err)
	}
	if c.version >= 2 && len(sel.Table) == 0 && sel.Mode == 0 {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, ErrNoBackends)
	}
	if err := sel.ValidateFor(req.Backends); err != nil {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, err)
	}
	return sel, nil
}

// Needs says what the plugin reads, and so when the host should ask it: a
// version 1 plugin reads live load, every second.
func (c *Client) Needs() Needs { return c.needs }

// APIVersion is the API version negotiated with the plugin.
func (c *Client) APIVersion() int { return c.version }

// Name is the policy's name, as the plugin reported it.
func (c *Client) Name() string { return c.name }

// Exited reports whether the plugin process has exited or was killed.
func (c *Client) Exited() bool {
	return c.killed.Load() || (c.proc != nil && c.proc.Exited())
}

// Pid returns the plugin's process id (0 for an in-process plugin).
func (c *Client) Pid() int { return c.pid }

// Close ends the plugin: go-plugin's clean shutdown (a Shutdown call, then
// a wait for the process to exit), bounded by the shutdown deadline, after
// which the process gets SIGKILL. It returns once the process is gone, or
// after a second deadline if even that could not be seen.
func (c *Client) Close() error {
	c.end(false)
	return nil
}

// kill ends the plugin at once: SIGKILL, then go-plugin's clean-up.
func (c *Client) kill() {
	c.killed.Store(true)
	c.end(true)
}

// end ends the plugin once: a clean shutdown bounded by the shutdown
// deadline (unless now), SIGKILL, and go-plugin's clean-up.
func (c *Client) end(now bool) {
	c.closeOnce.Do(func() {
		if now || !c.release(c.shutdownTimeout) {
			if !now {
				c.log.Warn("policy plugin did not shut down in time; killing it", "pid", c.pid, "timeout", c.shutdownTimeout.String())
			}
			c.sigkill()
			if !c.release(c.shutdownTimeout) {
				c.log.Error("policy plugin killed but not reaped", "pid", c.pid)
			}
		}
		if c.stop != nil {
			c.stop()
		}
		close(c.gone)
	})
}

// sigkill sends SIGKILL to the plugin process (by its pid, through the
// process handle, which cannot reach a reused pid).
func (c *Client) sigkill() {
	c.killed.Store(true)
	if c.cmd != nil && c.cmd.Process != nil {
		if err := c.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			c.log.Warn("kill policy plugin", "pid", c.pid, "err", err)
		}
	}
}

// release runs go-plugin's Kill (a Shutdown call, a wait for the process,
// then its own kill, and the release of pipes and connections) and reports
// whether it finished within d. go-plugin's Shutdown call has no deadline,
// so it may hang on a stopped plugin until the process is killed; it then
// finishes in the background.
func (c *Client) release(d time.Duration) bool {
	if c.proc == nil {
		return true
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.proc.Kill()
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// policyName is the form of a plain policy name.
var policyName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)

// CheckPolicy checks the form of a policy as a configuration or xlbctl
// names it, without looking at any file: either a plain name
// ([a-z0-9][a-z0-9-]*, such as "least-conn"), which Resolve looks up as
// xlb-policy-NAME in the plugin directory, or the absolute path of a plugin
// binary. The error wraps ErrBadPolicyName.
func CheckPolicy(policy string) error {
	if policyName.MatchString(policy) || (filepath.IsAbs(policy) && !strings.HasSuffix(policy, "/")) {
		return nil
	}
	return fmt.Errorf("%q is %w ([a-z0-9][a-z0-9-]*)", policy, ErrBadPolicyName)
}

// Resolve maps a policy name to its executable: "random" is
// <pluginDir>/xlb-policy-random. An absolute path is used as it is. Either
// way the file must exist and be executable.
func Resolve(name, pluginDir string) (string, error) {
	if err := CheckPolicy(name); err != nil {
		return "", fmt.Errorf("resolve policy: %w", err)
	}
	path := name
	if !filepath.IsAbs(name) {
		if pluginDir == "" {
			return "", fmt.Errorf("resolve policy %q: no plugin directory", name)
		}
		path = filepath.Join(pluginDir, "xlb-policy-"+name)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("resolve policy %q: %w", name, err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("resolve policy %q: %s: %w", name, path, ErrNotExecutable)
	}
	return path, nil
}
