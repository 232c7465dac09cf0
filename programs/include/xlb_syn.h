/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The SYN flood defence: a source that has not shown it can receive
 * xlb's packets gets no connection slot and no source port while a
 * backend has too many half-open connections (or always, in mode on).
 * Its SYN is answered with a SYN-ACK whose acknowledgement number is a
 * cookie, not its sequence number plus one. A real client answers that
 * with a RST carrying the cookie as its sequence number (RFC 793,
 * SYN-SENT, unacceptable ACK) and sends its SYN again (Linux at once, in
 * TCP_TIMEOUT_MIN; others after their retransmission timeout). The RST
 * validates the source for a while; its next SYN is served. A spoofed
 * source never sees the cookie. See docs/architecture.md. */
#ifndef XLB_SYN_H
#define XLB_SYN_H

#include "xlb_common.h"
#include "xlb_hash.h"

/* syn_cookie binds a flow to a coarse clock slot with a secret. */
static __always_inline __u32 syn_cookie(const struct xlb_cfg *cfg, const struct xlb_flow *f, __u32 slot)
{
	return mix3(f->saddr ^ cfg->cookie_key[0], f->daddr ^ slot,
		    ((__u32)f->sport << 16 | f->dport) ^ cfg->cookie_key[1]);
}

static __always_inline __u32 syn_slot(const struct xlb_cfg *cfg, __u64 now)
{
	return (__u32)(now >> cfg->cookie_shift);
}

static __always_inline struct xlb_trusted *syn_ok_entry(const struct xlb_cfg *cfg, __be32 saddr)
{
	__u32 k = mix3(saddr, cfg->cookie_key[1], cfg->cookie_key[0]) & (XLB_SYN_OK_SLOTS - 1);

	return bpf_map_lookup_elem(&xlb_syn_ok, &k);
}

/* syn_challenge_due reports whether a SYN for a new connection to a
 * backend must be challenged instead of served. */
static __always_inline int syn_challenge_due(const struct xlb_cfg *cfg, const struct xlb_backend_stats *bs,
					     __be32 saddr, __u64 now)
{
	struct xlb_trusted *ok;

	if (cfg->syn_mode == XLB_SYN_OFF)
		return 0;
	if (cfg->syn_mode == XLB_SYN_AUTO && bs->half_open < cfg->syn_half_open)
		return 0;
	ok = syn_ok_entry(cfg, saddr);
	return !ok || ok->addr != saddr || (__s32)(ok->until_j - (__u32)now) <= 0;
}

/* syn_trust trusts a source (an IPv4 address, or an IPv6 one folded to
 * 32 bits) for syn_ok_j. */
static __always_inline int syn_trust(const struct xlb_cfg *cfg, __u32 src, __u64 now)
{
	struct xlb_trusted *ok = syn_ok_entry(cfg, src);

	if (!ok)
		return 0;
	ok->addr = src;
	ok->until_j = (__u32)now + cfg->syn_ok_j;
	return 1;
}

/* syn_validate checks a RST without a connection against the cookie of
 * its flow (this clock slot or the previous one) and, if it matches,
 * trusts its source. */
static __always_inline int syn_validate(const struct xlb_cfg *cfg, const struct xlb_flow *f, __u32 seq,
					__u64 now)
{
	__u32 slot = syn_slot(cfg, now);

	if (cfg->syn_mode == XLB_SYN_OFF)
		return 0;
	if (seq != syn_cookie(cfg, f, slot) && seq != syn_cookie(cfg, f, slot - 1))
		return 0;
	return syn_trust(cfg, f->saddr, now);
}

/* syn_cookie6 is syn_cookie for an IPv6 flow. */
static __always_inline __u32 syn_cookie6(const struct xlb_cfg *cfg, const struct xlb_flow6 *f, __u32 slot)
{
	return mix3(addr6_fold(f->saddr) ^ cfg->cookie_key[0], addr6_fold(f->daddr) ^ slot,
		    ((__u32)f->sport << 16 | f->dport) ^ cfg->cookie_key[1]);
}

/* syn_validate6 is syn_validate for an IPv6 flow; the source is trusted by
 * its address folded to 32 bits. */
static __always_inline int syn_validate6(const struct xlb_cfg *cfg, const struct xlb_flow6 *f, __u32 seq,
					 __u64 now)
{
	__u32 slot = syn_slot(cfg, now);

	if (cfg->syn_mode == XLB_SYN_OFF)
		return 0;
	if (seq != syn_cookie6(cfg, f, slot) && seq != syn_cookie6(cfg, f, slot - 1))
		return 0;
	return syn_trust(cfg, addr6_fold(f->saddr), now);
}

#endif
