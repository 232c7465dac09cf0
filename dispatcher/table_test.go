package dispatcher

import (
	"net/netip"
	"reflect"
	"testing"
)

// TestTableHeads checks that the generated heads (connHead, rconnHead)
// lie over the first fields of both families' generated slot types, field
// by field: the daemon reads and writes slots through them.
func TestTableHeads(t *testing.T) {
	for _, c := range []struct {
		head  any
		slots []any
	}{
		{connHead{}, []any{xlbXlbConn{}, xlbXlbConn6{}}},
		{rconnHead{}, []any{xlbXlbRconn{}, xlbXlbRconn6{}}},
	} {
		h := reflect.TypeOf(c.head)
		for _, s := range c.slots {
			st := reflect.TypeOf(s)
			for i := range h.NumField() {
				hf := h.Field(i)
				sf, ok := st.FieldByName(hf.Name)
				if !ok || sf.Offset != hf.Offset || sf.Type.Size() != hf.Type.Size() {
					t.Errorf("%s.%s at %d (%d bytes); %s has it at %d (%d bytes, found %v)", h.Name(), hf.Name, hf.Offset,
						hf.Type.Size(), st.Name(), sf.Offset, sf.Type.Size(), ok)
				}
			}
		}
	}
	if layout4.connSize != 64 || layout6.connSize != 128 || layout4.portSize != 64 || layout6.portSize != 128 {
		t.Errorf("slot sizes %d/%d, ways %d/%d; want 64/128 and 64/128", layout4.connSize, layout6.connSize, layout4.portSize, layout6.portSize)
	}
}

// TestFlowHashFamilies: the family-independent flow hash agrees with the
// IPv4 mirror of flow_hash() for IPv4 keys, and tells IPv6 keys that
// differ in any word apart.
func TestFlowHashFamilies(t *testing.T) {
	cl, to := netip.MustParseAddrPort("10.1.2.3:40000"), netip.MustParseAddrPort("10.0.0.10:80")
	k := keyOf(cl, to, TCP)
	f := flowOf(cl, to)
	if k.hash() != flowHash(&f) {
		t.Errorf("flowKey.hash %#x, flowHash %#x", k.hash(), flowHash(&f))
	}
	base := netip.MustParseAddr("2001:db8::1")
	seen := map[uint32]netip.Addr{}
	for i := range 16 {
		b := base.As16()
		b[i] ^= 0x80
		a := netip.AddrFrom16(b)
		k6 := keyOf(netip.AddrPortFrom(a, 40000), netip.MustParseAddrPort("[2001:db8::10]:80"), TCP)
		if o, ok := seen[k6.hash()]; ok {
			t.Errorf("%s and %s hash alike", a, o)
		}
		seen[k6.hash()] = a
	}
}
