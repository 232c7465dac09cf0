package plugins

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-plugin"

	policypb "github.com/xlb-project/xlb/plugins/proto"
)

func testBackends(n int) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{Address: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 9, 0, byte(i + 1)}), 80), Weight: 1}
	}
	return bs
}

func seq(n int) []uint32 {
	t := make([]uint32, n)
	for i := range t {
		t[i] = uint32(i)
	}
	return t
}

func TestValidate(t *testing.T) {
	bs := testBackends(100)
	bs[7].State = StateDraining
	bs[8].Weight = 0
	bs[9].State = StateDown
	for _, tc := range []struct {
		name    string
		sel     Selection
		wantErr string // "" for valid
	}{
		{"random ok", Selection{ModeRandom, []uint32{0, 0, 1, 99}}, ""},
		{"hash ok, maximal", Selection{ModeHash, make([]uint32, MaxTableLen)}, ""},
		{"round robin ok", Selection{ModeRoundRobin, []uint32{3, 1, 3}}, ""},
		{"least-conn ok, 64", Selection{ModeLeastConn, seq(74)[10:]}, ""},
		{"mode 0", Selection{0, []uint32{0}}, "invalid selection: unknown mode mode(0)"},
		{"mode 5", Selection{5, []uint32{0}}, "invalid selection: unknown mode mode(5)"},
		{"empty", Selection{ModeRandom, nil}, "invalid selection: empty table"},
		{"too long", Selection{ModeHash, make([]uint32, MaxTableLen+1)}, "invalid selection: table has 65538 entries, at most 65537 allowed"},
		{"index out of range", Selection{ModeRandom, []uint32{0, 100}}, "invalid selection: table entry 1 is backend 100, the request has 100 backends"},
		{"huge index", Selection{ModeRoundRobin, []uint32{^uint32(0)}}, "invalid selection: table entry 0 is backend 4294967295, the request has 100 backends"},
		{"least-conn over 64", Selection{ModeLeastConn, seq(76)[10:]}, "invalid selection: least-conn has 66 candidates, at most 64 allowed"},
		{"least-conn duplicate", Selection{ModeLeastConn, []uint32{1, 2, 1}}, "invalid selection: least-conn candidate 2 repeats backend 1 (entry 0)"},
		{"draining", Selection{ModeRandom, []uint32{1, 7}}, "invalid selection: table entry 1 picks backend 7 (10.9.0.8:80), which is draining"},
		{"weight 0", Selection{ModeHash, []uint32{8}}, "invalid selection: table entry 0 picks backend 8 (10.9.0.9:80), which has weight 0"},
		{"down", Selection{ModeLeastConn, []uint32{1, 9}}, "invalid selection: table entry 1 picks backend 9 (10.9.0.10:80), which is down"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.sel.ValidateFor(bs)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("ValidateFor = %v, want nil", err)
				}
				return
			}
			if err == nil || err.Error() != tc.wantErr {
				t.Fatalf("ValidateFor = %v, want %q", err, tc.wantErr)
			}
			if !errors.Is(err, ErrInvalidSelection) {
				t.Errorf("%v is not ErrInvalidSelection", err)
			}
		})
	}
	if err := (Selection{ModeRandom, []uint32{0}}).Validate(0); err == nil {
		t.Error("Validate(0) of a non-empty table: no error")
	}
}

func TestModeString(t *testing.T) {
	got := []string{ModeRandom.String(), ModeHash.String(), ModeLeastConn.String(), ModeRoundRobin.String(), Mode(9).String(), Mode(0).String()}
	want := []string{"random", "hash", "least-conn", "round-robin", "mode(9)", "mode(0)"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	got = []string{StateUp.String(), StateDown.String(), StateDraining.String(), BackendState(7).String()}
	want = []string{"up", "down", "draining", "state(7)"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	if (Backend{Weight: 1}).State != StateUp || !(Backend{Weight: 1}).Eligible() {
		t.Error("the zero state is not up")
	}
}

func TestNeedsInterval(t *testing.T) {
	for _, tc := range []struct {
		n    Needs
		want time.Duration
		str  string
	}{
		{Needs{}, 0, "on change"},
		{Needs{RefreshInterval: time.Second}, 0, "on change"},
		{Needs{LiveLoad: true}, time.Second, "live load every 1s"},
		{Needs{LiveLoad: true, RefreshInterval: 250 * time.Millisecond}, 250 * time.Millisecond, "live load every 250ms"},
		{Needs{LiveLoad: true, RefreshInterval: time.Millisecond}, 100 * time.Millisecond, "live load every 100ms"},
		{Needs{LiveLoad: true, RefreshInterval: time.Hour}, time.Minute, "live load every 1m0s"},
	} {
		if got := tc.n.Interval(); got != tc.want || tc.n.String() != tc.str {
			t.Errorf("%+v: Interval = %s, String = %q; want %s, %q", tc.n, got, tc.n.String(), tc.want, tc.str)
		}
	}
}

func TestCheckPolicy(t *testing.T) {
	for _, tc := range []struct {
		policy string
		ok     bool
	}{
		{"random", true}, {"least-conn", true}, {"p2", true}, {"/usr/lib/xlb/xlb-policy-x", true},
		{"", false}, {"-x", false}, {"Random", false}, {"a_b", false}, {"a.b", false},
		{"../random", false}, {"sub/random", false}, {"/usr/lib/xlb/", false},
	} {
		err := CheckPolicy(tc.policy)
		if (err == nil) != tc.ok {
			t.Errorf("CheckPolicy(%q) = %v, want ok=%v", tc.policy, err, tc.ok)
		}
		if err != nil && (!errors.Is(err, ErrBadPolicyName) || err.Error() != fmt.Sprintf("%q is not a policy name nor an absolute path ([a-z0-9][a-z0-9-]*)", tc.policy)) {
			t.Errorf("CheckPolicy(%q) = %q", tc.policy, err)
		}
	}
}

// fakePolicy returns a fixed answer and records the request.
type fakePolicy struct {
	sel Selection
	err error
	got chan Request
}

func (p *fakePolicy) Select(_ context.Context, req Request) (Selection, error) {
	if p.got != nil {
		p.got <- req
	}
	return p.sel, p.err
}

// inProcess serves p over go-plugin's in-process gRPC test connection and
// returns a Client for it.
func inProcess(t *testing.T, info Info, p Policy) *Client {
	t.Helper()
	client, _ := plugin.TestPluginGRPCConn(t, false, PluginMap(info, p))
	// Close asks the server to shut down (stopping it here too would race
	// inside go-plugin).
	t.Cleanup(func() { _ = client.Close() })
	raw, err := client.Dispense(PluginName)
	if err != nil {
		t.Fatal(err)
	}
	version := info.APIVersion
	if version == 0 {
		version = ProtocolVersion
	}
	c := &Client{name: "test", rpc: raw.(*grpcClient), version: version, callTimeout: DefaultCallTimeout}
	if err := c.handshake(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGRPCRoundTrip(t *testing.T) {
	ctx := context.Background()
	fake := &fakePolicy{sel: Selection{ModeRoundRobin, []uint32{2, 0, 2}}, got: make(chan Request, 1)}
	needs := Needs{LiveLoad: true, RefreshInterval: 300 * time.Millisecond}
	c := inProcess(t, Info{Name: "fake", Version: "0.0.1", APIVersion: ProtocolVersion, Needs: needs}, fake)

	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info != (Info{Name: "fake", Version: "0.0.1", APIVersion: 3, Needs: needs}) {
		t.Errorf("Info = %+v", info)
	}
	if c.Needs() != needs {
		t.Errorf("Needs = %+v, want %+v", c.Needs(), needs)
	}
	req := Request{
		Service: netip.MustParseAddrPort("[2001:db8::10]:443"),
		Backends: []Backend{
			{Address: netip.MustParseAddrPort("192.0.2.1:8443"), Weight: 3, Active: 1 << 40, NewPerSec: 12.5, Health: HealthPassing},
			{Address: netip.MustParseAddrPort("[2001:db8::1]:443"), Weight: 0, State: StateDraining, Health: HealthUnchecked},
			{Address: netip.MustParseAddrPort("192.0.2.3:1"), Weight: 1},
			{Address: netip.MustParseAddrPort("192.0.2.4:1"), Weight: 1, State: StateDown, Health: HealthFailing},
		},
	}
	sel, err := c.Select(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Mode != ModeRoundRobin || !slices.Equal(sel.Table, []uint32{2, 0, 2}) {
		t.Errorf("Select = %+v", sel)
	}
	got := <-fake.got
	if got.Service != req.Service || !slices.Equal(got.Backends, req.Backends) || got.APIVersion != 3 {
		t.Errorf("plugin got %+v, want %+v at version 3", got, req)
	}
}

// TestHealthVersioned: a backend's health reaches a plugin that speaks
// version 3; one that negotiated version 2 sees none, whatever its SDK.
func TestHealthVersioned(t *testing.T) {
	ctx := context.Background()
	req := Request{Service: netip.MustParseAddrPort("192.0.2.100:80"), Backends: testBackends(2)}
	req.Backends[0].Health, req.Backends[1].Health = HealthFailing, HealthPassing
	for _, v := range []int{2, 3} {
		fake := &fakePolicy{sel: Selection{ModeRandom, []uint32{0}}, got: make(chan Request, 1)}
		c := inProcess(t, Info{Name: "fake", APIVersion: v}, fake)
		if _, err := c.Select(ctx, req); err != nil {
			t.Fatal(err)
		}
		got := <-fake.got
		want := []Health{HealthFailing, HealthPassing}
		if v < 3 {
			want = []Health{HealthNone, HealthNone}
		}
		if got.APIVersion != v || got.Backends[0].Health != want[0] || got.Backends[1].Health != want[1] {
			t.Errorf("version %d: plugin got version %d, health %s, %s; want %s, %s", v, got.APIVersion, got.Backends[0].Health,
				got.Backends[1].Health, want[0], want[1])
		}
	}
	if req.Backends[0].Health != HealthFailing {
		t.Error("Select changed the caller's request")
	}
	if s := HealthFailing.String(); s != "failing" {
		t.Errorf("HealthFailing.String() = %q", s)
	}
}

func TestClientRefusesNonsense(t *testing.T) {
	ctx := context.Background()
	req := Request{Service: netip.MustParseAddrPort("192.0.2.100:80"), Backends: testBackends(3)}
	req.Backends[1].State = StateDraining
	for _, tc := range []struct {
		name    string
		fake    *fakePolicy
		req     Request
		wantErr string
		wantIs  error
	}{
		{"out of range", &fakePolicy{sel: Selection{ModeRandom, []uint32{0, 3}}}, req,
			"policy fake: select 192.0.2.100:80: invalid selection: table entry 1 is backend 3, the request has 3 backends", ErrInvalidSelection},
		{"draining", &fakePolicy{sel: Selection{ModeHash, []uint32{0, 1}}}, req,
			"policy fake: select 192.0.2.100:80: invalid selection: table entry 1 picks backend 1 (10.9.0.2:80), which is draining", ErrInvalidSelection},
		{"unknown mode", &fakePolicy{sel: Selection{200, []uint32{0}}}, req,
			"policy fake: select 192.0.2.100:80: invalid selection: unknown mode mode(200)", ErrInvalidSelection},
		{"plugin error", &fakePolicy{err: errors.New("boom")}, req,
			"policy fake: select 192.0.2.100:80: rpc error: code = Unknown desc = boom", nil},
		{"no eligible backend", &fakePolicy{}, Request{Service: req.Service, Backends: req.Backends[1:2]},
			"policy fake: select 192.0.2.100:80: no backend may take new connections", ErrNoBackends},
		{"invalid backend address", &fakePolicy{}, Request{Service: req.Service, Backends: []Backend{{Weight: 1}}},
			"policy fake: select 192.0.2.100:80: backend 0: invalid address invalid AddrPort", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := inProcess(t, Info{Name: "fake", APIVersion: ProtocolVersion}, tc.fake)
			_, err := c.Select(ctx, tc.req)
			if err == nil || err.Error() != tc.wantErr {
				t.Fatalf("Select = %v, want %q", err, tc.wantErr)
			}
			if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
				t.Errorf("%v is not %v", err, tc.wantIs)
			}
		})
	}
}

func TestHandshakeRefusesOtherAPIVersion(t *testing.T) {
	client, _ := plugin.TestPluginGRPCConn(t, false, PluginMap(Info{Name: "future", APIVersion: 4}, &fakePolicy{}))
	defer client.Close()
	raw, err := client.Dispense(PluginName)
	if err != nil {
		t.Fatal(err)
	}
	c := &Client{name: "test", rpc: raw.(*grpcClient), version: 3, callTimeout: DefaultCallTimeout}
	err = c.handshake(context.Background())
	if !errors.Is(err, ErrIncompatible) || err.Error() != `incompatible plugin API version: plugin "future" speaks 4, host speaks 3` {
		t.Fatalf("handshake = %v", err)
	}
}

// TestNoBackendAnswer: a version 2 plugin's ErrNoBackends reaches the host
// as the "no backend" answer (an empty table); speaking version 1 it stays
// an error, and the host refuses an empty table.
func TestNoBackendAnswer(t *testing.T) {
	ctx := context.Background()
	req := Request{Service: netip.MustParseAddrPort("192.0.2.100:80"), Backends: testBackends(2)}
	c := inProcess(t, Info{Name: "fake", APIVersion: 2}, &fakePolicy{err: ErrNoBackends})
	if _, err := c.Select(ctx, req); !errors.Is(err, ErrNoBackends) || err.Error() != "policy fake: select 192.0.2.100:80: no backend may take new connections" {
		t.Errorf("version 2: Select = %v, want the no-backend answer", err)
	}
	v1 := inProcess(t, Info{Name: "fake", APIVersion: 1}, &fakePolicy{err: ErrNoBackends})
	if v1.Needs() != v1Needs {
		t.Errorf("version 1 plugin: Needs = %+v, want %+v", v1.Needs(), v1Needs)
	}
	if _, err := v1.Select(ctx, req); err == nil || errors.Is(err, ErrNoBackends) {
		t.Errorf("version 1: Select = %v, want a plain error", err)
	}
	empty := inProcess(t, Info{Name: "fake", APIVersion: 1}, &fakePolicy{sel: Selection{}})
	if _, err := empty.Select(ctx, req); !errors.Is(err, ErrInvalidSelection) {
		t.Errorf("version 1: empty table: Select = %v, want ErrInvalidSelection", err)
	}
}

// TestV1HostRequest: what a version 1 host sends (no state, draining set)
// reaches a policy as StateDraining; a version 2 host's states arrive as
// they are, and draining is set for every backend that is not up.
func TestV1HostRequest(t *testing.T) {
	in := &policypb.SelectRequest{
		Service: &policypb.AddrPort{Ip: []byte{192, 0, 2, 1}, Port: 80},
		Backends: []*policypb.Backend{
			{Address: &policypb.AddrPort{Ip: []byte{10, 0, 0, 1}, Port: 80}, Weight: 1},
			{Address: &policypb.AddrPort{Ip: []byte{10, 0, 0, 2}, Port: 80}, Weight: 1, Draining: true},
		},
	}
	req, err := requestFromProto(in)
	if err != nil {
		t.Fatal(err)
	}
	if req.Backends[0].State != StateUp || req.Backends[1].State != StateDraining {
		t.Errorf("states = %s, %s; want up, draining", req.Backends[0].State, req.Backends[1].State)
	}
	req.Backends[1].State = StateDown
	out, err := requestToProto(req)
	if err != nil {
		t.Fatal(err)
	}
	if b := out.Backends[1]; !b.Draining || b.State != policypb.BackendState_BACKEND_STATE_DOWN || out.Backends[0].Draining {
		t.Errorf("wire backends = %v", out.Backends)
	}
}

func TestResolve(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "xlb-policy-random")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "xlb-policy-plain"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "xlb-policy-dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, dir, want, wantErr string
	}{
		{"random", dir, exe, ""},
		{exe, "", exe, ""},
		{"missing", dir, "", `resolve policy "missing": stat ` + dir + `/xlb-policy-missing: no such file or directory`},
		{"plain", dir, "", `resolve policy "plain": ` + dir + `/xlb-policy-plain: not an executable file`},
		{"dir", dir, "", `resolve policy "dir": ` + dir + `/xlb-policy-dir: not an executable file`},
		{"../random", dir, "", `resolve policy: "../random" is not a policy name nor an absolute path ([a-z0-9][a-z0-9-]*)`},
		{"sub/random", dir, "", `resolve policy: "sub/random" is not a policy name nor an absolute path ([a-z0-9][a-z0-9-]*)`},
		{"random", "", "", `resolve policy "random": no plugin directory`},
	} {
		got, err := Resolve(tc.name, tc.dir)
		if tc.wantErr != "" {
			if err == nil || err.Error() != tc.wantErr {
				t.Errorf("Resolve(%q, %q) = %q, %v; want error %q", tc.name, tc.dir, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Resolve(%q, %q) = %q, %v; want %q", tc.name, tc.dir, got, err, tc.want)
		}
	}
}

// TestPluginLogHandler checks the plugin side's log lines have the form
// go-plugin's host parses (hclog JSON).
func TestPluginLogHandler(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(NewPluginLogHandler(&buf, levelTrace))
	log.Log(context.Background(), levelTrace, "t")
	log.Warn("table built", "entries", 3, slog.Group("g", "k", "v"))
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines: %q", len(lines), buf.String())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &m); err != nil {
		t.Fatal(err)
	}
	if m["@level"] != "warn" || m["@message"] != "table built" || m["entries"] != 3.0 || m["g"].(map[string]any)["k"] != "v" {
		t.Errorf("line = %s", lines[1])
	}
	if _, ok := m["@timestamp"].(string); !ok {
		t.Errorf("no @timestamp: %s", lines[1])
	}
	if !strings.Contains(lines[0], `"@level":"trace"`) {
		t.Errorf("trace line = %s", lines[0])
	}
}
