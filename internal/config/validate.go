package config

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/xlb-project/xlb/internal/xdp"
	"github.com/xlb-project/xlb/plugins"
)

// Limits checked by Validate.
const (
	MinSourcePort = 1024
	MinMaxEntries = 1024
	MaxMaxEntries = 1 << 24
	MinGCInterval = 100 * time.Millisecond
	MaxGCInterval = 60 * time.Second
	MinTimeout    = time.Second
	// MaxSourceAddresses is the data path's limit (XLB_MAX_SOURCES).
	MaxSourceAddresses = 16
	MinTimeWait        = 100 * time.Millisecond
	MaxTimeWait        = 10 * time.Minute
	MaxHalfOpen        = 1 << 24
	MaxBackends        = 256
	MaxWeight          = 65535
	MaxPriority        = 1000
	// Health checks.
	MinHealthInterval    = 100 * time.Millisecond
	MaxHealthInterval    = time.Hour
	MinHealthTimeout     = 10 * time.Millisecond
	MaxHealthRiseFall    = 100
	MaxHealthConcurrency = 1024
	maxIfaceLen          = 15  // IFNAMSIZ less the NUL
	maxSocketPathLen     = 107 // sizeof(sun_path) less the NUL
	maxChainMemberLen    = 15
)

// Verdicts are the names a chain member's continue-on may list.
var Verdicts = xdp.Names()

var memberName = regexp.MustCompile(`^[a-z0-9-]{1,15}$`)

// Validate checks c and returns the first problem found, as
// "key: problem". It does not look at network interfaces; the one file it
// checks is each chain member's object.
func (c *Config) Validate() error {
	if c.Iface == "" && len(c.Services) == 0 {
		// Nothing filled in yet, as in the packaged default file: name
		// both required settings at once.
		return fmt.Errorf("iface: %w; %w", validateIface(""), validateServices(nil))
	}
	if err := validateIface(c.Iface); err != nil {
		return fmt.Errorf("iface: %w", err)
	}
	if c.XDPMode != "native" && c.XDPMode != "generic" {
		return fmt.Errorf("xdp-mode: %q is not native or generic", c.XDPMode)
	}
	if err := validatePool(c.SourceAddresses); err != nil {
		return fmt.Errorf("source-addresses: %w", err)
	}
	if r := c.SourcePorts; r == (PortRange{}) {
		// auto
	} else if r.Lo > r.Hi {
		return fmt.Errorf("source-ports: %s: low above high", r)
	} else if r.Lo < MinSourcePort {
		return fmt.Errorf("source-ports: %s: low below %d", r, MinSourcePort)
	}
	if err := plugins.CheckPolicy(c.DefaultPolicy); err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	if c.PluginDir != "" && !filepath.IsAbs(c.PluginDir) {
		return fmt.Errorf("plugin-dir: %q is not an absolute path", c.PluginDir)
	}
	for _, name := range sortedKeys(c.PluginSHA256) {
		if err := plugins.CheckPolicy(name); err != nil {
			return fmt.Errorf("plugin-sha256[%q]: %w", name, err)
		}
		if sum := c.PluginSHA256[name]; len(sum) != 64 || !isHex(sum) {
			return fmt.Errorf("plugin-sha256[%q]: %q is not 64 hex digits", name, sum)
		}
	}
	switch {
	case c.Socket == "":
		return errors.New("socket: empty")
	case len(c.Socket) > maxSocketPathLen:
		return fmt.Errorf("socket: %q is longer than %d bytes", c.Socket, maxSocketPathLen)
	}
	if err := validateGroup(c.SocketGroup); err != nil {
		return fmt.Errorf("socket-group: %w", err)
	}
	if c.HealthConcurrency < 1 || c.HealthConcurrency > MaxHealthConcurrency {
		return fmt.Errorf("health-concurrency: %d out of range 1..%d", c.HealthConcurrency, MaxHealthConcurrency)
	}
	if !filepath.IsAbs(c.PinPath) {
		return fmt.Errorf("pin-path: %q is not an absolute path", c.PinPath)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log-level: %q is not debug, info, warn or error", c.LogLevel)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("log-format: %q is not text or json", c.LogFormat)
	}
	if err := validateListen(c.MetricsAddress); err != nil {
		return fmt.Errorf("metrics-address: %w", err)
	}
	if err := c.Conntrack.validate(); err != nil {
		return fmt.Errorf("conntrack.%w", err)
	}
	if err := c.SYNDefence.validate(); err != nil {
		return fmt.Errorf("syn-defence.%w", err)
	}
	if err := validateServices(c.Services); err != nil {
		return err
	}
	for _, v4 := range []bool{true, false} {
		n := 0
		for _, a := range c.AllSourceAddresses() {
			if a.Is4() == v4 {
				n++
			}
		}
		if n > MaxSourceAddresses {
			return fmt.Errorf("source-addresses: %d %s addresses over the top level and the services, at most %d", n, familyName(v4), MaxSourceAddresses)
		}
	}
	if c.XLBPriority < 0 || c.XLBPriority > MaxPriority {
		return fmt.Errorf("xlb-priority: %d out of range 0..%d", c.XLBPriority, MaxPriority)
	}
	return validateChain(c.Chain)
}

// validateListen accepts "" (off), ":PORT" and "IP:PORT" with a port
// other than 0.
func validateListen(s string) error {
	if s == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not [IP]:PORT", s)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%q: %q is not an IP address", s, host)
		}
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("%q: %q is not a port from 1 to 65535", s, port)
	}
	return nil
}

func validateIface(name string) error {
	switch {
	case name == "":
		return errors.New("required (set iface in the file, --iface or XLB_IFACE)")
	case len(name) > maxIfaceLen:
		return fmt.Errorf("%q is longer than %d bytes", name, maxIfaceLen)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n"):
		return fmt.Errorf("%q is not an interface name", name)
	}
	return nil
}

// validatePool checks that every address of a pool is an IPv4 or IPv6
// address a host can use as a source.
func validatePool(p AddrPool) error {
	for _, pf := range p {
		a := pf.Addr()
		switch {
		case a.Is4In6():
			return fmt.Errorf("%s is an IPv4-mapped IPv6 address: write it as IPv4", pf)
		case a.Zone() != "":
			return fmt.Errorf("%s has a zone: xlb does not use link-local addresses", pf)
		case pf.Bits() < a.BitLen()-4:
			return fmt.Errorf("%s holds more than %d addresses", pf, MaxSourceAddresses)
		case a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			return fmt.Errorf("%s is not a unicast address a host can use", pf)
		}
	}
	return nil
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

// validate returns errors that start with the key below conntrack.
func (ct *Conntrack) validate() error {
	if ct.MaxEntries < MinMaxEntries || ct.MaxEntries > MaxMaxEntries {
		return fmt.Errorf("max-entries: %d out of range %d..%d", ct.MaxEntries, MinMaxEntries, MaxMaxEntries)
	}
	if ct.GCInterval < MinGCInterval || ct.GCInterval > MaxGCInterval {
		return fmt.Errorf("gc-interval: %s out of range %s..%s", ct.GCInterval, MinGCInterval, MaxGCInterval)
	}
	for _, t := range []struct {
		key string
		d   time.Duration
	}{
		{"syn", ct.Timeouts.SYN},
		{"established", ct.Timeouts.Established},
		{"fin", ct.Timeouts.FIN},
		{"closed", ct.Timeouts.Closed},
		{"udp", ct.Timeouts.UDP},
	} {
		if t.d < MinTimeout {
			return fmt.Errorf("timeouts.%s: %s below %s", t.key, t.d, MinTimeout)
		}
	}
	if ct.Timeouts.TimeWait < MinTimeWait || ct.Timeouts.TimeWait > MaxTimeWait {
		return fmt.Errorf("timeouts.time-wait: %s out of range %s..%s", ct.Timeouts.TimeWait, MinTimeWait, MaxTimeWait)
	}
	return nil
}

// validate returns errors that start with the key below syn-defence.
func (s *SYNDefence) validate() error {
	switch s.Mode {
	case "auto", "on", "off":
	default:
		return fmt.Errorf("mode: %q is not auto, on or off", s.Mode)
	}
	if s.HalfOpen < 1 || s.HalfOpen > MaxHalfOpen {
		return fmt.Errorf("half-open: %d out of range 1..%d", s.HalfOpen, MaxHalfOpen)
	}
	if s.TrustFor < time.Second || s.TrustFor > 24*time.Hour {
		return fmt.Errorf("trust-for: %s out of range 1s..24h", s.TrustFor)
	}
	return nil
}

func validateServices(services []Service) error {
	if len(services) == 0 {
		return errors.New("services: none defined (give them in the config file, or with --vip and --backend)")
	}
	type svcKey struct {
		vip   netip.AddrPort
		proto string
	}
	vips := make(map[svcKey]int, len(services))
	for i, s := range services {
		key := fmt.Sprintf("services[%d]", i)
		if err := validateEndpoint(s.VIP); err != nil {
			return fmt.Errorf("%s.vip: %w", key, err)
		}
		if own := s.SourceAddresses.Addrs(); len(own) > 0 && !slices.ContainsFunc(own, func(a netip.Addr) bool { return a.Is4() == s.VIP.Addr().Is4() }) {
			return fmt.Errorf("%s.source-addresses: none is %s, as the vip %s is (a service's connections leave from addresses of its vip's family)",
				key, family(s.VIP.Addr()), s.VIP)
		}
		if s.Protocol != "tcp" && s.Protocol != "udp" {
			return fmt.Errorf("%s.protocol: %q is not tcp or udp", key, s.Protocol)
		}
		if first, ok := vips[svcKey{s.VIP, s.Protocol}]; ok {
			return fmt.Errorf("%s: duplicate vip %s/%s (also services[%d])", key, s.VIP, s.Protocol, first)
		}
		if err := validatePool(s.SourceAddresses); err != nil {
			return fmt.Errorf("%s.source-addresses: %w", key, err)
		}
		vips[svcKey{s.VIP, s.Protocol}] = i
		if s.Policy != "" {
			if err := plugins.CheckPolicy(s.Policy); err != nil {
				return fmt.Errorf("%s.policy: %w", key, err)
			}
		}
		if s.AllDown != AllDownRST && s.AllDown != AllDownUseAll {
			return fmt.Errorf("%s.all-down: %q is not %s or %s", key, s.AllDown, AllDownRST, AllDownUseAll)
		}
		if err := s.Health.validate(); err != nil {
			return fmt.Errorf("%s.health.%w", key, err)
		}
		switch {
		case len(s.Backends) == 0:
			return fmt.Errorf("%s.backends: none (a service needs at least one)", key)
		case len(s.Backends) > MaxBackends:
			return fmt.Errorf("%s.backends: %d above the limit of %d", key, len(s.Backends), MaxBackends)
		}
		seen := make(map[netip.AddrPort]int, len(s.Backends))
		for j, b := range s.Backends {
			bkey := fmt.Sprintf("%s.backends[%d]", key, j)
			if err := validateEndpoint(b.Address); err != nil {
				return fmt.Errorf("%s: %w", bkey, err)
			}
			if b.Address == s.VIP {
				return fmt.Errorf("%s: %s is the service's own vip", bkey, b.Address)
			}
			if b.Address.Addr().Is4() != s.VIP.Addr().Is4() {
				return fmt.Errorf("%s: %s is %s, the vip %s is %s: a service balances one family (give each family a service of its own)",
					bkey, b.Address, family(b.Address.Addr()), s.VIP, family(s.VIP.Addr()))
			}
			if first, ok := seen[b.Address]; ok {
				return fmt.Errorf("%s: duplicate address %s (also backends[%d])", bkey, b.Address, first)
			}
			seen[b.Address] = j
			if b.Weight > MaxWeight {
				return fmt.Errorf("%s: weight %d out of range 0..%d", bkey, b.Weight, MaxWeight)
			}
			if err := b.Health.validate(); err != nil {
				return fmt.Errorf("%s.health.%w", bkey, err)
			}
			if h := s.BackendHealth(j); h.Check != HealthNone && h.Timeout > h.Interval {
				return fmt.Errorf("%s: health check timeout %s above its interval %s", bkey, h.Timeout, h.Interval)
			}
		}
	}
	return nil
}

// validate returns errors that start with the key below health. A nil
// block is valid: no check, or the service's.
func (h *Health) validate() error {
	if h == nil {
		return nil
	}
	switch h.Check {
	case "", HealthNone, HealthTCP, HealthHTTP:
	default:
		return fmt.Errorf("check: %q is not %s, %s or %s", h.Check, HealthNone, HealthTCP, HealthHTTP)
	}
	if h.Interval != 0 && (h.Interval < MinHealthInterval || h.Interval > MaxHealthInterval) {
		return fmt.Errorf("interval: %s out of range %s..%s", h.Interval, MinHealthInterval, MaxHealthInterval)
	}
	if h.Timeout != 0 && (h.Timeout < MinHealthTimeout || h.Timeout > MaxHealthInterval) {
		return fmt.Errorf("timeout: %s out of range %s..%s", h.Timeout, MinHealthTimeout, MaxHealthInterval)
	}
	for _, x := range []struct {
		key string
		v   int
	}{{"rise", h.Rise}, {"fall", h.Fall}} {
		if x.v < 0 || x.v > MaxHealthRiseFall {
			return fmt.Errorf("%s: %d out of range 1..%d", x.key, x.v, MaxHealthRiseFall)
		}
	}
	if p := h.HTTP.Path; p != "" && (!strings.HasPrefix(p, "/") || strings.ContainsAny(p, " \t\r\n")) {
		return fmt.Errorf("http.path: %q is not a path starting with / (without spaces)", p)
	}
	if strings.ContainsAny(h.HTTP.Host, " \t\r\n") {
		return fmt.Errorf("http.host: %q has white space", h.HTTP.Host)
	}
	if st := h.HTTP.ExpectStatus; st != 0 && (st < 100 || st > 599) {
		return fmt.Errorf("http.expect-status: %d out of range 100..599", st)
	}
	return nil
}

// validateGroup accepts "" (root only), a group name or a number.
func validateGroup(g string) error {
	if g == "" {
		return nil
	}
	if _, err := strconv.ParseUint(g, 10, 32); err == nil {
		return nil
	}
	if !groupName.MatchString(g) {
		return fmt.Errorf("%q is not a group name or number", g)
	}
	return nil
}

var groupName = regexp.MustCompile(`^[a-z_][a-z0-9_-]*[$]?$`)

// validateEndpoint accepts an IPv4 or IPv6 unicast address with a port
// other than 0; not a link-local IPv6 one.
func validateEndpoint(ap netip.AddrPort) error {
	a := ap.Addr()
	switch {
	case !a.IsValid():
		return errors.New("missing")
	case a.Is4In6():
		return fmt.Errorf("%s is an IPv4-mapped IPv6 address: write it as IPv4", ap)
	case a.Zone() != "" || (a.Is6() && a.IsLinkLocalUnicast()):
		return fmt.Errorf("%s is a link-local address: xlb balances between routable addresses", ap)
	case a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("%s is not a unicast address", ap)
	case a.IsLoopback():
		// The data path sees only packets that arrive on iface.
		return fmt.Errorf("%s is a loopback address: xlb only sees packets that arrive on iface", ap)
	case ap.Port() == 0:
		return fmt.Errorf("%s: port 0", ap)
	}
	return nil
}

func validateChain(chain []ChainMember) error {
	names := make(map[string]int, len(chain))
	for i, m := range chain {
		key := fmt.Sprintf("chain[%d]", i)
		if !memberName.MatchString(m.Name) {
			return fmt.Errorf("%s.name: %q is not [a-z0-9-]{1,%d}", key, m.Name, maxChainMemberLen)
		}
		if m.Name == "xlb" {
			return fmt.Errorf("%s.name: \"xlb\" is xlb's own pipeline", key)
		}
		if first, ok := names[m.Name]; ok {
			return fmt.Errorf("%s: duplicate name %q (also chain[%d])", key, m.Name, first)
		}
		names[m.Name] = i
		if m.Object == "" {
			return fmt.Errorf("%s.object: required", key)
		}
		fi, err := os.Stat(m.Object)
		if err != nil {
			return fmt.Errorf("%s.object: %w", key, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s.object: %s is not a regular file", key, m.Object)
		}
		if m.Priority != nil && (*m.Priority < 0 || *m.Priority > MaxPriority) {
			return fmt.Errorf("%s.priority: %d out of range 0..%d", key, *m.Priority, MaxPriority)
		}
		if m.ContinueOn != nil && len(m.ContinueOn) == 0 {
			return fmt.Errorf("%s.continue-on: empty: the chain would end after this member, so xlb would never see a packet; list the verdicts after which the chain goes on, such as [pass], or leave it unset", key)
		}
		for j, v := range m.ContinueOn {
			if !slices.Contains(Verdicts, v) {
				return fmt.Errorf("%s.continue-on[%d]: %q is not one of %s", key, j, v, strings.Join(Verdicts, ", "))
			}
			if slices.Index(m.ContinueOn, v) < j {
				return fmt.Errorf("%s.continue-on[%d]: duplicate %q", key, j, v)
			}
		}
	}
	return nil
}

// family names a's address family.
func family(a netip.Addr) string { return familyName(a.Is4()) }

func familyName(v4 bool) string {
	if v4 {
		return "IPv4"
	}
	return "IPv6"
}
