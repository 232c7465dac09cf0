package neigh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrAddressInUse is returned by Probe when another host uses the address.
var ErrAddressInUse = errors.New("address in use by another host")

// Probe timing: probes go out probeInterval apart, probeCount of them,
// and answers are awaited until probeWait after the first.
const (
	probeCount    = 3
	probeInterval = 100 * time.Millisecond
	probeWait     = 400 * time.Millisecond
)

// Probe checks, as RFC 5227's duplicate address detection does, that no
// other host on the link of interface ifindex uses address a: it sends ARP
// probes (sender address 0.0.0.0, so that no host learns anything from
// them) and listens for an ARP packet whose sender address is a from
// another MAC address. It returns an error wrapping ErrAddressInUse, which
// names the MAC that answered, or nil after about 400 ms of silence. It
// works in the calling thread's network namespace. An IPv6 address is not
// probed (nil at once): neighbour-discovery DAD is not implemented.
func Probe(ctx context.Context, ifindex int, a netip.Addr) error {
	if !a.Is4() {
		return nil
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("find interface %d: %w", ifindex, err)
	}
	mac := l.Attrs().HardwareAddr
	if len(mac) != 6 {
		return fmt.Errorf("interface %s has no Ethernet address", l.Attrs().Name)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return fmt.Errorf("open arp socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return fmt.Errorf("bind arp socket to %s: %w", l.Attrs().Name, err)
	}
	f := os.NewFile(uintptr(fd), "arp-probe")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	probe := arpRequest(mac, netip.Addr{}, a)
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifindex, Halen: 6}
	copy(to.Addr[:], broadcast)
	start := time.Now()
	deadline := start.Add(probeWait)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	sent := 0
	buf := make([]byte, 128)
	for {
		if sent < probeCount && !time.Now().Before(start.Add(time.Duration(sent)*probeInterval)) {
			var serr error
			if err := rc.Write(func(fd uintptr) bool {
				serr = unix.Sendto(int(fd), probe[:], 0, to)
				return !errors.Is(serr, unix.EAGAIN)
			}); err != nil || serr != nil {
				return fmt.Errorf("send arp probe for %s: %w", a, errors.Join(err, serr))
			}
			sent++
		}
		next := deadline
		if t := start.Add(time.Duration(sent) * probeInterval); sent < probeCount && t.Before(next) {
			next = t
		}
		if !time.Now().Before(deadline) || ctx.Err() != nil {
			return ctx.Err()
		}
		if err := f.SetReadDeadline(next); err != nil {
			return err
		}
		n, err := f.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read arp: %w", err)
		}
		b := buf[:n]
		if !isIPv4ARP(b) {
			continue
		}
		sha, spa := net.HardwareAddr(b[8:14]), netip.AddrFrom4([4]byte(b[14:18]))
		if spa == a && sha.String() != mac.String() {
			return fmt.Errorf("%w: %s answered for %s on %s", ErrAddressInUse, sha, a, l.Attrs().Name)
		}
	}
}
