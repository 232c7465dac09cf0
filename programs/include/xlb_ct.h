/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The connection table: an LRU hash table on the array xlb_conns, run by
 * the data path itself so that lookups and inserts make no kernel call
 * (each costs 50 and 250 ns on CPUs with return-stack mitigations).
 *
 * A flow's connection lives in one of XLB_CT_WAYS consecutive slots from
 * flow_hash(flow) & ct_mask. Every slot has a sequence number: even while
 * it is stable, odd while someone rewrites it. A writer (a SYN taking a
 * slot, a recycle, the daemon's sweeper) makes it odd with a
 * compare-and-swap, writes, and makes it even again; a reader takes the
 * sequence, reads, and checks it is unchanged. On x86-64 loads are not
 * reordered with loads nor stores with stores, so compiler barriers are
 * all the ordering the readers need. */
#ifndef XLB_CT_H
#define XLB_CT_H

#include "xlb_common.h"
#include "xlb_hash.h"

#define READ_U32(x) (*(volatile __u32 *)&(x))
#define barrier() asm volatile("" ::: "memory")

enum ct_claim_result {
	CT_NEW,    /* a slot taken (odd) for the caller to fill and publish */
	CT_EXISTS, /* the flow has a connection: *out, stable at *seq */
	CT_BUSY,   /* every slot of the window is being written */
};

static __always_inline int ct_key_eq(const struct xlb_flow *a, const struct xlb_flow *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return x[0] == y[0] && x[1] == y[1];
}

static __always_inline int ct_key_eq6(const struct xlb_flow6 *a, const struct xlb_flow6 *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* XLB_CT_TABLE defines a family's table functions: ct_slot, ct_find and
 * ct_claim with the suffix sfx, for slots of conn_t keyed by flow_t in
 * map, ct_mask_f slots of the settings, placed by hashfn and compared by
 * eqfn. */
#define XLB_CT_TABLE(sfx, conn_t, flow_t, map, ct_mask_f, hashfn, eqfn)                                            \
	static __always_inline conn_t *ct_slot##sfx(const struct xlb_cfg *cfg, __u32 h, __u32 i)                   \
	{                                                                                                          \
		__u32 idx = (h + i) & cfg->ct_mask_f;                                                              \
                                                                                                                   \
		return bpf_map_lookup_elem(&map, &idx);                                                            \
	}                                                                                                          \
                                                                                                                   \
	/* ct_find returns flow k's connection and its slot's sequence, or NULL. */                                \
	static __always_inline conn_t *ct_find##sfx(const struct xlb_cfg *cfg, const flow_t *k, __u32 *seq)        \
	{                                                                                                          \
		__u32 h = hashfn(k), i;                                                                            \
                                                                                                                   \
		for (i = 0; i < XLB_CT_WAYS; i++) {                                                                \
			conn_t *c = ct_slot##sfx(cfg, h, i);                                                       \
			__u32 s;                                                                                   \
                                                                                                                   \
			if (!c)                                                                                    \
				return NULL;                                                                       \
			s = READ_U32(c->seq);                                                                      \
			barrier();                                                                                 \
			if (s & 1)                                                                                 \
				continue;                                                                          \
			if (!c->flags)                                                                             \
				return NULL;                                                                       \
			if (!(c->flags & XLB_CF_DEAD) && eqfn(&c->key, k)) {                                       \
				*seq = s;                                                                          \
				return c;                                                                          \
			}                                                                                          \
		}                                                                                                  \
		return NULL;                                                                                       \
	}                                                                                                          \
                                                                                                                   \
	/* ct_claim finds a slot for flow k's new connection: the flow's own                                     \
	 * connection if it has one (CT_EXISTS), else the first free slot (never                                 \
	 * used, or a tombstone) of its window or, in a full window, the least                                   \
	 * recently seen one, taken (odd) for the caller (CT_NEW). A taken slot                                  \
	 * may still hold the connection it evicts, for the caller to clean up.                                  \
	 * h is the flow's hash (hashfn(k)). *slot is the slot's index. */ \
	static __always_inline int ct_claim##sfx(const struct xlb_cfg *cfg, const flow_t *k, __u32 h,              \
						 conn_t **out, __u32 *seq, __u32 *slot)                            \
	{                                                                                                          \
		__u32 i, best_seq = 0, best_i = 0;                                                                 \
		conn_t *best = NULL;                                                                               \
		__u64 best_seen = 0;                                                                               \
                                                                                                                   \
		for (i = 0; i < XLB_CT_WAYS; i++) {                                                                \
			conn_t *c = ct_slot##sfx(cfg, h, i);                                                       \
			__u64 seen;                                                                                \
			__u32 s;                                                                                   \
                                                                                                                   \
			if (!c)                                                                                    \
				return CT_BUSY;                                                                    \
			s = READ_U32(c->seq);                                                                      \
			barrier();                                                                                 \
			if (s & 1)                                                                                 \
				continue;                                                                          \
			if (!c->flags || (c->flags & XLB_CF_DEAD)) {                                               \
				if (!best || best_seen) {                                                          \
					best = c;                                                                  \
					best_seq = s;                                                              \
					best_seen = 0;                                                             \
					best_i = i;                                                                \
				}                                                                                  \
				if (!c->flags)                                                                     \
					break; /* never used: the flow is not further on */                        \
				continue;                                                                          \
			}                                                                                          \
			if (eqfn(&c->key, k)) {                                                                    \
				*out = c;                                                                          \
				*seq = s;                                                                          \
				*slot = (h + i) & cfg->ct_mask_f;                                                  \
				return CT_EXISTS;                                                                  \
			}                                                                                          \
			seen = c->last_seen_j | 1; /* above 0, which marks a free slot */                          \
			if (!best || seen < best_seen) {                                                           \
				best = c;                                                                          \
				best_seq = s;                                                                      \
				best_seen = seen;                                                                  \
				best_i = i;                                                                        \
			}                                                                                          \
		}                                                                                                  \
		if (!best || __sync_val_compare_and_swap(&best->seq, best_seq, best_seq + 1) != best_seq)          \
			return CT_BUSY;                                                                            \
		*out = best;                                                                                       \
		*seq = best_seq + 1;                                                                               \
		*slot = (h + best_i) & cfg->ct_mask_f;                                                             \
		return CT_NEW;                                                                                     \
	}

XLB_CT_TABLE(, struct xlb_conn, struct xlb_flow, xlb_conns, ct_mask, flow_hash, ct_key_eq)
XLB_CT_TABLE(6, struct xlb_conn6, struct xlb_flow6, xlb_conns6, ct6_mask, flow_hash6, ct_key_eq6)

/* ct_stable reports whether a slot is still what was read at seq. */
static __always_inline int ct_stable(const __u32 *slot_seq, __u32 seq)
{
	barrier();
	return READ_U32(*slot_seq) == seq;
}

/* ct_take makes a stable slot odd for its caller to rewrite. */
static __always_inline int ct_take(__u32 *slot_seq, __u32 seq)
{
	return __sync_val_compare_and_swap(slot_seq, seq, seq + 1) == seq;
}

/* ct_publish makes a slot the caller rewrote stable again. */
static __always_inline void ct_publish(__u32 *slot_seq)
{
	__sync_fetch_and_add(slot_seq, 1);
}

#endif
