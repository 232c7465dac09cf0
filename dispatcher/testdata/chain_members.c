// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Chain members for dispatcher/chain_test.go, written the way xdp-tools'
 * examples are: plain SEC("xdp") programs with libxdp's XDP_RUN_CONFIG.
 * Each member appends its id to a trace in the packet (byte TRACE_OFF holds
 * the count, the ids follow) and returns a fixed verdict, so a test reads
 * from the output packet which members ran and in which order. The
 * tests compile this file with clang at run time. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <xdp/xdp_helpers.h>

#define TRACE_OFF 54 /* after Ethernet, IPv4 and TCP headers */
#define TRACE_LEN 16

char _license[] SEC("license") = "Dual BSD/GPL";

/* trace is a real subprogram in every member (noinline): the chain
 * builder must keep each member's copy apart. */
static __attribute__((noinline)) int trace(struct xdp_md *ctx, __u8 id, int verdict)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *end = (void *)(long)ctx->data_end;
	__u8 *t = data + TRACE_OFF;
	__u8 *slot;
	__u8 n;

	if (t + TRACE_LEN > end)
		return XDP_ABORTED;
	n = t[0];
	if (n >= TRACE_LEN - 1)
		return XDP_ABORTED;
	slot = t + 1 + n;
	if (slot + 1 > end)
		return XDP_ABORTED;
	t[0] = n + 1;
	*slot = id;
	return verdict;
}

#define MEMBER(name, id, verdict)               \
	SEC("xdp")                              \
	int name(struct xdp_md *ctx)            \
	{                                       \
		return trace(ctx, id, verdict); \
	}

MEMBER(pass_a, 'a', XDP_PASS)
MEMBER(pass_b, 'b', XDP_PASS)
MEMBER(pass_c, 'c', XDP_PASS)
MEMBER(drop_d, 'd', XDP_DROP)
MEMBER(tx_t, 't', XDP_TX)
MEMBER(redirect_r, 'r', XDP_REDIRECT)
MEMBER(aborted_x, 'x', XDP_ABORTED)

/* Members that declare a run configuration: priorities 10 and 90, and one
 * that lets the chain go on after XDP_DROP. */
MEMBER(early_e, 'e', XDP_PASS)
struct {
	__uint(priority, 10);
	__uint(XDP_PASS, 1);
} XDP_RUN_CONFIG(early_e);

MEMBER(late_l, 'l', XDP_PASS)
struct {
	__uint(priority, 90);
	__uint(XDP_PASS, 1);
} XDP_RUN_CONFIG(late_l);

MEMBER(soft_s, 's', XDP_DROP)
struct {
	__uint(priority, 20);
	__uint(XDP_PASS, 1);
	__uint(XDP_DROP, 1);
} XDP_RUN_CONFIG(soft_s);

/* globals uses .rodata, .data and .bss: its id is a constant, it counts
 * its runs and adds a step set in .data. */
volatile const __u8 global_id = 'g';
__u64 global_runs;
__u64 global_step = 1;

SEC("xdp")
int globals(struct xdp_md *ctx)
{
	__sync_fetch_and_add(&global_runs, global_step);
	return trace(ctx, global_id, XDP_PASS);
}

/* counter keeps its own map, like an xdp-tools program would. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter_map SEC(".maps");

SEC("xdp")
int counter(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&counter_map, &zero);

	if (v)
		__sync_fetch_and_add(v, 1);
	return trace(ctx, 'k', XDP_PASS);
}

/* unchecked reads the packet without a bounds check: the verifier
 * refuses it. */
SEC("xdp")
int unchecked(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] ? XDP_PASS : XDP_DROP;
}

/* not_xdp is a tc program: not a chain member. */
SEC("tc")
int not_xdp(struct __sk_buff *skb)
{
	return 0;
}

/* pass_only is the cheapest member, for the chain benchmark. */
SEC("xdp")
int pass_only(struct xdp_md *ctx)
{
	return XDP_PASS;
}
