// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Runs the data path's own functions on inputs a test gives it, so the Go
 * mirrors of them (dispatcher/conntrack.go) can be compared with the C
 * (TestMirrorsAgree). The packet is a struct mirror_io: the test fills
 * the inputs, the program writes the outputs in place and transmits it. */

#include "xlb_common.h"
#include "xlb_hash.h"
#include "xlb_ports.h"
#include "xlb_conn.h"

char _license[] SEC("license") = "Dual BSD/GPL";

struct mirror_io {
	/* inputs */
	struct xlb_flow flow;
	__u32 flags; /* enum xlb_conn_flag bits */
	__be32 baddr;
	__be16 bport;
	__u16 pad;
	/* outputs */
	__u32 flow_hash;
	__u32 port_way;
	__u32 closed;
	__u32 half_open;
	__u32 state;
};

/* Keeps the type in the object's BTF for bpf2go -type. */
const struct mirror_io *unused_mirror_io __attribute__((unused));

SEC("xdp")
int xlb_mirror(struct xdp_md *ctx)
{
	struct mirror_io *io = (void *)(long)ctx->data;

	if ((void *)(io + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	io->flow_hash = flow_hash(&io->flow);
	io->port_way = port_way(io->baddr, io->bport);
	io->closed = conn_closed(io->flags);
	io->half_open = conn_half_open(io->flags);
	io->state = conn_state(io->flags);
	return XDP_TX;
}
