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
 * hop from src to dst, IPv4 addresses or, when v6, IPv6 ones (IPv6 needs
 * the interface's net.ipv6.conf.<iface>.forwarding). It returns the
 * bpf_fib_lookup result code, and fills nh only on success. */
static __always_inline long fib_nexthop(struct xdp_md *ctx, const void *src, const void *dst, int v6,
					struct xlb_nh *nh)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	if (v6) {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, src, 16);
		__builtin_memcpy(fib.ipv6_dst, dst, 16);
	} else {
		fib.family = AF_INET;
		fib.ipv4_src = *(const __be32 *)src;
		fib.ipv4_dst = *(const __be32 *)dst;
	}
	fib.l4_protocol = IPPROTO_TCP;
	fib.ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		nh->ifindex = fib.ifindex;
		__builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
		__builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
	}
	return rc;
}

/* backend_nexthop_of returns the backend's state with its next hop from
 * laddr to baddr (of the family v6 says), shared by its connections and
 * looked up in the FIB at most once per nh_ttl, or NULL when there is
 * none. */
static __always_inline struct xlb_backend_stats *backend_nexthop_of(struct xdp_md *ctx,
								    const struct xlb_cfg *cfg, __u32 id,
								    const void *laddr, const void *baddr,
								    int v6, __u64 now)
{
	struct xlb_backend_stats *bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);

	if (!bs)
		return NULL;
	if (!bs->nh_j || now - bs->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, laddr, baddr, v6, &nh) == BPF_FIB_LKUP_RET_SUCCESS) {
			bs->nh = nh;
			bs->nh_j = now;
		} else if (!bs->nh_j) {
			return NULL;
		}
	}
	return bs;
}

/* backend_nexthop is backend_nexthop_of for an IPv4 backend. */
static __always_inline struct xlb_backend_stats *backend_nexthop(struct xdp_md *ctx,
								 const struct xlb_cfg *cfg, __u32 id,
								 __be32 laddr, __be32 baddr, __u64 now)
{
	return backend_nexthop_of(ctx, cfg, id, &laddr, &baddr, 0, now);
}

/* backend_nexthop6 is backend_nexthop_of for an IPv6 backend. */
static __always_inline struct xlb_backend_stats *backend_nexthop6(struct xdp_md *ctx,
								  const struct xlb_cfg *cfg, __u32 id,
								  const __u32 *laddr, const __u32 *baddr,
								  __u64 now)
{
	return backend_nexthop_of(ctx, cfg, id, laddr, baddr, 1, now);
}

/* client_nexthop_of refreshes a reply's next hop nh, from vaddr towards
 * caddr, from the FIB once per nh_ttl (nh_j is when it last did); until
 * then replies go back the way the client's SYN came. */
static __always_inline void client_nexthop_of(struct xdp_md *ctx, const struct xlb_cfg *cfg,
					      struct xlb_nh *nh, __u32 *nh_j, const void *vaddr,
					      const void *caddr, int v6, __u64 now)
{
	struct xlb_nh fresh;

	if ((__u32)now - *nh_j <= cfg->nh_ttl_j)
		return;
	if (fib_nexthop(ctx, vaddr, caddr, v6, &fresh) == BPF_FIB_LKUP_RET_SUCCESS)
		*nh = fresh;
	*nh_j = now;
}

/* client_nexthop is client_nexthop_of for an IPv4 connection. */
static __always_inline void client_nexthop(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_rconn *r,
					   __u64 now)
{
	client_nexthop_of(ctx, cfg, &r->nh, &r->nh_j, &r->vaddr, &r->caddr, 0, now);
}

/* client_nexthop6 is client_nexthop_of for an IPv6 connection. */
static __always_inline void client_nexthop6(struct xdp_md *ctx, const struct xlb_cfg *cfg,
					    struct xlb_rconn6 *r, __u64 now)
{
	client_nexthop_of(ctx, cfg, &r->nh, &r->nh_j, r->vaddr, r->caddr, 1, now);
}

#endif
