// Package config loads and validates the configuration of xlbd.
//
// The configuration comes from four layers, highest precedence first:
// command-line flags, XLB_* environment variables, a YAML file named by
// --config, and built-in defaults. Parse merges them with a fresh
// github.com/spf13/viper instance per call, refuses unknown keys anywhere in
// the file, and validates the result. It touches no kernel state and does not
// look at network interfaces; the only file it checks, apart from the
// configuration file itself, is each chain member's object.
//
// docs/configuration.md is the reference for every key.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"
)

// Config is xlbd's configuration. The mapstructure tags are the YAML keys.
type Config struct {
	// Iface is the network interface xlb attaches to. Required.
	Iface string `mapstructure:"iface"`
	// XDPMode is "native" or "generic".
	XDPMode string `mapstructure:"xdp-mode"`
	// SourceAddresses are the addresses used towards backends by
	// services that name none of their own, IPv4 and IPv6 ones. Without
	// one of a service's family the interface's primary address of that
	// family is used, resolved by the daemon.
	SourceAddresses AddrPool `mapstructure:"source-addresses"`
	// SourcePorts is the range of source ports used towards backends.
	// The zero value means the default: 10000-32767 when a source
	// address is one of the host's, 1024-65535 when none is.
	SourcePorts PortRange `mapstructure:"source-ports"`
	// DefaultPolicy is the policy of services that name none.
	DefaultPolicy string `mapstructure:"policy"`
	// PluginDir is where policy plugins are looked up; empty means the
	// directory of the xlbd binary.
	PluginDir string `mapstructure:"plugin-dir"`
	// PluginSHA256 pins policy plugins: policy name to hex SHA-256 of the
	// plugin binary.
	PluginSHA256 map[string]string `mapstructure:"plugin-sha256"`
	// Socket is the path of the unix control socket.
	Socket string `mapstructure:"socket"`
	// SocketGroup, when set, is the group (a name or a number) that may
	// use the control socket besides root: the socket is then mode 0660.
	SocketGroup string `mapstructure:"socket-group"`
	// PinPath is the bpffs directory where xlb pins its maps and programs.
	PinPath string `mapstructure:"pin-path"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `mapstructure:"log-level"`
	// LogFormat is "text" (slog's key=value lines) or "json" (one JSON
	// object per line).
	LogFormat string `mapstructure:"log-format"`
	// MetricsAddress is where the Prometheus endpoint listens, as
	// "[IP]:PORT"; empty means no endpoint.
	MetricsAddress string `mapstructure:"metrics-address"`
	// Conntrack sizes the connection table and sets its timeouts.
	Conntrack Conntrack `mapstructure:"conntrack"`
	// Services are the virtual services to balance.
	Services []Service `mapstructure:"services"`
	// Chain are the XDP programs chained with xlb on the interface.
	Chain []ChainMember `mapstructure:"chain"`
	// XLBPriority is the place of xlb's own pipeline in the chain,
	// 0 to 1000, lower runs first.
	XLBPriority int `mapstructure:"xlb-priority"`
	// SYNDefence configures the SYN flood defence.
	SYNDefence SYNDefence `mapstructure:"syn-defence"`
	// HealthConcurrency bounds the health checks running at once.
	HealthConcurrency int `mapstructure:"health-concurrency"`
	// ManageVIP is the default of the services' manage-vip: whether
	// xlbd adds a VIP that is not an address of the host to the
	// interface (and removes it again), or leaves the address to another
	// owner such as keepalived.
	ManageVIP bool `mapstructure:"manage-vip"`
	// VIPFilter installs an nftables table that keeps the host's own
	// services off the VIPs: on a VIP, ports no service uses are refused
	// instead of reaching the host's listeners.
	VIPFilter bool `mapstructure:"vip-filter"`

	// FreshState (--fresh-state, not a key) makes xlbd remove the state
	// an earlier run pinned instead of adopting it.
	FreshState bool `mapstructure:"-"`
}

// ManagesVIP tells whether xlbd adds and removes the VIP address of s.
func (c *Config) ManagesVIP(s Service) bool {
	if s.ManageVIP != nil {
		return *s.ManageVIP
	}
	return c.ManageVIP
}

// SYNDefence configures the SYN flood defence: SYNs from sources that have
// not answered a challenge recently are challenged instead of served.
type SYNDefence struct {
	// Mode is auto (challenge while a backend has HalfOpen half-open
	// connections or more), on (always) or off.
	Mode string `mapstructure:"mode"`
	// HalfOpen is the per-backend number of half-open connections from
	// which auto challenges.
	HalfOpen int `mapstructure:"half-open"`
	// TrustFor is how long a source that answered a challenge is served
	// without another.
	TrustFor time.Duration `mapstructure:"trust-for"`
}

// PortRange is an inclusive range of ports, written "LO-HI".
type PortRange struct{ Lo, Hi uint16 }

// String returns the range as "LO-HI", or "auto" for the zero value.
func (r PortRange) String() string {
	if r == (PortRange{}) {
		return "auto"
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// Resolve returns the range in force: r, or for "auto" (the zero value)
// 10000-32767 when a source address is one of the host's (outside the
// kernel's default ephemeral ports), else 1024-65535.
func (r PortRange) Resolve(anyLocal bool) PortRange {
	switch {
	case r != (PortRange{}):
		return r
	case anyLocal:
		return PortRange{Lo: 10000, Hi: 32767}
	}
	return PortRange{Lo: 1024, Hi: 65535}
}

// AddrPool is a list of IPv4 and IPv6 addresses and prefixes, written as a YAML
// list or as one string separated by commas or spaces: "10.0.0.5,
// 10.0.0.8/30". A prefix stands for every address in it.
type AddrPool []netip.Prefix

// Addrs lists the pool's addresses, in order, each once.
func (p AddrPool) Addrs() []netip.Addr {
	var out []netip.Addr
	for _, pf := range p {
		for a := pf.Masked().Addr(); pf.Contains(a); a = a.Next() {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// String returns the pool as written in a configuration.
func (p AddrPool) String() string {
	out := make([]string, len(p))
	for i, pf := range p {
		if pf.IsSingleIP() {
			out[i] = pf.Addr().String()
		} else {
			out[i] = pf.String()
		}
	}
	return strings.Join(out, ",")
}

// protocol is the service's protocol, tcp when unset.
func (s Service) protocol() string {
	if s.Protocol == "" {
		return "tcp"
	}
	return s.Protocol
}

// AllSourceAddresses lists every source address the configuration uses:
// the top-level ones, then those only services name.
func (c *Config) AllSourceAddresses() []netip.Addr {
	pool := slices.Clone(c.SourceAddresses)
	for _, s := range c.Services {
		pool = append(pool, s.SourceAddresses...)
	}
	return pool.Addrs()
}

// HasIPv6 tells whether a service has an IPv6 VIP or an IPv6 source
// address is configured: then xlbd sizes its IPv6 tables at start.
func (c *Config) HasIPv6() bool {
	return slices.ContainsFunc(c.Services, func(s Service) bool { return !s.VIP.Addr().Is4() }) ||
		slices.ContainsFunc(c.AllSourceAddresses(), func(a netip.Addr) bool { return !a.Is4() })
}

// Conntrack configures the connection tracking table.
type Conntrack struct {
	// MaxEntries is the capacity of the connection table.
	MaxEntries int `mapstructure:"max-entries"`
	// GCInterval is how often expired entries are collected.
	GCInterval time.Duration `mapstructure:"gc-interval"`
	// Timeouts are the idle timeouts per connection state.
	Timeouts Timeouts `mapstructure:"timeouts"`
}

// Timeouts are idle timeouts of tracked connections, per TCP state.
type Timeouts struct {
	// SYN applies while the handshake is not complete: until the
	// client's ACK of the backend's SYN-ACK.
	SYN time.Duration `mapstructure:"syn"`
	// Established applies to established connections.
	Established time.Duration `mapstructure:"established"`
	// FIN applies once a FIN has been seen.
	FIN time.Duration `mapstructure:"fin"`
	// Closed applies after a RST, or FINs in both directions.
	Closed time.Duration `mapstructure:"closed"`
	// UDP applies to UDP flows: one ends when it has been idle this long.
	UDP time.Duration `mapstructure:"udp"`
	// TimeWait is how long a source port rests after its connection
	// ended before another connection may take it. The backend-side ISN
	// makes a backend still in TIME_WAIT accept the next connection, so
	// it only has to outlast the old connection's last packets.
	TimeWait time.Duration `mapstructure:"time-wait"`
}

// Service is a virtual service and its backends, all of one family.
type Service struct {
	// VIP is the virtual address and port, IPv4 or IPv6.
	VIP netip.AddrPort `mapstructure:"vip"`
	// Protocol is tcp or udp; Parse fills in tcp when it is empty.
	Protocol string `mapstructure:"protocol"`
	// Policy names the balancing policy; Parse fills in DefaultPolicy
	// when it is empty.
	Policy string `mapstructure:"policy"`
	// Backends receive the service's connections.
	Backends []Backend `mapstructure:"backends"`
	// SourceAddresses, when set, are the addresses this service's
	// connections use towards its backends instead of the top-level ones.
	SourceAddresses AddrPool `mapstructure:"source-addresses"`
	// ManageVIP overrides the top-level manage-vip for this service; nil
	// means the top-level value (Config.ManagesVIP).
	ManageVIP *bool `mapstructure:"manage-vip"`
	// Health is the health check of the service's backends; nil means
	// none (unless a backend has its own).
	Health *Health `mapstructure:"health"`
	// AllDown says what happens when no backend is up: AllDownRST (also
	// the empty string) or AllDownUseAll.
	AllDown string `mapstructure:"all-down"`
}

// What a service does when every backend is down (Service.AllDown).
const (
	// AllDownRST refuses new connections with a RST.
	AllDownRST = "rst"
	// AllDownUseAll sends new connections to every backend whose health
	// check fails (but whose next hop answers and whose weight is not 0).
	AllDownUseAll = "use-all"
)

// Key names the service in messages: "VIP:PORT/PROTOCOL".
func (s Service) Key() string { return s.VIP.String() + "/" + s.protocol() }

// Backend is a real server behind a service.
type Backend struct {
	// Address is the address (of the VIP's family) and port of the
	// backend; the port may differ from the VIP's.
	Address netip.AddrPort `mapstructure:"address"`
	// Weight is the backend's relative share, 0 to 65535; 0 drains it (no
	// new connections, established ones keep flowing).
	Weight uint32 `mapstructure:"weight"`
	// Health overrides the service's health check for this backend, key
	// by key; nil means the service's as it is.
	Health *Health `mapstructure:"health"`
}

// Health configures a health check. In a service it applies to every
// backend; in a backend, the keys it sets override the service's. A zero
// field (nil for ResetEstablished) is unset: it takes the service's value,
// else the default (Resolve).
type Health struct {
	// Check is HealthNone, HealthTCP or HealthHTTP; unset means tcp.
	Check string `mapstructure:"check"`
	// Interval is the time between two checks of a backend.
	Interval time.Duration `mapstructure:"interval"`
	// Timeout bounds one check: connecting, and for http the answer.
	Timeout time.Duration `mapstructure:"timeout"`
	// Rise is how many checks in a row must pass to bring a backend that
	// is down up again.
	Rise int `mapstructure:"rise"`
	// Fall is how many checks in a row must fail to take a backend down.
	Fall int `mapstructure:"fall"`
	// HTTP configures an http check.
	HTTP HTTPCheck `mapstructure:"http"`
	// ResetEstablished resets a backend's established connections when it
	// goes down; unset means false: they keep flowing.
	ResetEstablished *bool `mapstructure:"reset-established"`
}

// HTTPCheck is what an http check asks and expects.
type HTTPCheck struct {
	// Path of the GET request; unset means "/".
	Path string `mapstructure:"path"`
	// Host is the request's Host header; unset means the backend's
	// IP:PORT.
	Host string `mapstructure:"host"`
	// ExpectStatus is the status code that passes; unset means 200.
	ExpectStatus int `mapstructure:"expect-status"`
}

// The health checks.
const (
	HealthNone = "none"
	HealthTCP  = "tcp"
	HealthHTTP = "http"
)

// Health check defaults.
const (
	DefaultHealthInterval     = 2 * time.Second
	DefaultHealthTimeout      = time.Second
	DefaultHealthRise         = 2
	DefaultHealthFall         = 3
	DefaultHealthPath         = "/"
	DefaultHealthExpectStatus = 200
	DefaultHealthConcurrency  = 32
)

// BackendHealth is the health check of the service's backend i, resolved:
// the backend's keys over the service's over the defaults (an unset
// timeout is the default or the interval, whichever is shorter). Check is
// HealthNone when neither the service nor the backend has a health block.
func (s Service) BackendHealth(i int) Health {
	var layers []*Health
	if s.Health != nil {
		layers = append(layers, s.Health)
	}
	if i >= 0 && i < len(s.Backends) && s.Backends[i].Health != nil {
		layers = append(layers, s.Backends[i].Health)
	}
	if len(layers) == 0 {
		return Health{Check: HealthNone}
	}
	no := false
	h := Health{Check: HealthTCP, Interval: DefaultHealthInterval, Timeout: DefaultHealthTimeout, Rise: DefaultHealthRise,
		Fall: DefaultHealthFall, HTTP: HTTPCheck{Path: DefaultHealthPath, ExpectStatus: DefaultHealthExpectStatus}, ResetEstablished: &no}
	for _, l := range layers {
		h.Check = cmp.Or(l.Check, h.Check)
		h.Interval = cmp.Or(l.Interval, h.Interval)
		h.Timeout = cmp.Or(l.Timeout, h.Timeout)
		h.Rise = cmp.Or(l.Rise, h.Rise)
		h.Fall = cmp.Or(l.Fall, h.Fall)
		h.HTTP.Path = cmp.Or(l.HTTP.Path, h.HTTP.Path)
		h.HTTP.Host = cmp.Or(l.HTTP.Host, h.HTTP.Host)
		h.HTTP.ExpectStatus = cmp.Or(l.HTTP.ExpectStatus, h.HTTP.ExpectStatus)
		if l.ResetEstablished != nil {
			h.ResetEstablished = l.ResetEstablished
		}
	}
	if !slices.ContainsFunc(layers, func(l *Health) bool { return l.Timeout != 0 }) {
		// Unset, the timeout is at most the interval.
		h.Timeout = min(h.Timeout, h.Interval)
	}
	return h
}

// ChainMember is an XDP program chained with xlb on the interface.
type ChainMember struct {
	// Name identifies the member: unique, [a-z0-9-]{1,15}.
	Name string `mapstructure:"name"`
	// Object is the path of the member's ELF object file.
	Object string `mapstructure:"object"`
	// Program is the XDP program (function) name in Object; empty means
	// the object's only XDP program.
	Program string `mapstructure:"program"`
	// Priority orders the chain, 0 to 1000; nil means the object's
	// XDP_RUN_CONFIG, or 50.
	Priority *int `mapstructure:"priority"`
	// ContinueOn lists the verdicts after which the chain goes on; nil
	// means pass only.
	ContinueOn []string `mapstructure:"continue-on"`
}

// ErrVersion is returned by Parse for --version.
var ErrVersion = errors.New("version requested")

// Default values.
const (
	DefaultXDPMode    = "native"
	DefaultPolicy     = "random"
	DefaultSocket     = "/run/xlb/xlbd.sock"
	DefaultPinPath    = "/sys/fs/bpf/xlb"
	DefaultPriority   = 50 // a chain member's, as libxdp's XDP_DEFAULT_RUN_PRIO
	DefaultLogLevel   = "info"
	DefaultLogFormat  = "text"
	DefaultMaxEntries = 262144
)

// Default returns the configuration with every default set and no
// interface, services or chain.
func Default() *Config {
	return &Config{
		XDPMode:       DefaultXDPMode,
		DefaultPolicy: DefaultPolicy,
		Socket:        DefaultSocket,
		PinPath:       DefaultPinPath,
		XLBPriority:   DefaultPriority,
		LogLevel:      DefaultLogLevel,
		LogFormat:     DefaultLogFormat,
		Conntrack: Conntrack{
			MaxEntries: DefaultMaxEntries,
			GCInterval: time.Second,
			Timeouts: Timeouts{
				SYN:         5 * time.Second,
				Established: 900 * time.Second,
				FIN:         120 * time.Second,
				Closed:      10 * time.Second,
				UDP:         30 * time.Second,
				TimeWait:    2 * time.Second,
			},
		},
		SYNDefence:        SYNDefence{Mode: "auto", HalfOpen: 1000, TrustFor: 10 * time.Minute},
		HealthConcurrency: DefaultHealthConcurrency,
		ManageVIP:         true,
		VIPFilter:         true,
	}
}

// envKeys are the keys that XLB_* environment variables may set: every
// scalar key. Services, chain and plugin-sha256 come only from the file.
var envKeys = []string{
	"iface",
	"xdp-mode",
	"source-addresses",
	"source-ports",
	"policy",
	"plugin-dir",
	"socket",
	"socket-group",
	"pin-path",
	"log-level",
	"log-format",
	"metrics-address",
	"xlb-priority",
	"conntrack.max-entries",
	"conntrack.gc-interval",
	"conntrack.timeouts.syn",
	"conntrack.timeouts.established",
	"conntrack.timeouts.fin",
	"conntrack.timeouts.closed",
	"conntrack.timeouts.time-wait",
	"conntrack.timeouts.udp",
	"syn-defence.mode",
	"syn-defence.half-open",
	"syn-defence.trust-for",
	"manage-vip",
	"vip-filter",
	"health-concurrency",
}

// fileOnlyKeys are the keys that only the configuration file may set.
var fileOnlyKeys = []string{"plugin-sha256", "services", "chain"}

// flagKeys maps the flags bound to viper to their keys.
var flagKeys = map[string]string{
	"iface":                 "iface",
	"xdp-mode":              "xdp-mode",
	"source-address":        "source-addresses",
	"source-ports":          "source-ports",
	"policy":                "policy",
	"plugin-dir":            "plugin-dir",
	"socket":                "socket",
	"socket-group":          "socket-group",
	"pin-path":              "pin-path",
	"log-level":             "log-level",
	"log-format":            "log-format",
	"metrics-address":       "metrics-address",
	"conntrack-max-entries": "conntrack.max-entries",
	"syn-defence":           "syn-defence.mode",
	"manage-vip":            "manage-vip",
	"vip-filter":            "vip-filter",
}

// EnvName returns the environment variable that sets key, such as
// XLB_CONNTRACK_TIMEOUTS_ESTABLISHED for conntrack.timeouts.established.
func EnvName(key string) string {
	return "XLB_" + strings.ToUpper(envReplacer.Replace(key))
}

var envReplacer = strings.NewReplacer(".", "_", "-", "_")

// NewFlagSet returns the flag set Parse uses, for --help output.
func NewFlagSet() *pflag.FlagSet {
	d := Default()
	fs := pflag.NewFlagSet("xlbd", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.Bool("version", false, "print the version and exit")
	fs.String("config", "", "YAML configuration `file`")
	fs.String("iface", "", "network `interface` to attach to (required)")
	fs.String("xdp-mode", d.XDPMode, "XDP attach `mode`: native or generic")
	fs.String("vip", "", "virtual service `IP:PORT`; needs at least one --backend")
	fs.String("protocol", "tcp", "`protocol` of the --vip service: tcp or udp")
	fs.StringArray("backend", nil, "backend `IP:PORT[@WEIGHT]` of the --vip service (repeatable)")
	fs.String("policy", d.DefaultPolicy, "default balancing `policy`: a name or an absolute path")
	fs.StringArray("source-address", nil, "source `IP` or prefix towards backends (repeatable; default: the interface's primary IPv4 address)")
	fs.String("source-ports", "", "source port `range` LO-HI towards backends (default: 10000-32767, or 1024-65535 when no source address is the host's)")
	fs.String("plugin-dir", "", "policy plugin `dir`ectory (default: the directory of xlbd)")
	fs.String("socket", d.Socket, "control socket `path`")
	fs.String("socket-group", "", "`group` that may use the control socket besides root (default: root only)")
	fs.String("pin-path", d.PinPath, "bpffs `dir`ectory for pinned objects")
	fs.String("log-level", d.LogLevel, "log `level`: debug, info, warn or error")
	fs.String("log-format", d.LogFormat, "log `format`: text or json")
	fs.String("metrics-address", "", "serve Prometheus metrics on `[IP]:PORT` (default: no endpoint)")
	fs.Int("conntrack-max-entries", d.Conntrack.MaxEntries, "connection table `size`")
	fs.String("syn-defence", d.SYNDefence.Mode, "SYN flood defence `mode`: auto, on or off")
	fs.Bool("manage-vip", d.ManageVIP, "add each VIP that is not a host address to the interface, and remove it on exit (false: keepalived or another daemon owns it)")
	fs.Bool("vip-filter", d.VIPFilter, "refuse, with an nftables table, traffic to a VIP on ports no service uses")
	fs.Bool("fresh-state", false, "remove the state an earlier xlbd pinned (dropping its connections) instead of adopting it")
	return fs
}

// Parse parses xlbd's command line (args excludes the program name), reads
// the --config file if given, applies XLB_* environment variables,
// validates, and returns the result. It touches no kernel state.
//
// A --help flag returns an error wrapping pflag.ErrHelp, --version
// ErrVersion.
func Parse(args []string) (*Config, error) {
	fs := NewFlagSet()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("parse flags: %w", err)
	}
	if v, _ := fs.GetBool("version"); v {
		return nil, ErrVersion
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("parse flags: unexpected argument %q", fs.Arg(0))
	}

	v := viper.New()
	d := Default()
	setDefaults(v, d)
	v.SetEnvPrefix("XLB")
	v.SetEnvKeyReplacer(envReplacer)
	for _, key := range envKeys {
		if err := v.BindEnv(key); err != nil {
			return nil, fmt.Errorf("bind %s: %w", EnvName(key), err)
		}
	}
	for name, key := range flagKeys {
		if err := v.BindPFlag(key, fs.Lookup(name)); err != nil {
			return nil, fmt.Errorf("bind --%s: %w", name, err)
		}
	}

	var fileOnly map[string]any
	if path, _ := fs.GetString("config"); path != "" {
		raw, err := readFile(path)
		if err != nil {
			return nil, err
		}
		for _, key := range fileOnlyKeys {
			if val, ok := raw[key]; ok {
				if fileOnly == nil {
					fileOnly = make(map[string]any)
				}
				fileOnly[key] = val
				delete(raw, key)
			}
		}
		if err := v.MergeConfigMap(raw); err != nil {
			return nil, fmt.Errorf("merge %s: %w", path, err)
		}
	}

	cfg := new(Config)
	if err := v.UnmarshalExact(cfg, viper.DecodeHook(decodeHook())); err != nil {
		return nil, decodeError(err)
	}
	if err := decodeFileOnly(fileOnly, cfg); err != nil {
		return nil, err
	}
	if err := addFlagService(fs, cfg); err != nil {
		return nil, err
	}
	cfg.FreshState, _ = fs.GetBool("fresh-state")
	cfg.FillIn()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// FillIn gives every service what its unset keys stand for: the default
// policy, tcp, and all-down rst. Parse calls it; a configuration changed in
// memory needs it before Validate.
func (c *Config) FillIn() {
	for i := range c.Services {
		s := &c.Services[i]
		s.Policy = cmp.Or(s.Policy, c.DefaultPolicy)
		s.Protocol = cmp.Or(s.Protocol, "tcp")
		s.AllDown = cmp.Or(s.AllDown, AllDownRST)
	}
}

// setDefaults registers a default for every key, so that environment
// variables apply to keys the file does not set.
func setDefaults(v *viper.Viper, d *Config) {
	v.SetDefault("iface", d.Iface)
	v.SetDefault("xdp-mode", d.XDPMode)
	v.SetDefault("source-addresses", "")
	v.SetDefault("source-ports", "")
	v.SetDefault("policy", d.DefaultPolicy)
	v.SetDefault("plugin-dir", d.PluginDir)
	v.SetDefault("plugin-sha256", nil)
	v.SetDefault("socket", d.Socket)
	v.SetDefault("socket-group", d.SocketGroup)
	v.SetDefault("pin-path", d.PinPath)
	v.SetDefault("log-level", d.LogLevel)
	v.SetDefault("log-format", d.LogFormat)
	v.SetDefault("metrics-address", d.MetricsAddress)
	v.SetDefault("conntrack.max-entries", d.Conntrack.MaxEntries)
	v.SetDefault("conntrack.gc-interval", d.Conntrack.GCInterval)
	v.SetDefault("conntrack.timeouts.syn", d.Conntrack.Timeouts.SYN)
	v.SetDefault("conntrack.timeouts.established", d.Conntrack.Timeouts.Established)
	v.SetDefault("conntrack.timeouts.fin", d.Conntrack.Timeouts.FIN)
	v.SetDefault("conntrack.timeouts.closed", d.Conntrack.Timeouts.Closed)
	v.SetDefault("conntrack.timeouts.time-wait", d.Conntrack.Timeouts.TimeWait)
	v.SetDefault("conntrack.timeouts.udp", d.Conntrack.Timeouts.UDP)
	v.SetDefault("services", nil)
	v.SetDefault("chain", nil)
	v.SetDefault("xlb-priority", d.XLBPriority)
	v.SetDefault("syn-defence.mode", d.SYNDefence.Mode)
	v.SetDefault("syn-defence.half-open", d.SYNDefence.HalfOpen)
	v.SetDefault("syn-defence.trust-for", d.SYNDefence.TrustFor)
	v.SetDefault("manage-vip", d.ManageVIP)
	v.SetDefault("vip-filter", d.VIPFilter)
	v.SetDefault("health-concurrency", d.HealthConcurrency)
}

// readFile reads the YAML file at path and checks that it holds only known
// keys. Keys with a null value are dropped, as if absent.
func readFile(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	var raw map[string]any
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("parse config %s: %w", path, err)
	}
	if raw == nil {
		raw = make(map[string]any)
	}
	dropNulls(raw)
	if err := checkKeys(raw); err != nil {
		return nil, fmt.Errorf("%w in %s", err, path)
	}
	return raw, nil
}

// decodeFileOnly decodes the keys that only the file sets. They are decoded
// from the YAML as written, not through viper, which would lower-case the
// policy paths used as plugin-sha256 keys and split them at dots.
func decodeFileOnly(raw map[string]any, cfg *Config) error {
	if len(raw) == 0 {
		return nil
	}
	var out struct {
		PluginSHA256 map[string]string `mapstructure:"plugin-sha256"`
		Services     []Service         `mapstructure:"services"`
		Chain        []ChainMember     `mapstructure:"chain"`
	}
	dec, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
		DecodeHook:  decodeHook(),
		ErrorUnused: true,
		Result:      &out,
	})
	if err != nil {
		return fmt.Errorf("create decoder: %w", err)
	}
	if err := dec.Decode(raw); err != nil {
		return decodeError(err)
	}
	cfg.PluginSHA256 = out.PluginSHA256
	cfg.Services = out.Services
	cfg.Chain = out.Chain
	return nil
}

// addFlagService adds the service given by --vip and --backend to cfg,
// replacing a service with the same VIP.
func addFlagService(fs *pflag.FlagSet, cfg *Config) error {
	vip, _ := fs.GetString("vip")
	backends, _ := fs.GetStringArray("backend")
	switch {
	case vip == "" && len(backends) == 0:
		return nil
	case vip == "":
		return errors.New("--backend: needs --vip")
	case len(backends) == 0:
		return fmt.Errorf("--vip %s: needs at least one --backend", vip)
	}
	proto, _ := fs.GetString("protocol")
	svc := Service{Protocol: proto, Backends: make([]Backend, 0, len(backends))}
	var err error
	if svc.VIP, err = parseAddrPort(vip); err != nil {
		return fmt.Errorf("--vip: %w", err)
	}
	for _, s := range backends {
		b, err := parseBackend(s)
		if err != nil {
			return fmt.Errorf("--backend: %w", err)
		}
		svc.Backends = append(svc.Backends, b)
	}
	for i := range cfg.Services {
		if cfg.Services[i].VIP == svc.VIP && cfg.Services[i].protocol() == svc.protocol() {
			cfg.Services[i] = svc
			return nil
		}
	}
	cfg.Services = append(cfg.Services, svc)
	return nil
}

// PinPathOf reads the pin-path key of the configuration file at path,
// without checking the rest of the configuration (xlbd cleanup). It
// returns "" when the file does not set it.
func PinPathOf(path string) (string, error) {
	raw, err := readFile(path)
	if err != nil {
		return "", err
	}
	v, ok := raw["pin-path"]
	if !ok {
		return "", nil
	}
	s, ok := v.(string)
	if !ok || !filepath.IsAbs(s) {
		return "", fmt.Errorf("pin-path: %v is not an absolute path", v)
	}
	return s, nil
}
