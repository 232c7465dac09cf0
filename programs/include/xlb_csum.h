/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Incremental Internet checksum updates (RFC 1624, eqn. 3). */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

#include <linux/types.h>

/* csum_acc32 adds the change of a 32-bit field from old to new to a
 * one's-complement accumulator: ~old + new. The 32-bit halves are summed
 * as they are: 2^16 is 1 modulo 0xffff, so csum_finish's folds give the
 * same result as summing the 16-bit words. */
static __always_inline __u64 csum_acc32(__u64 acc, __u32 old, __u32 new)
{
	return acc + (__u32)~old + new;
}

/* csum_acc16 adds the change of a 16-bit field. */
static __always_inline __u64 csum_acc16(__u64 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

/* csum_finish folds the accumulator started from the old checksum and
 * returns the new checksum: HC' = ~(~HC + sum(~m + m')). Folding a plain
 * sum of 16-bit words gives the checksum field's value, and 0 when the
 * words include a correct checksum. */
static __always_inline __u16 csum_finish(__u64 acc)
{
	acc = (acc & 0xffffffff) + (acc >> 32);
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u16)~acc;
}

static __always_inline __u64 csum_start(__u16 check)
{
	return (__u16)~check;
}

#endif
