package testnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultSubnet is the LAN subnet when LANOptions.Subnet is zero.
var DefaultSubnet = netip.MustParsePrefix("10.199.0.0/24")

// Subnet6 is every LAN's IPv6 subnet: host i has address i+2 in it, as in
// the IPv4 subnet, with duplicate address detection off so that it is
// usable at once.
var Subnet6 = netip.MustParsePrefix("fd00:199::/64")

const (
	// BridgeName is the bridge in the switch namespace.
	BridgeName = "br0"
	// HostIface is the name of every host's interface.
	HostIface = "eth0"
)

// LANOptions describes a LAN. The zero value of every field is the usual
// setting for end-to-end tests.
type LANOptions struct {
	// Subnet is an IPv4 prefix, DefaultSubnet when zero. Host i gets the
	// address i+2 in it (.2, .3, ...).
	Subnet netip.Prefix
	// Hosts are the host names, in order; at least one, unique.
	Hosts []string
	// NativePeerXDP attaches an XDP_PASS program in native mode to every
	// bridge-side veth, so that frames a host's native XDP program sends
	// with XDP_TX or redirects are delivered: a native-mode veth drops them
	// unless its peer has an XDP program.
	NativePeerXDP bool
	// KeepTxOffload leaves TX checksum offload on the hosts' interfaces on.
	// By default it is turned off (`ethtool -K eth0 tx off`), so that hosts
	// send full checksums as on a real wire; with offload on, veth sends
	// partial checksums, which hide or break checksum rewrites in XDP.
	KeepTxOffload bool
}

// LAN is a switch namespace holding the bridge br0 and one veth pair per
// host: eth0 in the host's namespace, the peer in the switch enslaved to br0.
type LAN struct {
	Switch *NS
	Subnet netip.Prefix
	Hosts  []*Host // in LANOptions.Hosts order

	t           TB
	opts        LANOptions
	bridgeIndex int
	peerProg    *ebpf.Program        // the XDP_PASS program of NativePeerXDP
	peerLinks   map[string]link.Link // the bridge-side XDP attachments, by host name
}

// Host is one machine on a LAN.
type Host struct {
	Name      string
	NS        *NS
	IP        netip.Addr
	IP6       netip.Addr // in Subnet6
	Iface     string     // HostIface
	Index     int        // ifindex of Iface inside NS
	MAC       net.HardwareAddr
	PeerIface string // the bridge-side veth, in the switch namespace
	PeerIndex int    // ifindex of PeerIface inside the switch namespace
}

// NewLAN builds the LAN; cleanup detaches the XDP programs and deletes the
// links and namespaces.
func NewLAN(t TB, opts LANOptions) *LAN {
	t.Helper()
	subnet := opts.Subnet
	if !subnet.IsValid() {
		subnet = DefaultSubnet
	}
	subnet = subnet.Masked()
	if !subnet.Addr().Is4() || subnet.Bits() > 30 {
		t.Fatalf("new lan: subnet %v is not an IPv4 prefix of at most 30 bits", subnet)
	}
	if len(opts.Hosts) == 0 {
		t.Fatal("new lan: no hosts")
	}
	if size := 1 << (32 - subnet.Bits()); len(opts.Hosts)+3 > size {
		t.Fatalf("new lan: %d hosts do not fit in %v", len(opts.Hosts), subnet)
	}
	lan := &LAN{Subnet: subnet, t: t, opts: opts}
	seen := map[string]bool{}
	for _, name := range opts.Hosts {
		if seen[name] {
			t.Fatalf("new lan: host %q twice", name)
		}
		seen[name] = true
	}

	// Namespaces first, so that their deletion runs after every cleanup
	// registered below.
	lan.Switch = NewNS(t, "switch")
	for i, name := range opts.Hosts {
		lan.Hosts = append(lan.Hosts, &Host{
			Name:      name,
			NS:        NewNS(t, name),
			IP:        lan.AddrInSubnet(i + 2),
			IP6:       lan.AddrInSubnet6(i + 2),
			Iface:     HostIface,
			PeerIface: fmt.Sprintf("%.15s", fmt.Sprintf("h%d-%s", i, name)),
		})
	}

	err := lan.Switch.Do(func() error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge %s: %w", BridgeName, err)
		}
		l, err := netlink.LinkByName(BridgeName)
		if err != nil {
			return err
		}
		lan.bridgeIndex = l.Attrs().Index
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", BridgeName, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("new lan: %v", err)
	}
	t.Cleanup(func() { lan.deleteLink(BridgeName) })

	if opts.NativePeerXDP {
		prog, err := newPassProgram()
		if err != nil {
			t.Fatalf("new lan: %v", err)
		}
		t.Cleanup(func() { prog.Close() })
		lan.peerProg = prog
	}
	for _, h := range lan.Hosts {
		lan.addHost(h)
	}
	return lan
}

// ReplaceLink re-creates a host's link, as when a backend's container is
// re-created: the old veth pair goes, and a new one with a new MAC address
// and the host's same IP address takes its place. The host's listening
// sockets stay open and serve on the new link.
func (lan *LAN) ReplaceLink(h *Host) {
	lan.t.Helper()
	lan.RemoveLink(h)
	lan.addHost(h)
}

// RemoveLink deletes a host's link: the host vanishes from the LAN (its
// namespace and sockets stay, unreachable).
func (lan *LAN) RemoveLink(h *Host) {
	lan.t.Helper()
	lan.deleteLink(h.PeerIface)
}

// addHost creates h's veth pair, addresses it and sets it up.
func (lan *LAN) addHost(h *Host) {
	t := lan.t
	t.Helper()
	txOffloadOff := !lan.opts.KeepTxOffload
	err := lan.Switch.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: h.PeerIface, MasterIndex: lan.bridgeIndex},
			PeerName:      HostIface,
			PeerNamespace: netlink.NsFd(int(h.NS.handle)),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", h.PeerIface, err)
		}
		l, err := netlink.LinkByName(h.PeerIface)
		if err != nil {
			return err
		}
		h.PeerIndex = l.Attrs().Index
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", h.PeerIface, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("new lan: %v", err)
	}
	// Deleting one end of a veth pair deletes both.
	t.Cleanup(func() { lan.deleteLink(h.PeerIface) })

	err = h.NS.Do(func() error {
		l, err := netlink.LinkByName(HostIface)
		if err != nil {
			return err
		}
		h.Index = l.Attrs().Index
		h.MAC = l.Attrs().HardwareAddr
		addr := &netlink.Addr{IPNet: &net.IPNet{
			IP:   h.IP.AsSlice(),
			Mask: net.CIDRMask(lan.Subnet.Bits(), 32),
		}}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add %v to %s: %w", addr, HostIface, err)
		}
		addr6 := &netlink.Addr{IPNet: &net.IPNet{IP: h.IP6.AsSlice(), Mask: net.CIDRMask(Subnet6.Bits(), 128)}, Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrAdd(l, addr6); err != nil {
			return fmt.Errorf("add %v to %s: %w", addr6, HostIface, err)
		}
		if txOffloadOff {
			off := false
			if _, err := ethtoolTxChecksum(HostIface, &off); err != nil {
				return err
			}
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", HostIface, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("new lan: host %s: %v", h.Name, err)
	}
	if lan.peerProg != nil {
		lan.attachPeerXDP(h)
	}
}

// attachPeerXDP attaches the XDP_PASS program in native mode to h's
// bridge-side veth.
func (lan *LAN) attachPeerXDP(h *Host) {
	t := lan.t
	t.Helper()
	var l link.Link
	index := h.PeerIndex
	err := lan.Switch.Do(func() (err error) {
		l, err = link.AttachXDP(link.XDPOptions{
			Program:   lan.peerProg,
			Interface: index,
			Flags:     link.XDPDriverMode,
		})
		return err
	})
	if err != nil {
		t.Fatalf("new lan: attach xdp pass to %s: %v", h.PeerIface, err)
	}
	if lan.peerLinks == nil {
		lan.peerLinks = make(map[string]link.Link)
	}
	lan.peerLinks[h.Name] = l
	t.Cleanup(func() {
		// A link re-created by ReplaceLink took the old one's program
		// with it: nothing to detach then.
		if err := l.Close(); err != nil && !errors.Is(err, unix.ENODEV) && !errors.Is(err, unix.ENOENT) {
			t.Errorf("detach xdp from %s: %v", h.PeerIface, err)
		}
	})
}

// deleteLink deletes a link of the switch namespace, if it is there (a
// link that RemoveLink already deleted is not an error).
func (lan *LAN) deleteLink(name string) {
	err := lan.Switch.Do(func() error {
		l, err := netlink.LinkByName(name)
		if _, ok := err.(netlink.LinkNotFoundError); ok {
			return nil
		}
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		lan.t.Errorf("delete link %s in %s: %v", name, lan.Switch.Name, err)
	}
}

// Lossy makes host h's link drop percent per cent of the frames in each
// direction, at random, as `tc netem loss` would (this kernel has no
// netem): an XDP program on the bridge-side veth drops what h sends, one
// on h's interface (generic mode) what it receives. Cleanup restores the
// link.
func (lan *LAN) Lossy(h *Host, percent int) {
	t := lan.t
	t.Helper()
	prog, err := newLossProgram(percent)
	if err != nil {
		t.Fatalf("lossy link: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	if l, ok := lan.peerLinks[h.Name]; ok {
		if err := l.Update(prog); err != nil {
			t.Fatalf("lossy link: replace xdp on %s: %v", h.PeerIface, err)
		}
		pass, err := newPassProgram()
		if err != nil {
			t.Fatalf("lossy link: %v", err)
		}
		t.Cleanup(func() {
			if err := l.Update(pass); err != nil {
				t.Errorf("restore xdp pass on %s: %v", h.PeerIface, err)
			}
			pass.Close()
		})
	} else {
		lan.attach(t, lan.Switch, prog, h.PeerIndex, h.PeerIface, link.XDPDriverMode)
	}
	lan.attach(t, h.NS, prog, h.Index, h.Iface+" of "+h.Name, link.XDPGenericMode)
}

// attach attaches prog to an interface of ns until cleanup.
func (lan *LAN) attach(t TB, ns *NS, prog *ebpf.Program, ifindex int, name string, mode link.XDPAttachFlags) {
	t.Helper()
	var l link.Link
	err := ns.Do(func() (err error) {
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: ifindex, Flags: mode})
		return err
	})
	if err != nil {
		t.Fatalf("attach xdp to %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("detach xdp from %s: %v", name, err)
		}
	})
}

// Host returns the named host, failing the test if there is none.
func (lan *LAN) Host(name string) *Host {
	lan.t.Helper()
	for _, h := range lan.Hosts {
		if h.Name == name {
			return h
		}
	}
	lan.t.Fatalf("lan has no host %q", name)
	return nil
}

// AddrInSubnet returns address i of the subnet (0 is the network address),
// for example a VIP that no interface carries. It fails the test when i is
// outside the subnet. Hosts hold addresses 2 to len(Hosts)+1.
func (lan *LAN) AddrInSubnet(i int) netip.Addr {
	lan.t.Helper()
	base := lan.Subnet.Addr().As4()
	n := binary.BigEndian.Uint32(base[:]) + uint32(i)
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	a := netip.AddrFrom4(b)
	if i < 0 || !lan.Subnet.Contains(a) {
		lan.t.Fatalf("address %d is outside %v", i, lan.Subnet)
	}
	return a
}

// AddrInSubnet6 returns address i of Subnet6, as AddrInSubnet does in the
// IPv4 subnet.
func (lan *LAN) AddrInSubnet6(i int) netip.Addr {
	lan.t.Helper()
	if i < 0 || i > 0xffff {
		lan.t.Fatalf("address %d is outside what AddrInSubnet6 gives", i)
	}
	b := Subnet6.Addr().As16()
	binary.BigEndian.PutUint16(b[14:], uint16(i))
	return netip.AddrFrom16(b)
}

// Link connects two namespaces with a veth pair of the given MTU, named
// name in a and name+"p" in b, addressed aAddr and bAddr (prefixes), up,
// with TX checksum offload off at both ends as LAN hosts have it. The
// pair goes with a's namespace.
func Link(t TB, a, b *NS, name string, mtu int, aAddr, bAddr netip.Prefix) {
	t.Helper()
	peer := name + "p"
	err := a.Do(func() error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: name, MTU: mtu},
			PeerName:      peer,
			PeerNamespace: netlink.NsFd(int(b.handle)),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	for _, end := range []struct {
		ns   *NS
		name string
		addr netip.Prefix
	}{{a, name, aAddr}, {b, peer, bAddr}} {
		err := end.ns.Do(func() error {
			l, err := netlink.LinkByName(end.name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetMTU(l, mtu); err != nil {
				return fmt.Errorf("set mtu of %s: %w", end.name, err)
			}
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: end.addr.Addr().AsSlice(), Mask: net.CIDRMask(end.addr.Bits(), end.addr.Addr().BitLen())}}
			if end.addr.Addr().Is6() {
				addr.Flags = unix.IFA_F_NODAD
			}
			if err := netlink.AddrAdd(l, addr); err != nil {
				return fmt.Errorf("add %v to %s: %w", addr, end.name, err)
			}
			off := false
			if _, err := ethtoolTxChecksum(end.name, &off); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
		if err != nil {
			t.Fatalf("link %s: %v", name, err)
		}
	}
}
