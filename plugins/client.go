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
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
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
	// StartTimeout bounds the handshake; 0 means one minute.
	StartTimeout time.Duration
}

// Client is a running policy plugin as seen by the host. Its methods are
// safe for concurrent use.
type Client struct {
	name string // policy name (executable name until Info), for errors
	proc *plugin.Client
	rpc  *grpcClient
	pid  int
	stop context.CancelFunc
}

// Launch starts the policy plugin at cfg.Path, completes the go-plugin
// handshake (gRPC only, automatic mutual TLS) and checks the API version the
// plugin reports. ctx bounds the start only: cancelling it later does not
// stop the plugin; Close does.
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
	stdio := &lineLogger{log: newSlogHCLog(logger.With("stream", "stdio")), level: hclog.Debug}
	proc := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  Handshake,
		Plugins:          PluginMap(Info{}, nil),
		Cmd:              exec.CommandContext(procCtx, cfg.Path),
		SecureConfig:     secure,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		StartTimeout:     cfg.StartTimeout,
		Logger:           newSlogHCLog(logger),
		SyncStdout:       stdio,
		SyncStderr:       stdio,
	})
	defer func() {
		if err != nil {
			stop()
			proc.Kill()
		}
	}()

	type started struct {
		conn plugin.ClientProtocol
		err  error
	}
	ch := make(chan started, 1)
	go func() {
		conn, err := proc.Client()
		ch <- started{conn, err}
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
	raw, err := st.conn.Dispense(PluginName)
	if err != nil {
		return nil, fmt.Errorf("launch policy %s: dispense: %w", cfg.Path, err)
	}
	rpc, ok := raw.(*grpcClient)
	if !ok {
		return nil, fmt.Errorf("launch policy %s: dispense: unexpected %T", cfg.Path, raw)
	}
	c := &Client{name: name, proc: proc, rpc: rpc, stop: stop}
	if rc := proc.ReattachConfig(); rc != nil {
		c.pid = rc.Pid
	}
	if err := c.handshake(ctx); err != nil {
		return nil, fmt.Errorf("launch policy %s: %w", cfg.Path, err)
	}
	return c, nil
}

// handshake asks the plugin's Info and checks its API version.
func (c *Client) handshake(ctx context.Context) error {
	info, err := c.rpc.Info(ctx)
	if err != nil {
		return fmt.Errorf("info: %w", err)
	}
	if info.APIVersion != ProtocolVersion {
		return fmt.Errorf("%w: plugin %q speaks %d, host speaks %d", ErrIncompatible, info.Name, info.APIVersion, ProtocolVersion)
	}
	if info.Name == "" {
		return errors.New("info: plugin has no name")
	}
	c.name = info.Name
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

// Info asks the plugin for its name, version and API version.
func (c *Client) Info(ctx context.Context) (Info, error) {
	if c.Exited() {
		return Info{}, fmt.Errorf("policy %s: info: %w", c.name, ErrExited)
	}
	info, err := c.rpc.Info(ctx)
	if err != nil {
		return Info{}, fmt.Errorf("policy %s: info: %w", c.name, err)
	}
	return info, nil
}

// Select asks the plugin for the selection state of req and checks the
// answer with Selection.ValidateFor. A request without an eligible backend
// returns ErrNoBackends without asking the plugin: no table could be valid.
func (c *Client) Select(ctx context.Context, req Request) (Selection, error) {
	if len(req.Eligible()) == 0 {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, ErrNoBackends)
	}
	if c.Exited() {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, ErrExited)
	}
	sel, err := c.rpc.Select(ctx, req)
	if err != nil {
		if c.Exited() {
			err = fmt.Errorf("%w: %w", ErrExited, err)
		}
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, err)
	}
	if err := sel.ValidateFor(req.Backends); err != nil {
		return Selection{}, fmt.Errorf("policy %s: select %s: %w", c.name, req.Service, err)
	}
	return sel, nil
}

// Exited reports whether the plugin process has exited.
func (c *Client) Exited() bool { return c.proc != nil && c.proc.Exited() }

// Pid returns the plugin's process id (0 for an in-process plugin).
func (c *Client) Pid() int { return c.pid }

// Close kills the plugin process (after a short grace period for a clean
// exit) and releases the connection.
func (c *Client) Close() error {
	if c.proc != nil {
		c.proc.Kill()
	}
	if c.stop != nil {
		c.stop()
	}
	return nil
}

var policyName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)

// Resolve maps a policy name to its executable: "random" is
// <pluginDir>/xlb-policy-random. An absolute path is used as it is. Either
// way the file must exist and be executable.
func Resolve(name, pluginDir string) (string, error) {
	var path string
	switch {
	case filepath.IsAbs(name):
		path = name
	case policyName.MatchString(name):
		if pluginDir == "" {
			return "", fmt.Errorf("resolve policy %q: no plugin directory", name)
		}
		path = filepath.Join(pluginDir, "xlb-policy-"+name)
	default:
		return "", fmt.Errorf("resolve policy %q: not a policy name ([a-z0-9_-]) nor an absolute path", name)
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
