package live

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/config"
)

// parse reads a configuration file's text.
func parse(t *testing.T, yaml string) *config.Config {
	t.Helper()
	path := filepath.Join(t.TempDir(), "xlb.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse([]string{"--config", path})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// summary writes a configuration's services and chain on one line:
// "vip/proto policy [addr@weight ...]; ...; chain: name ...".
func summary(c *config.Config) string {
	var out []string
	for _, s := range c.Services {
		var bs []string
		for _, b := range s.Backends {
			bs = append(bs, fmt.Sprintf("%s@%d", b.Address, b.Weight))
		}
		out = append(out, fmt.Sprintf("%s %s %v", s.Key(), s.Policy, bs))
	}
	var names []string
	for _, m := range c.Chain {
		names = append(names, m.Name)
	}
	return strings.Join(out, "; ") + "; chain: " + strings.Join(names, " ")
}

const base = `
iface: eth0
services:
  - vip: 10.0.0.10:80
    backends: [10.0.0.2:80, 10.0.0.3:80]
  - vip: 10.0.0.10:53
    protocol: udp
    backends: [10.0.0.2:53]
`

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if what == "" {
		t.Fatal("a change described as nothing")
	}
}

func TestApply(t *testing.T) {
	file := parse(t, base)
	var c Changes
	if got, want := summary(c.Apply(file)), summary(file); got != want {
		t.Fatalf("no change: %s, want %s", got, want)
	}
	tcp := "10.0.0.10:80/tcp"
	w, err := c.AddBackend(file, tcp, config.Backend{Address: ap("10.0.0.4:80"), Weight: 2})
	must(t, w, err)
	w, err = c.SetWeight(file, tcp, ap("10.0.0.2:80"), 0)
	must(t, w, err)
	if w != "service 10.0.0.10:80/tcp: backend 10.0.0.2:80 weight 1 -> 0" {
		t.Errorf("described as %q", w)
	}
	w, err = c.RemoveBackend(file, tcp, ap("10.0.0.3:80"))
	must(t, w, err)
	w, err = c.SetPolicy(file, tcp, "hash")
	must(t, w, err)
	w, err = c.AddService(file, config.Service{VIP: ap("10.0.0.11:80"), Protocol: "tcp", Policy: "random", AllDown: "rst",
		Backends: []config.Backend{{Address: ap("10.0.0.5:80"), Weight: 1}}})
	must(t, w, err)
	w, err = c.AddBackend(file, "10.0.0.11:80/tcp", config.Backend{Address: ap("10.0.0.6:80"), Weight: 1})
	must(t, w, err)
	w, err = c.RemoveService(file, "10.0.0.10:53/udp")
	must(t, w, err)
	w, err = c.AddMember(file, config.ChainMember{Name: "fw", Object: "/x.o"})
	must(t, w, err)

	eff := c.Apply(file)
	want := "10.0.0.10:80/tcp hash [10.0.0.2:80@0 10.0.0.4:80@2]; 10.0.0.11:80/tcp random [10.0.0.5:80@1 10.0.0.6:80@1]; chain: fw"
	if got := summary(eff); got != want {
		t.Errorf("applied:\n%s\nwant\n%s", got, want)
	}
	if got := summary(file); got != "10.0.0.10:80/tcp random [10.0.0.2:80@1 10.0.0.3:80@1]; 10.0.0.10:53/udp random [10.0.0.2:53@1]; chain: " {
		t.Errorf("Apply changed the file's configuration: %s", got)
	}
	for _, tc := range []struct {
		what string
		live bool
	}{
		{"service 10.0.0.10:80/tcp (policy)", c.LiveService(tcp)},
		{"service 10.0.0.11:80/tcp", c.LiveService("10.0.0.11:80/tcp")},
		{"backend 10.0.0.2:80 (weight)", c.LiveBackend(tcp, ap("10.0.0.2:80"))},
		{"backend 10.0.0.4:80 (added)", c.LiveBackend(tcp, ap("10.0.0.4:80"))},
		{"backend of a live service", c.LiveBackend("10.0.0.11:80/tcp", ap("10.0.0.5:80"))},
		{"member fw", c.LiveMember("fw")},
	} {
		if !tc.live {
			t.Errorf("%s not marked live", tc.what)
		}
	}
	if c.LiveService("10.0.0.10:53/udp") || c.LiveMember("ids") {
		t.Error("items not changed marked live")
	}
	if n := len(c.List()); n != 7 {
		t.Errorf("%d changes listed, want 7: %q", n, c.List())
	}

	// A clone is independent.
	cl := c.Clone()
	if _, err := cl.SetWeight(file, tcp, ap("10.0.0.4:80"), 9); err != nil {
		t.Fatal(err)
	}
	if got := summary(c.Apply(file)); got != want {
		t.Errorf("changing a clone changed the original: %s", got)
	}

	// Back to the file's weight: the change is forgotten.
	if _, err := c.SetWeight(file, tcp, ap("10.0.0.2:80"), 1); err != nil {
		t.Fatal(err)
	}
	if c.LiveBackend(tcp, ap("10.0.0.2:80")) {
		t.Error("a backend set back to the file's weight is still live")
	}
}

func TestRefusals(t *testing.T) {
	file := parse(t, base)
	var c Changes
	tcp := "10.0.0.10:80/tcp"
	for _, tc := range []struct {
		name string
		do   func() (string, error)
		is   error
		want string
	}{
		{"add an existing backend", func() (string, error) {
			return c.AddBackend(file, tcp, config.Backend{Address: ap("10.0.0.2:80"), Weight: 1})
		}, ErrExists, "backend 10.0.0.2:80 of service 10.0.0.10:80/tcp: already exists (change its weight with set-weight)"},
		{"backend of no service", func() (string, error) {
			return c.AddBackend(file, "10.0.0.99:80/tcp", config.Backend{Address: ap("10.0.0.2:80"), Weight: 1})
		}, ErrNotFound, "service 10.0.0.99:80/tcp: not found"},
		{"remove a backend that is not there", func() (string, error) { return c.RemoveBackend(file, tcp, ap("10.0.0.9:80")) }, ErrNotFound,
			"backend 10.0.0.9:80 of service 10.0.0.10:80/tcp: not found"},
		{"remove the last backend", func() (string, error) { return c.RemoveBackend(file, "10.0.0.10:53/udp", ap("10.0.0.2:53")) }, ErrRefused,
			"it is the service's last backend"},
		{"weight of a backend that is not there", func() (string, error) { return c.SetWeight(file, tcp, ap("10.0.0.9:80"), 2) }, ErrNotFound, "not found"},
		{"add an existing service", func() (string, error) {
			return c.AddService(file, config.Service{VIP: ap("10.0.0.10:80"), Protocol: "tcp"})
		}, ErrExists, "service 10.0.0.10:80/tcp: already exists"},
		{"remove no service", func() (string, error) { return c.RemoveService(file, "10.0.0.10:81/tcp") }, ErrNotFound, "not found"},
		{"remove no member", func() (string, error) { return c.RemoveMember(file, "fw") }, ErrNotFound, "chain member fw: not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.do()
			if !errors.Is(err, tc.is) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want %v: %q", err, tc.is, tc.want)
			}
			if !c.Empty() {
				t.Errorf("a refused change left changes: %q", c.List())
			}
		})
	}
	if _, err := ResolveService(file, ap("10.0.0.10:53"), ""); err != nil {
		t.Errorf("the only service on a VIP: %v", err)
	}
	file2 := parse(t, base+"  - vip: 10.0.0.10:53\n    backends: [10.0.0.2:53]\n")
	if _, err := ResolveService(file2, ap("10.0.0.10:53"), ""); !errors.Is(err, ErrAmbiguous) {
		t.Errorf("a tcp and a udp service on one VIP: %v, want ErrAmbiguous", err)
	}
	if key, err := ResolveService(file2, ap("10.0.0.10:53"), "tcp"); err != nil || key != "10.0.0.10:53/tcp" {
		t.Errorf("with the protocol: %q, %v", key, err)
	}
}

// TestRebase: a reload keeps the live changes whose item the new file
// leaves as it was, and drops the others.
func TestRebase(t *testing.T) {
	file := parse(t, base)
	var c Changes
	tcp := "10.0.0.10:80/tcp"
	steps := []func() (string, error){
		func() (string, error) { return c.SetWeight(file, tcp, ap("10.0.0.2:80"), 5) },
		func() (string, error) { return c.SetWeight(file, tcp, ap("10.0.0.3:80"), 6) },
		func() (string, error) {
			return c.AddBackend(file, tcp, config.Backend{Address: ap("10.0.0.4:80"), Weight: 1})
		},
		func() (string, error) {
			return c.AddBackend(file, tcp, config.Backend{Address: ap("10.0.0.5:80"), Weight: 1})
		},
		func() (string, error) { return c.SetPolicy(file, tcp, "hash") },
		func() (string, error) { return c.RemoveService(file, "10.0.0.10:53/udp") },
		func() (string, error) {
			return c.AddService(file, config.Service{VIP: ap("10.0.0.11:80"), Protocol: "tcp", Policy: "random", AllDown: "rst",
				Backends: []config.Backend{{Address: ap("10.0.0.6:80"), Weight: 1}}})
		},
	}
	for _, step := range steps {
		w, err := step()
		must(t, w, err)
	}

	// The same file: everything stays.
	if d := c.Rebase(parse(t, base)); len(d) != 0 {
		t.Errorf("the same file dropped %q", d)
	}
	// A new file changes backend 10.0.0.3 (weight), adds 10.0.0.5 itself,
	// adds a third service, and leaves the rest alone.
	next := parse(t, `
iface: eth0
services:
  - vip: 10.0.0.10:80
    backends: [10.0.0.2:80, 10.0.0.3:80@2, 10.0.0.5:80@3]
  - vip: 10.0.0.10:53
    protocol: udp
    backends: [10.0.0.2:53]
  - vip: 10.0.0.12:80
    backends: [10.0.0.7:80]
`)
	dropped := c.Rebase(next)
	want := []string{
		"backend 10.0.0.3:80 of service 10.0.0.10:80/tcp: the file changes it",
		"backend 10.0.0.5:80 of service 10.0.0.10:80/tcp: the file changes it",
	}
	if !slices.Equal(dropped, want) {
		t.Errorf("dropped %q, want %q", dropped, want)
	}
	got := summary(c.Apply(next))
	if w := "10.0.0.10:80/tcp hash [10.0.0.2:80@5 10.0.0.3:80@2 10.0.0.5:80@3 10.0.0.4:80@1]; 10.0.0.12:80/tcp random [10.0.0.7:80@1]; " +
		"10.0.0.11:80/tcp random [10.0.0.6:80@1]; chain: "; got != w {
		t.Errorf("after the reload:\n%s\nwant\n%s", got, w)
	}

	// A file that changes the policy and the removed service: both
	// dropped; the file's service comes back.
	last := parse(t, strings.Replace(strings.Replace(base, "protocol: udp", "protocol: udp\n    policy: hash", 1),
		"  - vip: 10.0.0.10:80\n", "  - vip: 10.0.0.10:80\n    policy: least-conn\n", 1))
	dropped = c.Rebase(last)
	// 10.0.0.5 was the file's own in next and is absent now: no live
	// change of it remained to drop.
	want = []string{
		"policy hash of service 10.0.0.10:80/tcp: the file changes the service's policy",
		"service 10.0.0.10:53/udp: the file changes it",
	}
	if !slices.Equal(dropped, want) {
		t.Errorf("dropped %q, want %q", dropped, want)
	}
	got = summary(c.Apply(last))
	if w := "10.0.0.10:80/tcp least-conn [10.0.0.2:80@5 10.0.0.3:80@1 10.0.0.4:80@1]; 10.0.0.10:53/udp hash [10.0.0.2:53@1]; " +
		"10.0.0.11:80/tcp random [10.0.0.6:80@1]; chain: "; got != w {
		t.Errorf("after the second reload:\n%s\nwant\n%s", got, w)
	}
}
