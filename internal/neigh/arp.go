package neigh

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
)

// linkSocket is a packet socket on one interface: for ARP, or for the
// neighbour discovery messages of IPv6 (ndp.go).
type linkSocket struct {
	f       *os.File
	ifindex int
	mac     net.HardwareAddr
	ll      netip.Addr // the interface's IPv6 link-local address, if any (NDP)
}

// sockKey names a Keeper's socket: its interface and family.
type sockKey struct {
	ifindex int
	v6      bool
}

const arpLen = 28 // an IPv4-over-Ethernet ARP packet, after the Ethernet header

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// arpRequest is an ARP request from sha (hardware) and spa (protocol
// address; the zero address for an RFC 5227 probe) for tpa.
func arpRequest(sha net.HardwareAddr, spa, tpa netip.Addr) [arpLen]byte {
	var b [arpLen]byte
	binary.BigEndian.PutUint16(b[0:], 1)      // hardware type: Ethernet
	binary.BigEndian.PutUint16(b[2:], 0x0800) // protocol type: IPv4
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], 1) // request
	copy(b[8:14], sha)
	if spa.Is4() {
		src := spa.As4()
		copy(b[14:18], src[:])
	}
	// target hardware address: zero
	dst := tpa.As4()
	copy(b[24:28], dst[:])
	return b
}

// isIPv4ARP tells whether b is an IPv4-over-Ethernet ARP packet.
func isIPv4ARP(b []byte) bool {
	return len(b) >= arpLen && binary.BigEndian.Uint16(b[0:]) == 1 && binary.BigEndian.Uint16(b[2:]) == 0x0800 && b[4] == 6 && b[5] == 4
}

// send sends probe p, opening the interface's socket (and starting its
// reader in g) on first use.
func (k *Keeper) send(ctx context.Context, g *errgroup.Group, p probe) error {
	s, err := k.socket(ctx, g, sockKey{p.key.ifindex, p.key.ip.Is6()})
	if err != nil {
		return err
	}
	if p.key.ip.Is6() {
		return sendNS(s, p)
	}
	if !p.src.Is4() {
		return fmt.Errorf("no IPv4 source address towards %s", p.key.ip)
	}
	dst := p.dst
	if dst == nil {
		dst = broadcast
	}
	b := arpRequest(s.mac, p.src, p.key.ip)
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: s.ifindex, Halen: 6}
	copy(to.Addr[:], dst)
	return s.sendto(b[:], to)
}

// sendto sends b from the socket.
func (s *linkSocket) sendto(b []byte, to *unix.SockaddrLinklayer) error {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, 0, to)
		return !errors.Is(serr, unix.EAGAIN)
	}); err != nil {
		return err
	}
	return serr
}

// socket returns the ARP or NDP socket of an interface, opening it in the
// Keeper's namespace and starting its reader in g on first use.
func (k *Keeper) socket(ctx context.Context, g *errgroup.Group, key sockKey) (*linkSocket, error) {
	k.mu.Lock()
	s := k.socks[key]
	k.mu.Unlock()
	if s != nil {
		return s, nil
	}
	ifindex := key.ifindex
	l, err := k.nl.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("find interface %d: %w", ifindex, err)
	}
	mac := l.Attrs().HardwareAddr
	if len(mac) != 6 {
		return nil, fmt.Errorf("interface %s has no Ethernet address", l.Attrs().Name)
	}
	proto, kind := uint16(unix.ETH_P_ARP), "arp"
	if key.v6 {
		proto, kind = unix.ETH_P_IPV6, "ndp"
	}
	var fd int
	err = k.inNetNS(func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(proto)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open %s socket: %w", kind, err)
	}
	if key.v6 {
		// Only neighbour solicitations and advertisements, not every
		// IPv6 packet the interface hands the host.
		if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &ndpFilter); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("filter ndp socket: %w", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s socket to %s: %w", kind, l.Attrs().Name, err)
	}
	s = &linkSocket{f: os.NewFile(uintptr(fd), kind+"-"+l.Attrs().Name), ifindex: ifindex, mac: mac}
	if key.v6 {
		s.ll = k.linkLocal(l)
	}
	k.mu.Lock()
	k.socks[key] = s
	k.mu.Unlock()
	g.Go(func() error {
		if key.v6 {
			k.readNDP(ctx, s)
		} else {
			k.read(ctx, s)
		}
		return nil
	})
	return s, nil
}

// read takes the ARP packets the socket receives until it is closed, and
// records those of next hops.
func (k *Keeper) read(ctx context.Context, s *linkSocket) {
	s.receive(ctx, 128, func(b []byte, _ *unix.SockaddrLinklayer) {
		if isIPv4ARP(b) {
			k.answered(s.ifindex, netip.AddrFrom4([4]byte(b[14:18])), net.HardwareAddr(b[8:14]))
		}
	})
}

// receive hands fn each frame of at most size bytes that the socket
// receives from the link (not those the host sends), with its link-layer
// source, until ctx ends or the socket is closed.
func (s *linkSocket) receive(ctx context.Context, size int, fn func(b []byte, from *unix.SockaddrLinklayer)) {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return
	}
	buf := make([]byte, size)
	for ctx.Err() == nil {
		var n int
		var from unix.Sockaddr
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return !errors.Is(rerr, unix.EAGAIN)
		})
		if err != nil {
			return // closed
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if rerr != nil || !ok || ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		fn(buf[:n], ll)
	}
}

// closeSockets closes every socket, which ends their readers.
func (k *Keeper) closeSockets() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i, s := range k.socks {
		s.f.Close()
		delete(k.socks, i)
	}
}

// inNetNS runs fn on a thread in the Keeper's namespace.
func (k *Keeper) inNetNS(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("open current netns: %w", err)
			return // the thread stays locked and is discarded
		}
		defer orig.Close()
		if orig.Equal(k.ns) {
			// Already there: setns(2) would need CAP_SYS_ADMIN for nothing.
			err = fn()
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		if err := netns.Set(k.ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		err = fn()
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("leave netns: %w", serr))
			return // the thread stays locked and is discarded
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
