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

/* syn_cookie_of binds a flow (its addresses, IPv6 ones folded to 32 bits,
 * and its ports) to a coarse clock slot with a secret. */
static __always_inline __u32 syn_cookie_of(const struct xlb_cfg *cfg, __u32 saddr, __u32 daddr, __be16 sport,
					   __be16 dport, __u32 slot)
{
	return mix3(saddr ^ cfg->cookie_key[0], daddr ^ slot,
		    ((__u32)sport << 16 | dport) ^ cfg->cookie_key[1]);
}

/* syn_cookie is syn_cookie_of for an IPv4 flow. */
static __always_inline __u32 syn_cookie(const struct xlb_cfg *cfg, const struct xlb_flow *f, __u32 slot)
{
	return syn_cookie_of(cfg, f->saddr, f->daddr, f->sport, f->dport, slot);
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

/* syn_validate_of checks a RST without a connection against the cookie
 * of its flow (this clock slot or the previous one) and, if it matches,
 * trusts its source. */
static __always_inline int syn_validate_of(const struct xlb_cfg *cfg, __u32 saddr, __u32 daddr, __be16 sport,
					   __be16 dport, __u32 seq, __u64 now)
{
	__u32 slot = syn_slot(cfg, now);

	if (cfg->syn_mode == XLB_SYN_OFF)
		return 0;
	if (seq != syn_cookie_of(cfg, saddr, daddr, sport, dport, slot) &&
	    seq != syn_cookie_of(cfg, saddr, daddr, sport, dport, slot - 1))
		return 0;
	return syn_trust(cfg, saddr, now);
}

/* syn_validate is syn_validate_of for an IPv4 flow. */
static __always_inline int syn_validate(const struct xlb_cfg *cfg, const struct xlb_flow *f, __u32 seq,
					__u64 now)
{
	return syn_validate_of(cfg, f->saddr, f->daddr, f->sport, f->dport, seq, now);
}

/* syn_cookie6 is syn_cookie for an IPv6 flow. */
static __always_inline __u32 syn_cookie6(const struct xlb_cfg *cfg, const struct xlb_flow6 *f, __u32 slot)
{
	return syn_cookie_of(cfg, addr6_fold(f->saddr), addr6_fold(f->daddr), f->sport, f->dport, slot);
}

/* syn_validate6 is syn_validate for an IPv6 flow; the source is trusted by
 * its address folded to 32 bits. */
static __always_inline int syn_validate6(const struct xlb_cfg *cfg, const struct xlb_flow6 *f, __u32 seq,
					 __u64 now)
{
	return syn_validate_of(cfg, addr6_fold(f->saddr), addr6_fold(f->daddr), f->sport, f->dport, seq, now);
}

#endif
