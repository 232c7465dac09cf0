// Package preflight checks what a configuration asks of this host before
// xlbd loads, pins or attaches anything: that the interface exists and is
// not the loopback interface, that the default source addresses can be
// found (the primary IPv4 address, and the primary global IPv6 address when
// IPv6 services need one), that the source ports cannot collide with the kernel's ephemeral
// ports on a source address of the host, that no VIP's port is among the
// source ports of a source address, and that no backend is the load
// balancer itself. Its errors name the configuration
// key, as config.Validate's do; xlbd exits with status 2 on them.
//
// It works in the network namespace of the calling thread and changes
// nothing.
package preflight

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/user"
	"slices"
	"strconv"

	"github.com/vishvananda/netlink"

	"github.com/xlb-project/xlb/internal/config"
	"github.com/xlb-project/xlb/internal/host"
)

// Check looks at the host for cfg and returns the first problem, as
// "key: problem".
func Check(cfg *config.Config) error {
	link, err := netlink.LinkByName(cfg.Iface)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return fmt.Errorf("iface: no interface %q on this host (`ip -br link` lists them)", cfg.Iface)
		}
		return fmt.Errorf("iface: find %s: %w", cfg.Iface, err)
	}
	if link.Attrs().Flags&net.FlagLoopback != 0 {
		return fmt.Errorf("iface: %s is the loopback interface: xlb attaches to the interface that clients' packets arrive on", cfg.Iface)
	}
	sources := cfg.AllSourceAddresses()
	own := cfg.SourceAddresses.Addrs()
	needV6 := cfg.HasIPv6() && !slices.ContainsFunc(own, func(a netip.Addr) bool { return !a.Is4() })
	if !slices.ContainsFunc(own, netip.Addr.Is4) || needV6 {
		h, err := host.Open(cfg.Iface)
		if err != nil {
			return fmt.Errorf("iface: %w", err)
		}
		if !slices.ContainsFunc(own, netip.Addr.Is4) {
			primary, err := h.PrimaryIPv4()
			if err != nil {
				if errors.Is(err, host.ErrNoIPv4) {
					return fmt.Errorf("iface: %s has no IPv4 address: give it one, or set an IPv4 address in source-addresses", cfg.Iface)
				}
				return fmt.Errorf("iface: %w", err)
			}
			sources = append([]netip.Addr{primary}, sources...)
		}
		if needV6 {
			primary, err := h.PrimaryIPv6()
			if err != nil {
				if errors.Is(err, host.ErrNoIPv6) {
					return fmt.Errorf("iface: %s has no global IPv6 address (or it is still tentative) for the IPv6 services: give it one, or set an IPv6 address in source-addresses", cfg.Iface)
				}
				return fmt.Errorf("iface: %w", err)
			}
			sources = append(sources, primary)
		}
	}
	local, err := localAddrs()
	if err != nil {
		return err
	}
	anyLocal := slices.ContainsFunc(sources, func(a netip.Addr) bool { return local[a] })
	ports := cfg.SourcePorts.Resolve(anyLocal)
	for _, a := range sources {
		if !local[a] {
			continue
		}
		if err := host.CheckPortRange(a, ports.Lo, ports.Hi); err != nil {
			if errors.Is(err, host.ErrPortOverlap) {
				return fmt.Errorf("source-ports: %w: choose a range outside it, or move the kernel's range", err)
			}
			return fmt.Errorf("source-ports: %w", err)
		}
	}
	vips := map[netip.Addr]bool{}
	for i, s := range cfg.Services {
		vips[s.VIP.Addr()] = true
		if p := s.VIP.Port(); slices.Contains(sources, s.VIP.Addr()) && p >= ports.Lo && p <= ports.Hi {
			return fmt.Errorf("services[%d].vip: port %d of the source address %s is inside source-ports %s, where backends' replies arrive: give the service another port, or move source-ports", i, p, s.VIP.Addr(), ports)
		}
	}
	for i, s := range cfg.Services {
		for j, b := range s.Backends {
			a := b.Address.Addr()
			switch {
			case local[a]:
				return fmt.Errorf("services[%d].backends[%d]: %s is an address of this host: xlb sends connections out of %s and cannot reach a backend on the load balancer itself", i, j, b.Address, cfg.Iface)
			case vips[a]:
				return fmt.Errorf("services[%d].backends[%d]: %s is a VIP's address, which xlbd adds to this host: xlb cannot reach a backend on the load balancer itself", i, j, b.Address)
			}
		}
	}
	return nil
}

// localAddrs returns every address, IPv4 and IPv6, of the host's
// interfaces.
func localAddrs() (map[netip.Addr]bool, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list the host's addresses: %w", err)
	}
	out := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

// SocketGroup resolves socket-group, a group name or number, to a gid;
// -1 for "" (the socket is root's only).
func SocketGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if gid, err := strconv.ParseUint(name, 10, 31); err == nil {
		return int(gid), nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("no group %q on this host (getent group lists them)", name)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("group %q has gid %q", name, g.Gid)
	}
	return gid, nil
}
