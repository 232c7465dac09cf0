/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* What every stage uses: counters, verdicts, the scratch and the settings. */
#ifndef XLB_COMMON_H
#define XLB_COMMON_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xlb_maps.h"

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

/* vip_port_key is the index of a port's entry in xlb_vip_ports: TCP
 * ports first, then UDP ports. */
static __always_inline __u32 vip_port_key(__u16 port, __u8 proto)
{
	return (__u32)port | (proto == IPPROTO_UDP ? 0x10000 : 0);
}

/* mark_busy sets bit idx of an occupancy bitmap (xlb_ct_busy,
 * xlb_port_busy), after the slot or way it stands for was filled. */
static __always_inline void mark_busy(void *bitmap, __u32 idx)
{
	__u32 word = idx >> 6;
	__u64 *w = bpf_map_lookup_elem(bitmap, &word);

	if (w && !(*w & (1ULL << (idx & 63))))
		__sync_fetch_and_or(w, 1ULL << (idx & 63));
}

#endif
