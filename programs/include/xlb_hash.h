/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Hashing and pseudo-random numbers. */
#ifndef XLB_HASH_H
#define XLB_HASH_H

#include "xlb_common.h"

static __always_inline __u32 rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

/* mix3 is Bob Jenkins' final mix of three words (lookup3.c, public
 * domain). */
static __always_inline __u32 mix3(__u32 a, __u32 b, __u32 c)
{
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

/* flow_hash mixes the client side of a flow. The same flow always hashes
 * the same on every host, which consistent hashing relies on. */
static __always_inline __u32 flow_hash(const struct xlb_flow *f)
{
	return mix3(f->saddr, f->daddr, ((__u32)f->sport << 16 | f->dport) ^ f->proto);
}

/* addr6_fold mixes an IPv6 address's four words into one: each word
 * goes through a full mix (a cheaper fold, such as a2 ^ rol(a3, 16),
 * gives addresses that differ in two words the same key). */
static __always_inline __u32 addr6_fold(const __u32 *a)
{
	return mix3(mix3(a[0], a[1], a[2]), a[3], 0x6a09e667);
}

/* flow_hash6 is flow_hash for an IPv6 flow: its nine words in three
 * rounds of mix3, each round's result carried into the next. */
static __always_inline __u32 flow_hash6(const struct xlb_flow6 *f)
{
	__u32 h = mix3(f->saddr[0], f->saddr[1], f->saddr[2]);

	h = mix3(h ^ f->saddr[3], f->daddr[0], f->daddr[1]);
	return mix3(h ^ f->daddr[2], f->daddr[3], ((__u32)f->sport << 16 | f->dport) ^ f->proto);
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

#endif
