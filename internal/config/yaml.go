package config

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// YAML returns c as a configuration file that Parse reads back to the same
// configuration: every key with its value in force, defaults included,
// except those whose unset value means something of its own (source-ports
// auto, no metrics-address, no socket-group, an object's own chain
// priority). A --vip service is one of the services.
func (c *Config) YAML() ([]byte, error) {
	f := fileConfig{
		Iface:             c.Iface,
		XDPMode:           c.XDPMode,
		Policy:            c.DefaultPolicy,
		PluginDir:         c.PluginDir,
		PluginSHA256:      c.PluginSHA256,
		Socket:            c.Socket,
		SocketGroup:       c.SocketGroup,
		PinPath:           c.PinPath,
		LogLevel:          c.LogLevel,
		LogFormat:         c.LogFormat,
		MetricsAddress:    c.MetricsAddress,
		HealthConcurrency: c.HealthConcurrency,
		ManageVIP:         c.ManageVIP,
		VIPFilter:         c.VIPFilter,
		XLBPriority:       c.XLBPriority,
		Conntrack: fileConntrack{
			MaxEntries: c.Conntrack.MaxEntries,
			GCInterval: duration(c.Conntrack.GCInterval),
			Timeouts: fileTimeouts{
				SYN:         duration(c.Conntrack.Timeouts.SYN),
				Established: duration(c.Conntrack.Timeouts.Established),
				FIN:         duration(c.Conntrack.Timeouts.FIN),
				Closed:      duration(c.Conntrack.Timeouts.Closed),
				UDP:         duration(c.Conntrack.Timeouts.UDP),
				TimeWait:    duration(c.Conntrack.Timeouts.TimeWait),
			},
		},
		SYNDefence: fileSYNDefence{Mode: c.SYNDefence.Mode, HalfOpen: c.SYNDefence.HalfOpen, TrustFor: duration(c.SYNDefence.TrustFor)},
	}
	if len(c.SourceAddresses) > 0 {
		f.SourceAddresses = strings.Split(c.SourceAddresses.String(), ",")
	}
	if c.SourcePorts != (PortRange{}) {
		f.SourcePorts = c.SourcePorts.String()
	}
	for _, s := range c.Services {
		fs := fileService{VIP: s.VIP.String(), Protocol: s.Protocol, Policy: s.Policy, AllDown: s.AllDown, Health: fileHealthOf(s.Health),
			ManageVIP: s.ManageVIP}
		if len(s.SourceAddresses) > 0 {
			fs.SourceAddresses = strings.Split(s.SourceAddresses.String(), ",")
		}
		for _, b := range s.Backends {
			fs.Backends = append(fs.Backends, backendNode(b))
		}
		f.Services = append(f.Services, fs)
	}
	for _, m := range c.Chain {
		f.Chain = append(f.Chain, fileMember(m))
	}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(f); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	return buf.Bytes(), nil
}

// duration writes d as ParseDuration reads it, without the zero units
// String leaves: 15m rather than 15m0s.
func duration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// backendNode is a backend as a string (IP:PORT, IP:PORT@WEIGHT) when it
// has no health block of its own, else as a map.
func backendNode(b Backend) any {
	if b.Health == nil {
		if b.Weight == 1 {
			return b.Address.String()
		}
		return fmt.Sprintf("%s@%d", b.Address, b.Weight)
	}
	return fileBackend{Address: b.Address.String(), Weight: b.Weight, Health: fileHealthOf(b.Health)}
}

func fileHealthOf(h *Health) *fileHealth {
	if h == nil {
		return nil
	}
	out := &fileHealth{Check: h.Check, Rise: h.Rise, Fall: h.Fall, ResetEstablished: h.ResetEstablished}
	if h.Interval != 0 {
		out.Interval = duration(h.Interval)
	}
	if h.Timeout != 0 {
		out.Timeout = duration(h.Timeout)
	}
	if h.HTTP != (HTTPCheck{}) {
		out.HTTP = &fileHTTP{Path: h.HTTP.Path, Host: h.HTTP.Host, ExpectStatus: h.HTTP.ExpectStatus}
	}
	return out
}

// The file's layout, in the order docs/configuration.md lists the keys.
type fileConfig struct {
	Iface             string         `yaml:"iface"`
	XDPMode           string         `yaml:"xdp-mode"`
	SourceAddresses   []string       `yaml:"source-addresses,omitempty,flow"`
	SourcePorts       string         `yaml:"source-ports,omitempty"`
	Policy            string         `yaml:"policy"`
	PluginDir         string         `yaml:"plugin-dir,omitempty"`
	PluginSHA256      sortedMap      `yaml:"plugin-sha256,omitempty"`
	Socket            string         `yaml:"socket"`
	SocketGroup       string         `yaml:"socket-group,omitempty"`
	PinPath           string         `yaml:"pin-path"`
	LogLevel          string         `yaml:"log-level"`
	LogFormat         string         `yaml:"log-format"`
	MetricsAddress    string         `yaml:"metrics-address,omitempty"`
	HealthConcurrency int            `yaml:"health-concurrency"`
	ManageVIP         bool           `yaml:"manage-vip"`
	VIPFilter         bool           `yaml:"vip-filter"`
	Conntrack         fileConntrack  `yaml:"conntrack"`
	SYNDefence        fileSYNDefence `yaml:"syn-defence"`
	XLBPriority       int            `yaml:"xlb-priority"`
	Services          []fileService  `yaml:"services"`
	Chain             []fileMember   `yaml:"chain,omitempty"`
}

type sortedMap map[string]string

// MarshalYAML writes the map's keys in order.
func (m sortedMap) MarshalYAML() (any, error) {
	if len(m) == 0 {
		return nil, nil
	}
	n := &yaml.Node{Kind: yaml.MappingNode}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		n.Content = append(n.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: k},
			&yaml.Node{Kind: yaml.ScalarNode, Value: m[k], Style: yaml.DoubleQuotedStyle})
	}
	return n, nil
}

type fileConntrack struct {
	MaxEntries int          `yaml:"max-entries"`
	GCInterval string       `yaml:"gc-interval"`
	Timeouts   fileTimeouts `yaml:"timeouts"`
}

type fileTimeouts struct {
	SYN         string `yaml:"syn"`
	Established string `yaml:"established"`
	FIN         string `yaml:"fin"`
	Closed      string `yaml:"closed"`
	UDP         string `yaml:"udp"`
	TimeWait    string `yaml:"time-wait"`
}

type fileSYNDefence struct {
	Mode     string `yaml:"mode"`
	HalfOpen int    `yaml:"half-open"`
	TrustFor string `yaml:"trust-for"`
}

type fileService struct {
	VIP             string      `yaml:"vip"`
	Protocol        string      `yaml:"protocol"`
	Policy          string      `yaml:"policy"`
	SourceAddresses []string    `yaml:"source-addresses,omitempty,flow"`
	AllDown         string      `yaml:"all-down"`
	ManageVIP       *bool       `yaml:"manage-vip,omitempty"`
	Health          *fileHealth `yaml:"health,omitempty"`
	Backends        []any       `yaml:"backends"`
}

type fileBackend struct {
	Address string      `yaml:"address"`
	Weight  uint32      `yaml:"weight"`
	Health  *fileHealth `yaml:"health,omitempty"`
}

type fileHealth struct {
	Check            string    `yaml:"check,omitempty"`
	Interval         string    `yaml:"interval,omitempty"`
	Timeout          string    `yaml:"timeout,omitempty"`
	Rise             int       `yaml:"rise,omitempty"`
	Fall             int       `yaml:"fall,omitempty"`
	HTTP             *fileHTTP `yaml:"http,omitempty"`
	ResetEstablished *bool     `yaml:"reset-established,omitempty"`
}

type fileHTTP struct {
	Path         string `yaml:"path,omitempty"`
	Host         string `yaml:"host,omitempty"`
	ExpectStatus int    `yaml:"expect-status,omitempty"`
}

type fileMember struct {
	Name       string   `yaml:"name"`
	Object     string   `yaml:"object"`
	Program    string   `yaml:"program,omitempty"`
	Priority   *int     `yaml:"priority,omitempty"`
	ContinueOn []string `yaml:"continue-on,omitempty,flow"`
}
