// Package control is the protocol between xlbd and xlbctl: JSON over
// HTTP on a unix socket. The server is a thin layer over a Handler.
package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Backend is one backend in a status report.
type Backend struct {
	Address   string  `json:"address"`
	Weight    uint32  `json:"weight"`
	ID        uint32  `json:"id"`
	Active    int64   `json:"active"`
	HalfOpen  int64   `json:"half_open"` // connections whose handshake is not complete
	NewPerSec float64 `json:"new_per_sec"`
	// State is "up", "down" (no new connections: its next hop does not
	// answer) or "draining".
	State string `json:"state"`
	// NextHop is the neighbour keeper's view: "10.0.0.2 on eth0 at MAC",
	// or why the next hop is unreachable.
	NextHop string `json:"next_hop"`
	// The backend's source-port pool: ports of live connections, ports
	// resting after their connection ended, and the pool's size (over
	// its source addresses; backends sharing a port way share it).
	PortsUsed int `json:"ports_used"`
	PortsHeld int `json:"ports_held"`
	PortPool  int `json:"port_pool"`
	// NoPort counts SYNs refused with a RST for want of a free port.
	NoPort uint64 `json:"no_port"`
}

// Service is one service in a status report.
type Service struct {
	VIP      string    `json:"vip"`
	Protocol string    `json:"protocol"` // tcp or udp
	Policy   string    `json:"policy"`
	Backends []Backend `json:"backends"`
	// ManageVIP: xlbd adds and removes the VIP address (false: another
	// owner, such as keepalived, does).
	ManageVIP bool `json:"manage_vip"`
}

// Status is xlbd's state.
type Status struct {
	Iface           string            `json:"iface"`
	XDPMode         string            `json:"xdp_mode"`
	SourceAddresses []string          `json:"source_addresses"`
	SourcePorts     string            `json:"source_ports"` // LO-HI
	Services        []Service         `json:"services"`
	Policies        []PolicyStatus    `json:"policies"`
	LastReload      *ReloadStatus     `json:"last_reload,omitempty"` // nil before the first
	Counters        map[string]uint64 `json:"counters"`
	State           StateStatus       `json:"state"`
}

// StateStatus says where the data path is pinned and how this xlbd took
// it up.
type StateStatus struct {
	PinPath string `json:"pin_path"`
	Layout  string `json:"layout"` // the layout version of the pinned maps
	// Adopted is what xlbd took over from an earlier run at start; nil
	// when it started afresh.
	Adopted *Adopted `json:"adopted,omitempty"`
	// VIPFilter is the nftables table keeping the host's services off the
	// VIPs, and the VIPs it holds; empty when vip-filter is false.
	VIPFilter     string   `json:"vip_filter,omitempty"`
	VIPFilterAddr []string `json:"vip_filter_addresses,omitempty"`
}

// Adopted is what an xlbd took over from an earlier run's pinned state.
type Adopted struct {
	Services    int `json:"services"`
	BackendIDs  int `json:"backend_ids"`
	Retired     int `json:"retired"`
	Connections int `json:"connections"`
	Addresses   int `json:"addresses"`
}

// ShutdownRequest asks xlbd to stop. With KeepDatapath the data path keeps
// forwarding, pinned for the next xlbd; without it everything is removed,
// as on SIGTERM.
type ShutdownRequest struct {
	KeepDatapath bool `json:"keep_datapath"`
}

// ReloadStatus is the outcome of the last configuration reload.
type ReloadStatus struct {
	At    time.Time `json:"at"`
	OK    bool      `json:"ok"`
	Error string    `json:"error,omitempty"` // what failed; nothing changed unless it says partly applied
	Took  string    `json:"took,omitempty"`
}

// PolicyStatus is a policy plugin's process.
type PolicyStatus struct {
	Name       string `json:"name"`
	Path       string `json:"path"`
	Pid        int    `json:"pid"` // 0 while down
	Restarts   int    `json:"restarts"`
	APIVersion int    `json:"api_version"` // negotiated; 0 while down
	// Asked says when the plugin is asked for a table: "on change" or
	// "live load every 1s".
	Asked string `json:"asked,omitempty"`
}

// Conn is one tracked connection.
type Conn struct {
	Protocol string `json:"protocol"` // tcp or udp
	Client   string `json:"client"`
	VIP      string `json:"vip"`
	Backend  string `json:"backend"`
	Source   string `json:"source"`
	State    string `json:"state"`
	IdleMS   int64  `json:"idle_ms"`
}

// ConnFilter selects connections; empty fields match every connection.
type ConnFilter struct {
	VIP      string `json:"vip,omitempty"`      // IP:PORT
	Backend  string `json:"backend,omitempty"`  // IP:PORT
	State    string `json:"state,omitempty"`    // one of ConnStates
	Protocol string `json:"protocol,omitempty"` // tcp or udp
}

// ConnStates are the states a connection is reported in: TCP's five,
// and udp for every UDP flow.
var ConnStates = []string{"syn", "syn-recv", "established", "fin", "closed", "udp"}

// ConnProtocols are the protocols a connection is reported with.
var ConnProtocols = []string{"tcp", "udp"}

// Validate checks that the filter's fields are well formed.
func (f ConnFilter) Validate() error {
	for _, x := range []struct{ name, v string }{{"vip", f.VIP}, {"backend", f.Backend}} {
		if x.v == "" {
			continue
		}
		if _, err := netip.ParseAddrPort(x.v); err != nil {
			return fmt.Errorf("%s filter %q is not IP:PORT", x.name, x.v)
		}
	}
	if f.State != "" && !slices.Contains(ConnStates, f.State) {
		return fmt.Errorf("state filter %q is not one of %s", f.State, strings.Join(ConnStates, ", "))
	}
	if f.Protocol != "" && !slices.Contains(ConnProtocols, f.Protocol) {
		return fmt.Errorf("protocol filter %q is not one of %s", f.Protocol, strings.Join(ConnProtocols, ", "))
	}
	return nil
}

// Match tells whether c passes the filter.
func (f ConnFilter) Match(c Conn) bool {
	return (f.VIP == "" || f.VIP == c.VIP) && (f.Backend == "" || f.Backend == c.Backend) && (f.State == "" || f.State == c.State) &&
		(f.Protocol == "" || f.Protocol == c.Protocol)
}

// Stats are the figures `xlbctl stats` shows. Figures are keyed by name
// so that new ones (such as per-backend packets and bytes) need no new
// message: a client shows the names it knows in its own order and any
// other after them.
type Stats struct {
	// Counters are the data path's global counters, summed over CPUs.
	Counters map[string]uint64 `json:"counters"`
	// Ports is the source-port table's use.
	Ports    PortUse        `json:"ports"`
	Services []ServiceStats `json:"services"`
}

// PortUse counts source-port ways: taken by connections, held for a
// backend's TIME_WAIT, and all there are.
type PortUse struct {
	Used     int `json:"used"`
	Held     int `json:"held"`
	Capacity int `json:"capacity"`
}

// ServiceStats are a service's backends' figures.
type ServiceStats struct {
	VIP      string         `json:"vip"`
	Protocol string         `json:"protocol"` // tcp or udp
	Policy   string         `json:"policy"`
	Backends []BackendStats `json:"backends"`
}

// BackendStats are one backend's figures.
type BackendStats struct {
	Address string `json:"address"`
	// Gauges are values now, such as "active" (open connections).
	Gauges map[string]int64 `json:"gauges"`
	// Counters only grow while the backend is configured, such as
	// "new_conns" (connections created).
	Counters map[string]uint64 `json:"counters"`
}

// PolicyRequest asks for a service's policy (all services if Service is
// empty) to be swapped.
type PolicyRequest struct {
	Policy  string `json:"policy"`
	Service string `json:"service,omitempty"`
}

// PolicyResult reports a swap.
type PolicyResult struct {
	Services []string `json:"services"`
	Took     string   `json:"took"` // command to new state in force
}

// ChainMember is one member of the XDP chain.
type ChainMember struct {
	Name       string   `json:"name"`
	Object     string   `json:"object,omitempty"`
	Program    string   `json:"program,omitempty"`
	SHA256     string   `json:"sha256,omitempty"` // of the object, as loaded
	Priority   int      `json:"priority"`
	ContinueOn []string `json:"continue_on"`
	Builtin    bool     `json:"builtin,omitempty"` // xlb's own pipeline
	PinPath    string   `json:"pin_path,omitempty"`
	Maps       []string `json:"maps,omitempty"` // pinned in PinPath
}

// Handler is what the server exposes. Methods return errors meant for
// the operator.
type Handler interface {
	Status(ctx context.Context) (Status, error)
	Conns(ctx context.Context, f ConnFilter) ([]Conn, error)
	Stats(ctx context.Context) (Stats, error)
	SetPolicy(ctx context.Context, req PolicyRequest) (PolicyResult, error)
	ChainList(ctx context.Context) ([]ChainMember, error)
	ChainAdd(ctx context.Context, m ChainMember) error
	ChainRemove(ctx context.Context, name string) error
	// Shutdown makes xlbd stop after it answered.
	Shutdown(ctx context.Context, req ShutdownRequest) error
}

// ErrNotSupported is returned by handlers for features not built in.
var ErrNotSupported = errors.New("not supported by this xlbd")

type errorBody struct {
	Error string `json:"error"`
}

// Serve answers requests on the unix socket at path until ctx ends. It
// replaces a stale socket file and removes it on return.
func Serve(ctx context.Context, path string, h Handler) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create socket directory: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("listen on %s: another xlbd answers there", path)
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("restrict %s: %w", path, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		v, err := h.Status(r.Context())
		send(w, v, err)
	})
	mux.HandleFunc("GET /v1/conns", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		v, err := h.Conns(r.Context(), ConnFilter{VIP: q.Get("vip"), Backend: q.Get("backend"), State: q.Get("state"), Protocol: q.Get("protocol")})
		send(w, v, err)
	})
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) {
		v, err := h.Stats(r.Context())
		send(w, v, err)
	})
	mux.HandleFunc("POST /v1/policy", func(w http.ResponseWriter, r *http.Request) {
		var req PolicyRequest
		if !decode(w, r, &req) {
			return
		}
		v, err := h.SetPolicy(r.Context(), req)
		send(w, v, err)
	})
	mux.HandleFunc("GET /v1/chain", func(w http.ResponseWriter, r *http.Request) {
		v, err := h.ChainList(r.Context())
		send(w, v, err)
	})
	mux.HandleFunc("POST /v1/chain", func(w http.ResponseWriter, r *http.Request) {
		var m ChainMember
		if !decode(w, r, &m) {
			return
		}
		send(w, struct{}{}, h.ChainAdd(r.Context(), m))
	})
	mux.HandleFunc("DELETE /v1/chain/{name}", func(w http.ResponseWriter, r *http.Request) {
		send(w, struct{}{}, h.ChainRemove(r.Context(), r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		var req ShutdownRequest
		if !decode(w, r, &req) {
			return
		}
		send(w, struct{}{}, h.Shutdown(r.Context(), req))
	})
	err = ServeHTTP(ctx, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, l)
	_ = os.Remove(path)
	return err
}

// ServeHTTP serves srv on l until ctx ends, then shuts it down, giving
// requests in flight 2 s.
func ServeHTTP(ctx context.Context, srv *http.Server, l net.Listener) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	err := srv.Serve(l)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, errorBody{Error: "decode request: " + err.Error()})
		return false
	}
	return true
}

func send(w http.ResponseWriter, v any, err error) {
	if err != nil {
		code := http.StatusUnprocessableEntity
		if errors.Is(err, ErrNotSupported) {
			code = http.StatusNotImplemented
		}
		writeJSON(w, code, errorBody{Error: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// Client talks to xlbd.
type Client struct {
	path string
	hc   *http.Client
}

// DialError says that xlbd could not be reached on its socket; Err is
// the cause (such as fs.ErrNotExist, syscall.ECONNREFUSED,
// fs.ErrPermission or context.DeadlineExceeded).
type DialError struct {
	Socket string
	Err    error
}

func (e *DialError) Error() string { return fmt.Sprintf("reach xlbd at %s: %v", e.Socket, e.Err) }

func (e *DialError) Unwrap() error { return e.Err }

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{path: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://xlbd"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		// The URL is internal to this package: report the socket.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		var oe *net.OpError
		if errors.As(err, &oe) {
			err = oe.Err
		}
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		return &DialError{Socket: c.path, Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e errorBody
		if json.NewDecoder(resp.Body).Decode(&e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("xlbd answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status fetches xlbd's state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, http.MethodGet, "/v1/status", nil, &s)
}

// Conns lists every tracked connection.
func (c *Client) Conns(ctx context.Context) ([]Conn, error) {
	return c.FindConns(ctx, ConnFilter{})
}

// FindConns lists the tracked connections that pass f.
func (c *Client) FindConns(ctx context.Context, f ConnFilter) ([]Conn, error) {
	q := url.Values{}
	for k, v := range map[string]string{"vip": f.VIP, "backend": f.Backend, "state": f.State, "protocol": f.Protocol} {
		if v != "" {
			q.Set(k, v)
		}
	}
	path := "/v1/conns"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var cs []Conn
	return cs, c.do(ctx, http.MethodGet, path, nil, &cs)
}

// Stats fetches counters and gauges.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	return s, c.do(ctx, http.MethodGet, "/v1/stats", nil, &s)
}

// SetPolicy swaps a policy.
func (c *Client) SetPolicy(ctx context.Context, req PolicyRequest) (PolicyResult, error) {
	var r PolicyResult
	return r, c.do(ctx, http.MethodPost, "/v1/policy", req, &r)
}

// ChainList lists the chain.
func (c *Client) ChainList(ctx context.Context) ([]ChainMember, error) {
	var ms []ChainMember
	return ms, c.do(ctx, http.MethodGet, "/v1/chain", nil, &ms)
}

// ChainAdd adds a member.
func (c *Client) ChainAdd(ctx context.Context, m ChainMember) error {
	return c.do(ctx, http.MethodPost, "/v1/chain", m, nil)
}

// ChainRemove removes a member.
func (c *Client) ChainRemove(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/chain/"+name, nil, nil)
}

// Shutdown asks xlbd to stop.
func (c *Client) Shutdown(ctx context.Context, req ShutdownRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/shutdown", req, nil)
}
