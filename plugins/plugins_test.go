package plugins

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/go-plugin"
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
	bs[7].Draining = true
	bs[8].Weight = 0
	for _, tc := range []struct {
		name    string
		sel     Selection
		wantErr string // "" for valid
	}{
		{"random ok", Selection{ModeRandom, []uint32{0, 0, 1, 99}}, ""},
		{"hash ok, maximal", Selection{ModeHash, make([]uint32, MaxTableLen)}, ""},
		{"round robin ok", Selection{ModeRoundRobin, []uint32{3, 1, 3}}, ""},
		{"least-conn ok, 64", Selection{ModeLeastConn, seq(64)[9:]}, ""},
		{"mode 0", Selection{0, []uint32{0}}, "invalid selection: unknown mode mode(0)"},
		{"mode 5", Selection{5, []uint32{0}}, "invalid selection: unknown mode mode(5)"},
		{"empty", Selection{ModeRandom, nil}, "invalid selection: empty table"},
		{"too long", Selection{ModeHash, make([]uint32, MaxTableLen+1)}, "invalid selection: table has 65538 entries, at most 65537 allowed"},
		{"index out of range", Selection{ModeRandom, []uint32{0, 100}}, "invalid selection: table entry 1 is backend 100, the request has 100 backends"},
		{"huge index", Selection{ModeRoundRobin, []uint32{^uint32(0)}}, "invalid selection: table entry 0 is backend 4294967295, the request has 100 backends"},
		{"least-conn over 64", Selection{ModeLeastConn, seq(75)[9:]}, "invalid selection: least-conn has 66 candidates, at most 64 allowed"},
		{"least-conn duplicate", Selection{ModeLeastConn, []uint32{1, 2, 1}}, "invalid selection: least-conn candidate 2 repeats backend 1 (entry 0)"},
		{"draining", Selection{ModeRandom, []uint32{1, 7}}, "invalid selection: table entry 1 picks backend 7 (10.9.0.8:80), which is draining"},
		{"weight 0", Selection{ModeHash, []uint32{8}}, "invalid selection: table entry 0 picks backend 8 (10.9.0.9:80), which has weight 0"},
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
	got := []string{ModeRandom.String(), ModeHash.String(), ModeLeastConn.String(), ModeRoundRobin.String(), Mode(9).String()}
	want := []string{"random", "hash", "least-conn", "round-robin", "mode(9)"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
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
	c := &Client{name: "test", rpc: raw.(*grpcClient)}
	if err := c.handshake(context.Background()); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGRPCRoundTrip(t *testing.T) {
	ctx := context.Background()
	fake := &fakePolicy{sel: Selection{ModeRoundRobin, []uint32{2, 0, 2}}, got: make(chan Request, 1)}
	c := inProcess(t, Info{Name: "fake", Version: "0.0.1", APIVersion: ProtocolVersion}, fake)

	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info != (Info{Name: "fake", Version: "0.0.1", APIVersion: 1}) {
		t.Errorf("Info = %+v", info)
	}
	req := Request{
		Service: netip.MustParseAddrPort("[2001:db8::10]:443"),
		Backends: []Backend{
			{Address: netip.MustParseAddrPort("192.0.2.1:8443"), Weight: 3, Active: 1 << 40, NewPerSec: 12.5},
			{Address: netip.MustParseAddrPort("[2001:db8::1]:443"), Weight: 0, Draining: true},
			{Address: netip.MustParseAddrPort("192.0.2.3:1"), Weight: 1},
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
	if got.Service != req.Service || !slices.Equal(got.Backends, req.Backends) {
		t.Errorf("plugin got %+v, want %+v", got, req)
	}
}

func TestClientRefusesNonsense(t *testing.T) {
	ctx := context.Background()
	req := Request{Service: netip.MustParseAddrPort("192.0.2.100:80"), Backends: testBackends(3)}
	req.Backends[1].Draining = true
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
	client, _ := plugin.TestPluginGRPCConn(t, false, PluginMap(Info{Name: "future", APIVersion: 2}, &fakePolicy{}))
	defer client.Close()
	raw, err := client.Dispense(PluginName)
	if err != nil {
		t.Fatal(err)
	}
	c := &Client{name: "test", rpc: raw.(*grpcClient)}
	err = c.handshake(context.Background())
	if !errors.Is(err, ErrIncompatible) || err.Error() != `incompatible plugin API version: plugin "future" speaks 2, host speaks 1` {
		t.Fatalf("handshake = %v", err)
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
		{"../random", dir, "", `resolve policy "../random": not a policy name ([a-z0-9_-]) nor an absolute path`},
		{"sub/random", dir, "", `resolve policy "sub/random": not a policy name ([a-z0-9_-]) nor an absolute path`},
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
