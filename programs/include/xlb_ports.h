/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Source ports: the return table (xlb_ports) is also the allocator. */
#ifndef XLB_PORTS_H
#define XLB_PORTS_H

#include "xlb_common.h"
#include "xlb_hash.h"

/* port_way picks a backend's way in every source port: the top bits of a
 * multiplicative hash of its address and port. */
static __always_inline __u32 port_way(__be32 baddr, __be16 bport)
{
	return ((baddr ^ ((__u32)bport << 16 | bport)) * 0x9e3779b1) >> (32 - XLB_PORT_WAYS_LOG2);
}

/* port_index sets *idx to the index, in its family's return table, of way
 * `way` of source port lport (host order) of source address src, and
 * reports whether lport is in the range. */
static __always_inline int port_index(const struct xlb_cfg *cfg, __u32 src, __u32 way, __u16 lport,
				      __u32 *idx)
{
	if (lport < cfg->port_lo || lport > cfg->port_hi)
		return 0;
	*idx = (src * XLB_PORT_WAYS + way) * cfg->nports + (lport - cfg->port_lo);
	return 1;
}

/* port_entry returns the way of source port lport (host order) of source
 * address src that backend baddr:bport uses, or NULL outside the range. */
static __always_inline struct xlb_rconn *port_entry(const struct xlb_cfg *cfg, __u32 src, __u16 lport,
						    __be32 baddr, __be16 bport)
{
	__u32 idx;

	if (!port_index(cfg, src, port_way(baddr, bport), lport, &idx))
		return NULL;
	return bpf_map_lookup_elem(&xlb_ports, &idx);
}

/* port_owned reports whether a way still holds connection c's return side. */
static __always_inline int port_owned(const struct xlb_rconn *r, const struct xlb_conn *c)
{
	return r->baddr == c->baddr && r->bport == c->bport && r->caddr == c->key.saddr &&
	       r->cport == c->key.sport;
}

/* port_rest starts the hold of connection c's port when the connection
 * ends, if the way is still c's. */
static __always_inline void port_rest(struct xlb_rconn *r, const struct xlb_conn *c, __u64 now)
{
	if (!r || r->state != XLB_PS_USED || !port_owned(r, c))
		return;
	r->last_seen_j = now; /* before the state: the hold starts now */
	__sync_val_compare_and_swap(&r->state, XLB_PS_USED, XLB_PS_HOLD);
}

/* XLB_CLAIM_PORT defines claim_port<sfx> for a family's ports table,
 * cursors and bitmap, its backends' way (wayexpr of baddr and bport) and
 * rconn_t ways.
 *
 * claim_port claims the backend's way of a free source port of source
 * address src: one that never served, or one whose hold has passed. Every
 * backend of the way, whatever its service, walks the range from one
 * cursor per (address, way), as connect() walks its range, so a port
 * comes back only after the whole range was used. The cursor moves only
 * past a port taken: the ports in front of it are the ones released
 * first, so when the first is still resting the others are too, and a
 * refusal leaves it there for the next SYN. Two CPUs reading it at once
 * race for the port with the compare-and-swap; the loser takes the next
 * one. Returns the way and sets its offset in the range. */
#define XLB_CLAIM_PORT(sfx, rconn_t, addr_t, ports, curs, busy, wayfn)                                      \
	static __always_inline rconn_t *claim_port##sfx(const struct xlb_cfg *cfg, __u32 src, addr_t baddr, \
							__be16 bport, __u32 *off, __u64 now)                \
	{                                                                                                   \
		__u32 key = src * XLB_PORT_WAYS + wayfn(baddr, bport);                                      \
		__u32 range = cfg->nports, base, start, i;                                                  \
		__u32 *cur = bpf_map_lookup_elem(&curs, &key);                                              \
                                                                                                            \
		if (!cur || !range)                                                                         \
			return NULL;                                                                        \
		base = key * range;                                                                         \
		start = *cur % range;                                                                       \
		for (i = 0; i < XLB_PORT_TRIES; i++) {                                                      \
			__u32 o = start + i, idx, st;                                                       \
			rconn_t *r;                                                                         \
                                                                                                            \
			if (i >= range)                                                                     \
				return NULL; /* a small range, walked whole */                              \
			if (o >= range)                                                                     \
				o -= range;                                                                 \
			idx = base + o;                                                                     \
			r = bpf_map_lookup_elem(&ports, &idx);                                              \
			if (!r)                                                                             \
				return NULL;                                                                \
			st = r->state;                                                                      \
			if (st == XLB_PS_HOLD && (__u32)now - r->last_seen_j <= cfg->hold_j)                \
				continue;                                                                   \
			if (st != XLB_PS_USED &&                                                            \
			    __sync_val_compare_and_swap(&r->state, st, XLB_PS_USED) == st) {                \
				__sync_fetch_and_add(cur, i + 1);                                           \
				mark_busy(&busy, idx);                                                      \
				*off = o;                                                                   \
				return r;                                                                   \
			}                                                                                   \
		}                                                                                           \
		return NULL;                                                                                \
	}

XLB_CLAIM_PORT(, struct xlb_rconn, __be32, xlb_ports, xlb_port_cur, xlb_port_busy, port_way)

/* The IPv6 ways. */

static __always_inline int addr6_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void addr6_copy(__u32 *to, const __u32 *from)
{
	to[0] = from[0];
	to[1] = from[1];
	to[2] = from[2];
	to[3] = from[3];
}

/* port_way6 is port_way for an IPv6 backend. */
static __always_inline __u32 port_way6(const __u32 *baddr, __be16 bport)
{
	return port_way(baddr[0] ^ baddr[1] ^ baddr[2] ^ baddr[3], bport);
}

XLB_CLAIM_PORT(6, struct xlb_rconn6, const __u32 *, xlb_ports6, xlb_port6_cur, xlb_port6_busy, port_way6)

static __always_inline struct xlb_rconn6 *port_entry6(const struct xlb_cfg *cfg, __u32 src, __u16 lport,
						      const __u32 *baddr, __be16 bport)
{
	__u32 idx;

	if (!port_index(cfg, src, port_way6(baddr, bport), lport, &idx))
		return NULL;
	return bpf_map_lookup_elem(&xlb_ports6, &idx);
}

static __always_inline int port_owned6(const struct xlb_rconn6 *r, const struct xlb_conn6 *c)
{
	return addr6_eq(r->baddr, c->baddr) && r->bport == c->bport && addr6_eq(r->caddr, c->key.saddr) &&
	       r->cport == c->key.sport;
}

static __always_inline void port_rest6(struct xlb_rconn6 *r, const struct xlb_conn6 *c, __u64 now)
{
	if (!r || r->state != XLB_PS_USED || !port_owned6(r, c))
		return;
	r->last_seen_j = now;
	__sync_val_compare_and_swap(&r->state, XLB_PS_USED, XLB_PS_HOLD);
}

/* backend_isn chooses the initial sequence number the backend sees for a
 * new connection on way r (source laddr:lport, backend baddr:bport): a
 * keyed hash of the four-tuple plus a clock of about 4 per microsecond,
 * as RFC 6528 and Linux do, and in any case after the last sequence
 * number the way's previous connection used (tw_seq), so that a backend
 * still in TIME_WAIT for the four-tuple accepts the SYN (Linux accepts a
 * SYN in TIME_WAIT whose sequence number lies after the old connection's
 * last one; timestamps are never negotiated, see tcp_opts_rewrite). */
static __always_inline __u32 backend_isn(const struct xlb_cfg *cfg, __u16 rflags, __u32 tw_seq, __be32 laddr,
					 __be16 lport, __be32 baddr, __be16 bport, __u64 now)
{
	__u32 isn = mix3(laddr ^ cfg->isn_key[0], baddr, ((__u32)lport << 16 | bport) ^ cfg->isn_key[1]) +
		    (__u32)now * cfg->isn_per_j;

	if ((rflags & XLB_RF_TW_SEQ) && (__s32)(isn - tw_seq) <= 0)
		isn = tw_seq + 0x10000 + (isn & 0xffff);
	return isn;
}

#endif
