// Package host prepares the load balancer host for xlb's data path: it
// adds the addresses that clients and backends must reach (VIPs, the
// source address) to the interface as /32s or /128s, turns on forwarding
// for the interface (bpf_fib_lookup requires it, per family), turns off the VLAN receive
// offloads that would hide VLAN tags from XDP, and checks that xlb's source
// ports cannot collide with the kernel's ephemeral ports. An Iface
// remembers what it changed, and Close undoes exactly that.
//
// Every function works in the network namespace of the calling thread.
package host

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Errors returned by the package.
var (
	ErrNoIPv4      = errors.New("interface has no IPv4 address")
	ErrNoIPv6      = errors.New("interface has no global IPv6 address")
	ErrPortOverlap = errors.New("source ports overlap the kernel's ephemeral ports")
)

// Iface is a network interface that xlb prepares. Its methods are safe for
// concurrent use.
type Iface struct {
	name string
	link netlink.Link

	mu         sync.Mutex
	added      []netip.Addr // addresses this Iface added, in order
	restoreFwd [2][]byte    // forwarding's value (IPv4, IPv6) before EnableForwarding changed it; nil when unchanged
	vlanOff    []int        // feature bits KeepVLANTags turned off
	rec        Recorder     // nil: changes are remembered only in memory
}

// Recorder keeps what an Iface changed somewhere that outlives the
// process (xlbd: a pinned map, internal/state), so that the next xlbd, or
// `xlbd cleanup`, can take it back after a crash.
type Recorder interface {
	AddressAdded(a netip.Addr) error
	AddressRemoved(a netip.Addr) error
	// ForwardingChanged records forwarding's value in a family (0 IPv4,
	// 1 IPv6) before it was changed; "" says it was restored.
	ForwardingChanged(fam int, prev string) error
}

// SetRecorder makes the Iface record every change it makes from now on.
func (h *Iface) SetRecorder(r Recorder) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.rec = r
}

// Adopt takes over changes an earlier process made and recorded: the
// addresses it added and forwarding's value, by family (IPv4, IPv6),
// before it changed it ("" if it did not). They are then undone by
// RemoveAddress and Close as if this Iface had made them; an address no
// longer on the interface is dropped.
func (h *Iface) Adopt(added []netip.Addr, prevForwarding [2]string) error {
	addrs, err := netlink.AddrList(h.link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", h.name, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, a := range added {
		present := slices.ContainsFunc(addrs, func(x netlink.Addr) bool {
			ip, ok := netip.AddrFromSlice(x.IP)
			return ok && ip.Unmap() == a
		})
		if !present {
			if h.rec != nil {
				_ = h.rec.AddressRemoved(a)
			}
			continue
		}
		if !slices.Contains(h.added, a) {
			h.added = append(h.added, a)
		}
	}
	for fam, prev := range prevForwarding {
		if prev != "" && h.restoreFwd[fam] == nil {
			h.restoreFwd[fam] = []byte(prev)
		}
	}
	return nil
}

// Owns tells whether a is an address this Iface added (or adopted).
func (h *Iface) Owns(a netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Contains(h.added, a)
}

// OpenIndex finds the interface with index ifindex.
func OpenIndex(ifindex int) (*Iface, error) {
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("find interface %d: %w", ifindex, err)
	}
	return &Iface{name: l.Attrs().Name, link: l}, nil
}

// Open finds the interface name.
func Open(name string) (*Iface, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find interface %s: %w", name, err)
	}
	return &Iface{name: name, link: l}, nil
}

// Name is the interface's name.
func (h *Iface) Name() string { return h.name }

// Index is the interface's index.
func (h *Iface) Index() int { return h.link.Attrs().Index }

// PrimaryIPv4 returns the interface's first IPv4 address that is not a
// secondary one, nor one the Iface added (or adopted: an earlier xlbd's
// VIP is not the host's address).
func (h *Iface) PrimaryIPv4() (netip.Addr, error) {
	return h.primary(netlink.FAMILY_V4, ErrNoIPv4, func(a netlink.Addr) (netip.Addr, bool) {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		return ip, ok && a.Flags&unix.IFA_F_SECONDARY == 0
	})
}

// PrimaryIPv6 returns the interface's first global IPv6 address that is
// neither tentative (duplicate address detection still running) nor
// deprecated, nor one the Iface added (or adopted).
func (h *Iface) PrimaryIPv6() (netip.Addr, error) {
	return h.primary(netlink.FAMILY_V6, ErrNoIPv6, func(a netlink.Addr) (netip.Addr, bool) {
		ip, ok := netip.AddrFromSlice(a.IP)
		return ip, ok && ip.Is6() && !ip.Is4In6() && ip.IsGlobalUnicast() &&
			a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED|unix.IFA_F_DEPRECATED) == 0
	})
}

// primary returns the interface's first address of family that candidate
// takes and the Iface did not add (or adopt), else an error wrapping none.
func (h *Iface) primary(family int, none error, candidate func(netlink.Addr) (netip.Addr, bool)) (netip.Addr, error) {
	addrs, err := netlink.AddrList(h.link, family)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list addresses of %s: %w", h.name, err)
	}
	added := h.Added()
	for _, a := range addrs {
		if ip, ok := candidate(a); ok && !slices.Contains(added, ip) {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%s: %w", h.name, none)
}

// IsLocal tells whether a is an address (IPv4 or IPv6) of any interface of
// the host.
func IsLocal(a netip.Addr) (bool, error) {
	fam := netlink.FAMILY_V4
	if !a.Is4() {
		fam = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(nil, fam)
	if err != nil {
		return false, fmt.Errorf("list addresses: %w", err)
	}
	for _, x := range addrs {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
			return true, nil
		}
	}
	return false, nil
}

// AddAddress adds a to the interface as a /32 (IPv4) or a /128 (IPv6,
// without duplicate address detection, so it is usable at once), so the
// host answers ARP or neighbour solicitations for it, unless a is already
// an address of the host. It tells whether it
// added it; an address it added is removed by RemoveAddress or Close.
func (h *Iface) AddAddress(a netip.Addr) (bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	local, err := IsLocal(a)
	if err != nil || local {
		return false, err
	}
	// Recorded first: a crash between the two leaves a record of an
	// address that is not there, which the next start drops.
	if h.rec != nil {
		if err := h.rec.AddressAdded(a); err != nil {
			return false, err
		}
	}
	if err := netlink.AddrAdd(h.link, hostAddr(a)); err != nil {
		if h.rec != nil {
			_ = h.rec.AddressRemoved(a)
		}
		return false, fmt.Errorf("add address %s to %s: %w", a, h.name, err)
	}
	h.added = append(h.added, a)
	return true, nil
}

// RemoveAddress removes a from the interface if AddAddress added it, and
// tells whether it did. An address the Iface did not add is left alone.
func (h *Iface) RemoveAddress(a netip.Addr) (bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	i := slices.Index(h.added, a)
	if i < 0 {
		return false, nil
	}
	if err := delAddr(h.link, a); err != nil {
		return false, fmt.Errorf("remove address %s from %s: %w", a, h.name, err)
	}
	h.added = slices.Delete(h.added, i, i+1)
	if h.rec != nil {
		if err := h.rec.AddressRemoved(a); err != nil {
			return true, err
		}
	}
	return true, nil
}

// delAddr removes a /32 from l; an address that is gone already is no
// error.
func delAddr(l netlink.Link, a netip.Addr) error {
	err := netlink.AddrDel(l, hostAddr(a))
	if errors.Is(err, unix.EADDRNOTAVAIL) {
		return nil
	}
	return err
}

// Added lists the addresses the Iface added and has not removed.
func (h *Iface) Added() []netip.Addr {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.added)
}

// EnableForwarding turns on forwarding for the interface in the families
// given (net.ipv4.conf.<iface>.forwarding, net.ipv6.conf.<iface>.forwarding),
// which bpf_fib_lookup requires. Close restores the values it found.
// IPv6 forwarding on an interface also makes the kernel ignore router
// advertisements there unless accept_ra is 2.
func (h *Iface) EnableForwarding(ipv4, ipv6 bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for fam, on := range [2]bool{ipv4, ipv6} {
		if !on {
			continue
		}
		path := h.forwardingPath(fam)
		old, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("read forwarding of %s: %w", h.name, err)
		}
		if strings.TrimSpace(string(old)) == "1" {
			continue
		}
		if h.rec != nil && h.restoreFwd[fam] == nil {
			if err := h.rec.ForwardingChanged(fam, strings.TrimSpace(string(old))); err != nil {
				return err
			}
		}
		if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding on %s: %w", h.name, err)
		}
		if h.restoreFwd[fam] == nil {
			h.restoreFwd[fam] = old
		}
	}
	return nil
}

// forwardingPath is the interface's forwarding switch: fam 0 IPv4, 1 IPv6.
func (h *Iface) forwardingPath(fam int) string {
	return "/proc/sys/net/ipv" + [2]string{"4", "6"}[fam] + "/conf/" + h.name + "/forwarding"
}

// Close removes every address the Iface added, restores forwarding and
// turns on again the VLAN receive offloads KeepVLANTags turned off.
func (h *Iface) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var errs []error
	for _, a := range h.added {
		if err := delAddr(h.link, a); err != nil {
			errs = append(errs, fmt.Errorf("remove address %s from %s: %w", a, h.name, err))
		} else if h.rec != nil {
			errs = append(errs, h.rec.AddressRemoved(a))
		}
	}
	h.added = nil
	for fam, old := range h.restoreFwd {
		if old == nil {
			continue
		}
		if err := os.WriteFile(h.forwardingPath(fam), old, 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore forwarding on %s: %w", h.name, err))
		} else if h.rec != nil {
			errs = append(errs, h.rec.ForwardingChanged(fam, ""))
		}
		h.restoreFwd[fam] = nil
	}
	if err := h.restoreVLAN(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Forwarding reads the interface's forwarding sysctl of a family (0
// IPv4, 1 IPv6).
func (h *Iface) Forwarding(fam int) (string, error) {
	b, err := os.ReadFile(h.forwardingPath(fam))
	if err != nil {
		return "", fmt.Errorf("read forwarding of %s: %w", h.name, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// XDPMode is the mode of the XDP program attached to the interface:
// "native", "generic", "offload", or "" when there is none.
func (h *Iface) XDPMode() string {
	l, err := netlink.LinkByIndex(h.Index())
	if err != nil || l.Attrs().Xdp == nil || !l.Attrs().Xdp.Attached {
		return ""
	}
	switch l.Attrs().Xdp.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		return "native"
	case nl.XDP_ATTACHED_SKB:
		return "generic"
	case nl.XDP_ATTACHED_HW:
		return "offload"
	}
	return "unknown"
}

func hostAddr(a netip.Addr) *netlink.Addr {
	if a.Is4() {
		return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	}
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}
}

// AttachedXDP describes the XDP program attached to the interface, such
// as "id 42, name xdp_pass, generic mode", or returns "" when there is
// none. It is meant for error messages.
func (h *Iface) AttachedXDP() string {
	l, err := netlink.LinkByIndex(h.Index())
	if err != nil {
		return ""
	}
	x := l.Attrs().Xdp
	if x == nil || !x.Attached {
		return ""
	}
	desc := fmt.Sprintf("id %d", x.ProgId)
	if prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(x.ProgId)); err == nil {
		if info, err := prog.Info(); err == nil && info.Name != "" {
			desc += ", name " + info.Name
		}
		prog.Close()
	}
	switch x.AttachMode {
	case nl.XDP_ATTACHED_DRV:
		desc += ", native mode"
	case nl.XDP_ATTACHED_SKB:
		desc += ", generic mode"
	case nl.XDP_ATTACHED_HW:
		desc += ", offloaded"
	}
	return desc
}

// EphemeralPorts reads the kernel's ephemeral port range of the calling
// thread's network namespace (net.ipv4.ip_local_port_range, which IPv6
// sockets use too).
func EphemeralPorts() (lo, hi uint16, err error) {
	raw, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, fmt.Errorf("read ephemeral port range: %w", err)
	}
	f := strings.Fields(string(raw))
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("read ephemeral port range: unexpected %q", raw)
	}
	l, err1 := strconv.ParseUint(f[0], 10, 16)
	h, err2 := strconv.ParseUint(f[1], 10, 16)
	if err1 != nil || err2 != nil || l == 0 || l > h {
		return 0, 0, fmt.Errorf("read ephemeral port range: unexpected %q", raw)
	}
	return uint16(l), uint16(h), nil
}

// CheckPortRange refuses source ports lo-hi on src when src is a local
// address and the range overlaps the kernel's ephemeral ports: the replies
// to the host's own connections from src would be taken for
// load-balanced ones. A src that is not (yet) local cannot collide.
func CheckPortRange(src netip.Addr, lo, hi uint16) error {
	local, err := IsLocal(src)
	if err != nil || !local {
		return err
	}
	elo, ehi, err := EphemeralPorts()
	if err != nil {
		return err
	}
	if lo <= ehi && hi >= elo {
		return fmt.Errorf("%w: source-ports %d-%d on %s, ephemeral %d-%d (net.ipv4.ip_local_port_range)", ErrPortOverlap, lo, hi, src, elo, ehi)
	}
	return nil
}
