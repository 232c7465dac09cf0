/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Next hops from the kernel's FIB and neighbour tables, cached. */
#ifndef XLB_FIB_H
#define XLB_FIB_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include "xlb_common.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* fib_nexthop asks the kernel's routing and neighbour tables for the next
 * hop towards dst. It returns the bpf_fib_lookup result code. */
static __always_inline long fib_nexthop(struct xdp_md *ctx, __be32 src, __be32 dst, struct xlb_nh *nh)
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

/* backend_nexthop returns the backend's state with its next hop, shared
 * by its connections and looked up in the FIB at most once per nh_ttl, or
 * NULL when there is none. */
static __always_inline struct xlb_backend_stats *backend_nexthop(struct xdp_md *ctx,
								 const struct xlb_cfg *cfg, __u32 id,
								 __be32 laddr, __be32 baddr, __u64 now)
{
	struct xlb_backend_stats *bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);

	if (!bs)
		return NULL;
	if (!bs->nh_j || now - bs->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, laddr, baddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS) {
			bs->nh = nh;
			bs->nh_j = now;
		} else if (!bs->nh_j) {
			return NULL;
		}
	}
	return bs;
}

/* client_nexthop refreshes a reply's next hop towards the client from the
 * FIB once per nh_ttl; until then replies go back the way the client's
 * SYN came. */
static __always_inline void client_nexthop(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_rconn *r,
					   __u64 now)
{
	struct xlb_nh nh;

	if ((__u32)now - r->nh_j <= cfg->nh_ttl_j)
		return;
	if (fib_nexthop(ctx, r->vaddr, r->caddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS)
		r->nh = nh;
	r->nh_j = now;
}

/* fib_nexthop6 is fib_nexthop for IPv6 (it needs the interface's
 * net.ipv6.conf.<iface>.forwarding). */
static __always_inline long fib_nexthop6(struct xdp_md *ctx, const __u32 *src, const __u32 *dst,
					 struct xlb_nh *nh)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_TCP;
	__builtin_memcpy(fib.ipv6_src, src, 16);
	__builtin_memcpy(fib.ipv6_dst, dst, 16);
	fib.ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		nh->ifindex = fib.ifindex;
		__builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
	}
	return rc;
}

/* backend_nexthop6 is backend_nexthop for an IPv6 backend. */
static __always_inline struct xlb_backend_stats *backend_nexthop6(struct xdp_md *ctx,
								  const struct xlb_cfg *cfg, __u32 id,
								  const __u32 *laddr, const __u32 *baddr,
								  __u64 now)
{
	struct xlb_backend_stats *bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);

	if (!bs)
		return NULL;
	if (!bs->nh_j || now - bs->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop6(ctx, laddr, baddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS) {
			bs->nh = nh;
			bs->nh_j = now;
		} else if (!bs->nh_j) {
			return NULL;
		}
	}
	return bs;
}

/* client_nexthop6 is client_nexthop for an IPv6 connection. */
static __always_inline void client_nexthop6(struct xdp_md *ctx, const struct xlb_cfg *cfg,
					    struct xlb_rconn6 *r, __u64 now)
{
	struct xlb_nh nh;

	if ((__u32)now - r->nh_j <= cfg->nh_ttl_j)
		return;
	if (fib_nexthop6(ctx, r->vaddr, r->caddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS)
		r->nh = nh;
	r->nh_j = now;
}

#endif
