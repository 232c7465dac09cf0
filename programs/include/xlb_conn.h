/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* A connection's TCP state and what it holds: its backend's counts and its
 * source port. */
#ifndef XLB_CONN_H
#define XLB_CONN_H

#include "xlb_common.h"
#include "xlb_ports.h"

/* conn_closed reports whether flags describe a finished connection. */
static __always_inline int conn_closed(__u32 flags)
{
	return (flags & XLB_CF_RST) ||
	       (flags & (XLB_CF_FIN_C | XLB_CF_FIN_B)) == (XLB_CF_FIN_C | XLB_CF_FIN_B);
}

/* conn_half_open reports whether a TCP connection's handshake is
 * unfinished. */
static __always_inline int conn_half_open(__u32 flags)
{
	return !(flags & (XLB_CF_ESTAB | XLB_CF_UDP)) && !conn_closed(flags);
}

static __always_inline __u32 conn_state(__u32 flags)
{
	if (flags & XLB_CF_UDP)
		return XLB_CT_UDP;
	if (conn_closed(flags))
		return XLB_CT_CLOSED;
	if (flags & (XLB_CF_FIN_C | XLB_CF_FIN_B))
		return XLB_CT_FIN;
	if (flags & XLB_CF_ESTAB)
		return XLB_CT_ESTABLISHED;
	if (flags & XLB_CF_SYNACK)
		return XLB_CT_SYN_RECV;
	return XLB_CT_SYN;
}

/* conn_expired reports whether a connection outlived its state's timeout. */
static __always_inline int conn_expired(const struct xlb_cfg *cfg, __u32 flags, __u64 last, __u64 now)
{
	__u32 st = conn_state(flags);

	if (st >= XLB_CT_MAX)
		return 0;
	return now - last > cfg->timeout_j[st];
}

/* in_window reports whether sequence number x lies from XLB_WIN_BEFORE
 * before ref to win after it, modulo 2^32. */
static __always_inline int in_window(__u32 x, __u32 ref, __u32 win)
{
	return x - ref + XLB_WIN_BEFORE < win + XLB_WIN_BEFORE;
}

/* backend_account moves a connection's backend counts from its old flags
 * to its new ones: out of half-open when the handshake completes or the
 * connection ends, out of active when it ends. */
static __always_inline void backend_account(__u32 id, __u32 old, __u32 new)
{
	struct xlb_backend_stats *bs;
	int closes = !conn_closed(old) && conn_closed(new);
	int opens = conn_half_open(old) && !conn_half_open(new);

	if (!closes && !opens)
		return;
	bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);
	if (!bs)
		return;
	if (closes)
		__sync_fetch_and_add(&bs->active, -1);
	if (opens)
		__sync_fetch_and_add(&bs->half_open, -1);
}

/* flags_mark sets flag bits on a connection's flags, accounts the
 * change to its backend, and reports whether this call closed it. */
static __always_inline int flags_mark(__u32 *flags, __u32 bits, __u32 backend_id)
{
	__u32 old;

	if ((*flags & bits) == bits)
		return 0;
	old = __sync_fetch_and_or(flags, bits);
	backend_account(backend_id, old, old | bits);
	if (conn_closed(old) || !conn_closed(old | bits))
		return 0;
	count(XLB_STAT_CLOSED);
	return 1;
}

/* conn_mark sets flag bits on a connection. The one caller whose update
 * closes the connection uncounts it and starts its port's hold (r: its
 * way, or NULL when the caller has not looked it up); the one whose
 * update completes the handshake takes it out of half-open. */
static __always_inline void conn_mark(struct xlb_conn *c, __u32 bits, struct xlb_rconn *r, __u64 now)
{
	if (flags_mark(&c->flags, bits, c->backend_id))
		port_rest(r, c, now);
}

/* conn_mark6 is conn_mark for an IPv6 connection. */
static __always_inline void conn_mark6(struct xlb_conn6 *c, __u32 bits, struct xlb_rconn6 *r, __u64 now)
{
	if (flags_mark(&c->flags, bits, c->backend_id))
		port_rest6(r, c, now);
}

/* conn_end releases what a connection holds (its backend's counts, its
 * source port) before its slot is reused. */
static __always_inline void conn_end(const struct xlb_cfg *cfg, struct xlb_conn *c, __u32 stat, __u64 now)
{
	backend_account(c->backend_id, c->flags, c->flags | XLB_CF_RST);
	port_rest(port_entry(cfg, c->src_idx, bpf_ntohs(c->lport), c->baddr, c->bport), c, now);
	count(stat);
}

/* conn_end6 is conn_end for an IPv6 connection. */
static __always_inline void conn_end6(const struct xlb_cfg *cfg, struct xlb_conn6 *c, __u32 stat, __u64 now)
{
	backend_account(c->backend_id, c->flags, c->flags | XLB_CF_RST);
	port_rest6(port_entry6(cfg, c->src_idx, bpf_ntohs(c->lport), c->baddr, c->bport), c, now);
	count(stat);
}

#endif
