// Package vipfilter keeps the host's own services off the VIPs: a packet
// to a VIP on a port that no service uses is not load balanced, so XDP
// passes it to the host's stack, where every listener on 0.0.0.0 would
// answer it. The filter is an nftables table of xlb's own (one per
// interface, family inet, so it holds IPv4 and IPv6 VIPs) whose input
// chain accepts ICMP (ICMPv6, neighbour discovery included) and the
// replies of the host's own connections on the VIPs it lists and rejects
// everything else: TCP with a reset, as a closed port answers, other
// protocols with ICMP port unreachable. The services' own ports never reach it: XDP handles them
// before the stack.
//
// It runs nft(8) (package nftables) in the calling process's network
// namespace.
package vipfilter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
)

// ErrNoNft is returned when nft(8) is not installed.
var ErrNoNft = errors.New("nft not found: install nftables, or set vip-filter: false to leave the VIPs' other ports to the host's stack")

// Filter is the table of one interface. Its methods are safe for
// concurrent use.
type Filter struct {
	table string

	mu        sync.Mutex
	installed bool
	addrs     []netip.Addr // in force, sorted
}

// New returns the filter of interface iface; nothing is installed until
// Set lists a VIP.
func New(iface string) *Filter { return &Filter{table: Table(iface)} }

// Table is the name of the nftables table (family inet) of interface iface.
func Table(iface string) string {
	var b strings.Builder
	b.WriteString("xlb_")
	for _, r := range iface {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// Name is the table's name.
func (f *Filter) Name() string { return f.table }

// Addrs are the VIPs the filter holds.
func (f *Filter) Addrs() []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.addrs)
}

// Installed tells whether the table is installed.
func (f *Filter) Installed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.installed
}

// Adopt says that an earlier run installed the table: Set replaces it and
// Remove removes it.
func (f *Filter) Adopt() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.installed = true
}

// Set makes the filter hold exactly addrs, replacing the table in one nft
// transaction. With no address and no table installed it does nothing.
func (f *Filter) Set(ctx context.Context, addrs []netip.Addr) error {
	addrs = slices.Clone(addrs)
	slices.SortFunc(addrs, netip.Addr.Compare)
	addrs = slices.Compact(addrs)
	f.mu.Lock()
	defer f.mu.Unlock()
	if slices.Equal(addrs, f.addrs) && (f.installed || len(addrs) == 0) {
		return nil
	}
	if err := nft(ctx, script(f.table, addrs)); err != nil {
		return fmt.Errorf("install vip filter (nftables table inet %s): %w", f.table, err)
	}
	f.installed, f.addrs = true, addrs
	return nil
}

// Remove deletes the table.
func (f *Filter) Remove(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.installed {
		return nil
	}
	if err := Remove(ctx, f.table); err != nil {
		return err
	}
	f.installed, f.addrs = false, nil
	return nil
}

// Remove deletes table if it exists (xlbd cleanup). Without nft there is
// no table xlbd could have installed, so a missing nft is no error.
func Remove(ctx context.Context, table string) error {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil
	}
	if err := nft(ctx, fmt.Sprintf("table inet %s {}\ndelete table inet %s\n", table, table)); err != nil {
		return fmt.Errorf("remove vip filter (nftables table inet %s): %w", table, err)
	}
	return nil
}

// Exists tells whether table is installed.
func Exists(ctx context.Context, table string) (bool, error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return false, nil
	}
	out, err := exec.CommandContext(ctx, "nft", "list", "tables", "inet").Output()
	if err != nil {
		return false, fmt.Errorf("list nftables tables: %w", err)
	}
	return slices.Contains(strings.Fields(string(out)), table), nil
}

// script is the nft transaction that replaces the table.
func script(table string, addrs []netip.Addr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {}\ndelete table inet %s\n", table, table)
	fmt.Fprintf(&b, "table inet %s {\n", table)
	for _, set := range []struct {
		name, typ string
		v4        bool
	}{{"vips", "ipv4_addr", true}, {"vips6", "ipv6_addr", false}} {
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n", set.name, set.typ)
		var s []string
		for _, a := range addrs {
			if a.Is4() == set.v4 {
				s = append(s, a.String())
			}
		}
		if len(s) > 0 {
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(s, ", "))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("\tchain input {\n\t\ttype filter hook input priority filter - 10; policy accept;\n")
	b.WriteString("\t\tip daddr @vips ip protocol icmp accept\n")
	b.WriteString("\t\tip6 daddr @vips6 meta l4proto ipv6-icmp accept\n")
	for _, m := range []string{"ip daddr @vips", "ip6 daddr @vips6"} {
		fmt.Fprintf(&b, "\t\t%s ct state established,related accept\n", m)
		fmt.Fprintf(&b, "\t\t%s meta l4proto tcp reject with tcp reset\n", m)
		fmt.Fprintf(&b, "\t\t%s reject\n", m)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

func nft(ctx context.Context, script string) error {
	if _, err := exec.LookPath("nft"); err != nil {
		return ErrNoNft
	}
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}
