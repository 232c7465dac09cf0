// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* A chain member the verifier refuses (it reads the packet without a
 * bounds check), with the name of xdp-filter's program so that it can
 * replace xdp-filter's object at the same path, as a broken rebuild would.
 * reload_tx_test.go compiles it with clang at run time. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char _license[] SEC("license") = "Dual BSD/GPL";

SEC("xdp")
int xdpfilt_alw_ip(struct xdp_md *ctx)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] ? XDP_PASS : XDP_DROP;
}
