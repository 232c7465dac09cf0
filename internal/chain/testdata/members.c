// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Chain members for internal/chain's tests, compiled with clang when the
 * tests run. VERDICT (default XDP_PASS) is what filter returns for a source
 * it does not block, so the same source built twice with different
 * VERDICTs gives two objects whose code differs; LICENSE (default
 * "Dual BSD/GPL") is the object's license; BROKEN makes filter read the
 * packet without a bounds check, which the verifier refuses. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <xdp/xdp_helpers.h>

#ifndef VERDICT
#define VERDICT XDP_PASS
#endif
#ifndef LICENSE
#define LICENSE "Dual BSD/GPL"
#endif

char _license[] SEC("license") = LICENSE;

/* filter drops IPv4 packets whose source is a key of blocked, as a
 * DDoS filter's block list would, and counts its runs in .bss. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);   /* IPv4 source address, network order */
	__type(value, __u32); /* unused */
} blocked SEC(".maps");

__u64 runs;

SEC("xdp")
int filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	__sync_fetch_and_add(&runs, 1);
#ifdef BROKEN
	if (((__u8 *)data)[30] == 0)
		return XDP_DROP;
#endif
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return VERDICT;
	if (bpf_map_lookup_elem(&blocked, &ip->saddr))
		return XDP_DROP;
	return VERDICT;
}

/* high_prio declares a priority above the chain's 0..1000. */
SEC("xdp")
int high_prio(struct xdp_md *ctx)
{
	return XDP_PASS;
}
struct {
	__uint(priority, 2000);
	__uint(XDP_PASS, 1);
} XDP_RUN_CONFIG(high_prio);

/* no_actions declares a run configuration with no verdict to go on
 * after: an empty continue-on set. */
SEC("xdp")
int no_actions(struct xdp_md *ctx)
{
	return XDP_PASS;
}
struct {
	__uint(priority, 10);
	__uint(XDP_PASS, 0);
} XDP_RUN_CONFIG(no_actions);

/* unchecked reads the packet without a bounds check: the verifier
 * refuses it. */
SEC("xdp")
int unchecked(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] ? XDP_PASS : XDP_DROP;
}
