package testnet

import (
	"slices"

	"github.com/vishvananda/netlink"
)

// AddVeth creates a veth pair name/peer inside the namespace, sets both
// up and gives name the address prefix (such as "10.77.0.1/24"; none if
// empty). The pair goes with the namespace.
func (ns *NS) AddVeth(t TB, name, peer, prefix string) {
	t.Helper()
	err := ns.Do(func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: peer}); err != nil {
			return err
		}
		for _, n := range []string{name, peer} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		if prefix == "" {
			return nil
		}
		a, err := netlink.ParseAddr(prefix)
		if err != nil {
			return err
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.AddrAdd(l, a)
	})
	if err != nil {
		t.Fatalf("add veth %s/%s in %s: %v", name, peer, ns.Name, err)
	}
}

// IPv4Addrs lists the IPv4 addresses of iface inside the namespace as
// prefixes ("10.77.0.1/24"), sorted.
func (ns *NS) IPv4Addrs(t TB, iface string) []string {
	t.Helper()
	var out []string
	err := ns.Do(func() error {
		l, err := netlink.LinkByName(iface)
		if err != nil {
			return err
		}
		as, err := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range as {
			out = append(out, a.IPNet.String())
		}
		return err
	})
	if err != nil {
		t.Fatalf("list addresses of %s in %s: %v", iface, ns.Name, err)
	}
	slices.Sort(out)
	return out
}

// XDPProgram is the id of the XDP program attached to iface inside the
// namespace, 0 when there is none.
func (ns *NS) XDPProgram(t TB, iface string) uint32 {
	t.Helper()
	var id uint32
	err := ns.Do(func() error {
		l, err := netlink.LinkByName(iface)
		if err != nil {
			return err
		}
		if x := l.Attrs().Xdp; x != nil && x.Attached {
			id = x.ProgId
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read the xdp program of %s in %s: %v", iface, ns.Name, err)
	}
	return id
}
