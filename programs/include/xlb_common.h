/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Helpers used by several stages: counters, scratch, hashing, FIB. */
#ifndef XLB_COMMON_H
#define XLB_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xlb_maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&xlb_stats, &stat);

	if (v)
		*v += 1;
}

static __always_inline struct xlb_pkt *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&xlb_scratch, &zero);
}

static __always_inline struct xlb_cfg *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&xlb_settings, &zero);
}

static __always_inline int pass(__u32 stat)
{
	count(stat);
	return XDP_PASS;
}

static __always_inline int drop(__u32 stat)
{
	count(stat);
	return XDP_DROP;
}

static __always_inline __u32 rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

/* flow_hash mixes the client side of a flow (Jenkins' final mix over the
 * four words). The same flow always hashes the same on every host, which
 * consistent hashing relies on. */
static __always_inline __u32 flow_hash(const struct xlb_flow *f)
{
	__u32 a = f->saddr, b = f->daddr;
	__u32 c = ((__u32)f->sport << 16 | f->dport) ^ f->proto;

	a += 0xdeadbeef;
	b += 0x9e3779b9;
	c ^= b;
	c -= rol32(b, 14);
	a ^= c;
	a -= rol32(c, 11);
	b ^= a;
	b -= rol32(a, 25);
	c ^= b;
	c -= rol32(b, 16);
	a ^= c;
	a -= rol32(c, 4);
	b ^= a;
	b -= rol32(a, 14);
	c ^= b;
	c -= rol32(b, 24);
	return c;
}

/* rand32 returns a pseudo-random value from the per-CPU xorshift32 state,
 * seeded from the kernel's generator on first use. */
static __always_inline __u32 rand32(void)
{
	__u32 zero = 0;
	__u32 *s = bpf_map_lookup_elem(&xlb_rng, &zero);
	__u32 x;

	if (!s)
		return bpf_get_prandom_u32();
	x = *s;
	if (!x)
		x = bpf_get_prandom_u32() | 1;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	*s = x;
	return x;
}

/* pick scales a 32-bit value into [0, n) without a division. */
static __always_inline __u32 pick(__u32 v, __u32 n)
{
	return (__u32)(((__u64)v * n) >> 32);
}

/* fib_nexthop asks the kernel's routing and neighbour tables for the next
 * hop towards dst. It returns the bpf_fib_lookup result code. */
static __always_inline long fib_nexthop(struct xdp_md *ctx, __be32 src, __be32 dst,
					struct xlb_nh *nh)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_TCP;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		nh->ifindex = fib.ifindex;
		__builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
	}
	return rc;
}

/* port_hash mixes a backend's address and port. */
static __always_inline __u32 port_hash(__be32 baddr, __be16 bport)
{
	return (baddr ^ ((__u32)bport << 16 | bport)) * 0x9e3779b1;
}

/* port_way picks a backend's way in every source port. */
static __always_inline __u32 port_way(__be32 baddr, __be16 bport)
{
	return port_hash(baddr, bport) >> (32 - XLB_PORT_WAYS_LOG2);
}

/* port_entry returns the way of source port lport (host order) that
 * backend baddr:bport uses, or NULL outside the range. */
static __always_inline struct xlb_rconn *port_entry(const struct xlb_cfg *cfg, __u16 lport,
						    __be32 baddr, __be16 bport)
{
	__u32 idx;

	if (lport < cfg->port_lo || lport > cfg->port_hi)
		return NULL;
	idx = port_way(baddr, bport) * ((__u32)cfg->port_hi - cfg->port_lo + 1) + (lport - cfg->port_lo);
	return bpf_map_lookup_elem(&xlb_ports, &idx);
}

/* conn_closed reports whether flags describe a finished connection. */
static __always_inline int conn_closed(__u32 flags)
{
	return (flags & XLB_CF_RST) ||
	       (flags & (XLB_CF_FIN_C | XLB_CF_FIN_B)) == (XLB_CF_FIN_C | XLB_CF_FIN_B);
}

static __always_inline __u32 conn_state(__u32 flags)
{
	if (conn_closed(flags))
		return XLB_CT_CLOSED;
	if (flags & (XLB_CF_FIN_C | XLB_CF_FIN_B))
		return XLB_CT_FIN;
	if (flags & XLB_CF_ESTAB)
		return XLB_CT_ESTABLISHED;
	return XLB_CT_SYN;
}

static __always_inline void backend_uncount(__u32 id)
{
	struct xlb_backend_stats *bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);

	if (bs)
		__sync_fetch_and_add(&bs->active, -1);
}

/* conn_mark sets flag bits on a connection. The one caller whose update
 * closes the connection uncounts it from its backend, exactly once. */
static __always_inline void conn_mark(struct xlb_conn *c, __u32 bits)
{
	__u32 old;

	if ((c->flags & bits) == bits)
		return;
	old = __sync_fetch_and_or(&c->flags, bits);
	if (!conn_closed(old) && conn_closed(old | bits)) {
		backend_uncount(c->backend_id);
		count(XLB_STAT_CLOSED);
	}
}

/* tcp_conn_bits maps TCP flags seen in one direction to connection bits. */
static __always_inline __u32 tcp_conn_bits(__u8 tcp_flags, __u32 fin_bit)
{
	__u32 bits = 0;

	if (tcp_flags & TCP_FL_RST)
		bits |= XLB_CF_RST;
	if (tcp_flags & TCP_FL_FIN)
		bits |= fin_bit;
	return bits;
}

#endif
