package xdp

import (
	"errors"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// TestVerdictsMatchKernel proves the names and values are the kernel's
// enum xdp_action (read from its BTF): every action, no other.
func TestVerdictsMatchKernel(t *testing.T) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatalf("load the kernel's BTF: %v", err)
	}
	var enum *btf.Enum
	if err := spec.TypeByName("xdp_action", &enum); err != nil {
		t.Fatal(err)
	}
	if len(enum.Values) != len(names) {
		t.Errorf("kernel has %d XDP actions, xdp names %d", len(enum.Values), len(names))
	}
	for _, v := range enum.Values {
		name := strings.ToLower(strings.TrimPrefix(v.Name, "XDP_"))
		got, err := Parse(v.Name)
		if err != nil || uint64(got) != v.Value || got.String() != name {
			t.Errorf("kernel's %s = %d: Parse gives %d (%s), %v", v.Name, v.Value, got, got, err)
		}
	}
}

func TestParse(t *testing.T) {
	for in, want := range map[string]Verdict{"pass": Pass, "XDP_DROP": Drop, "tx": TX, "Redirect": Redirect, "aborted": Aborted} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := Parse("accept"); !errors.Is(err, ErrBadVerdict) {
		t.Errorf("Parse(accept) = %v, want ErrBadVerdict", err)
	}
	if s := Verdict(9).String(); s != "verdict(9)" {
		t.Errorf("Verdict(9) = %s", s)
	}
}
