package neigh

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/xlb-project/xlb/internal/testnet"
)

// TestProbe: an address another host of the LAN holds is found in use,
// naming that host's MAC; a free one is not, after about 400 ms.
func TestProbe(t *testing.T) {
	testnet.RequirePrivileged(t)
	lan := testnet.NewLAN(t, testnet.LANOptions{Hosts: []string{"lb", "other"}})
	lb, other := lan.Host("lb"), lan.Host("other")
	held, free := lan.AddrInSubnet(100), lan.AddrInSubnet(101)
	other.NS.Exec(t, "ip", "addr", "add", held.String()+"/32", "dev", "eth0")
	err := lb.NS.Do(func() error {
		err := Probe(context.Background(), lb.Index, held)
		if !errors.Is(err, ErrAddressInUse) || !strings.Contains(err.Error(), other.MAC.String()) {
			t.Errorf("probe of %s, held by %s: %v", held, other.MAC, err)
		}
		start := time.Now()
		if err := Probe(context.Background(), lb.Index, free); err != nil {
			t.Errorf("probe of free %s: %v", free, err)
		}
		if took := time.Since(start); took < probeWait || took > probeWait+500*time.Millisecond {
			t.Errorf("probe of a free address took %v, want about %v", took, probeWait)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
