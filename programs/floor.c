// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* The benchmark floor: the cheapest XDP program that transmits, run by
 * the same harness as the pipeline so its cost can be subtracted. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char _license[] SEC("license") = "Dual BSD/GPL";

SEC("xdp")
int xlb_floor(struct xdp_md *ctx)
{
	return XDP_TX;
}
