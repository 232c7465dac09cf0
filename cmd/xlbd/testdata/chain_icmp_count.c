// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* icmp_count counts IPv4 ICMP packets and passes everything: an ordinary
 * xdp-loader program, written in the style of xdp-tools' examples, that
 * chain_e2e_test.go runs after xlb (priority 60) to see what xlb passes.
 * The test compiles it with clang at run time. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <xdp/xdp_helpers.h>

char _license[] SEC("license") = "Dual BSD/GPL";

/* icmp_count[0] is the number of ICMP packets seen. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} icmp_count SEC(".maps");

SEC("xdp")
int icmp_counter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 zero = 0;
	__u64 *n;

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_ICMP)
		return XDP_PASS;
	n = bpf_map_lookup_elem(&icmp_count, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return XDP_PASS;
}

struct {
	__uint(priority, 60);
	__uint(XDP_PASS, 1);
} XDP_RUN_CONFIG(icmp_counter);
