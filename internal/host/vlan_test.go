package host

import (
	"slices"
	"strings"
	"testing"

	"github.com/xlb-project/xlb/internal/testnet"
)

// offloads reads eth0's VLAN receive offloads as `ethtool -k` shows them.
func offloads(t *testing.T, ns *testnet.NS) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, line := range strings.Split(ns.Exec(t, "ethtool", "-k", "eth0"), "\n") {
		name, val, ok := strings.Cut(strings.TrimSpace(line), ": ")
		if ok && (name == "rx-vlan-offload" || name == "rx-vlan-stag-hw-parse") {
			out[name] = strings.Fields(val)[0]
		}
	}
	if len(out) != 2 {
		t.Fatalf("ethtool -k eth0: VLAN receive offloads not found: %v", out)
	}
	return out
}

// TestHostVLANOffload checks that KeepVLANTags turns off exactly the VLAN
// receive offloads that were on, as ethtool sees them, and that Close turns
// them on again and nothing else.
func TestHostVLANOffload(t *testing.T) {
	ns := newHostNS(t, "10.78.0.1/24")
	// veth has both on by default; start with the 802.1ad one off, to
	// see that Close leaves an offload it did not change alone.
	ns.Exec(t, "ethtool", "-K", "eth0", "rx-vlan-stag-hw-parse", "off")
	if got := offloads(t, ns); got["rx-vlan-offload"] != "on" || got["rx-vlan-stag-hw-parse"] != "off" {
		t.Fatalf("before: %v", got)
	}
	var h *Iface
	if err := ns.Do(func() (err error) {
		if h, err = Open("eth0"); err != nil {
			return err
		}
		off, err := h.KeepVLANTags()
		if !slices.Equal(off, []string{"rx-vlan-hw-parse"}) {
			t.Errorf("turned off %v, want [rx-vlan-hw-parse]", off)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got := offloads(t, ns); got["rx-vlan-offload"] != "off" || got["rx-vlan-stag-hw-parse"] != "off" {
		t.Errorf("after KeepVLANTags: %v, want both off", got)
	}
	if err := ns.Do(h.Close); err != nil {
		t.Fatal(err)
	}
	if got := offloads(t, ns); got["rx-vlan-offload"] != "on" || got["rx-vlan-stag-hw-parse"] != "off" {
		t.Errorf("after Close: %v, want rx-vlan-offload on again, the other left off", got)
	}
}
