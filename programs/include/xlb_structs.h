/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by the stages and the Go control plane (bpf2go -type). */
#ifndef XLB_STRUCTS_H
#define XLB_STRUCTS_H

#include <linux/types.h>

/* A TCP flow as it appears on the wire, addresses and ports in network
 * order. The key of a connection in xlb_conns (client -> VIP). */
struct xlb_flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Key of xlb_services. */
struct xlb_vip {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct xlb_service {
	__u32 id;    /* index into xlb_sel and xlb_rr */
	__u32 flags; /* reserved */
};

struct xlb_backend {
	__be32 addr;
	__be16 port;
	__u16 weight; /* 0: not selectable */
};

/* A cached next hop, filled from bpf_fib_lookup. */
struct xlb_nh {
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};

/* A backend's runtime state, shared (not per-CPU) so least-conn sees one
 * figure; counters updated atomically. */
struct xlb_backend_stats {
	__s64 active;    /* open connections: +1 on create, -1 on close or expiry */
	__u64 new_conns; /* connections created, ever */
	__u64 port_seq;  /* source-port cursor: allocations walk the range */
	__u64 nh_j;      /* when nh was looked up (jiffies); 0: never */
	struct xlb_nh nh; /* towards the backend, shared by its new connections */
};

/* A slot of xlb_conns, the connection table: a client flow and how to
 * rewrite its packets (source = the source address and lport, destination
 * = the backend). One cache line. See docs/stage-abi.md for the protocol
 * that lets CPUs and the daemon share slots without locks. */
struct xlb_conn {
	__u32 seq;   /* even: stable; odd: being written. Taken by compare-and-swap */
	__u32 flags; /* enum xlb_conn_flag, set with atomic or; 0: free slot */
	struct xlb_flow key;
	__be32 baddr; /* backend */
	__be16 bport;
	__be16 lport;
	__u32 backend_id;
	__u32 pad;
	__u64 last_seen_j; /* last client packet, jiffies */
	__u64 pad2[2];
};

/* Value of xlb_ports, one way of a source port: the return side of a
 * connection, how to rewrite the backend's replies. */
struct xlb_rconn {
	__u32 state;  /* enum xlb_port_state, claimed with compare-and-swap */
	__be32 baddr; /* the backend holding the way */
	__be16 bport;
	__be16 cport;
	__be32 caddr; /* client */
	__be32 vaddr; /* VIP */
	__be16 vport;
	__u16 pad;
	__u64 last_seen_j; /* last backend packet, jiffies */
	__u64 nh_j;
	struct xlb_nh nh; /* towards the client */
};

/* Value of xlb_vip_ports: which VIP uses a TCP port. */
struct xlb_vip_port {
	__be32 addr; /* the VIP when svc names one service */
	__u32 svc;   /* 0: none; service id + 1; XLB_VIP_MULTI: several */
};

/* Runtime settings, single entry of xlb_cfg. */
struct xlb_cfg {
	__be32 snat_addr; /* source address towards backends */
	__u16 port_lo;    /* source port range, host order, inclusive */
	__u16 port_hi;
	__u32 ct_mask;      /* xlb_conns has ct_mask + 1 slots (a power of two) */
	__u32 pad;
	__u64 nh_ttl_j;     /* next hops are refreshed from the FIB after this */
	__u64 timeout_j[4]; /* enum xlb_ct_state: syn, established, fin, closed */
};

enum xlb_ct_state {
	XLB_CT_SYN = 0,
	XLB_CT_ESTABLISHED = 1,
	XLB_CT_FIN = 2,
	XLB_CT_CLOSED = 3,
};

/* Per-packet state handed from stage to stage (xlb_scratch, per CPU).
 * See docs/stage-abi.md. */
struct xlb_pkt {
	struct xlb_flow flow; /* parse: as received */
	struct xlb_vip_port vip; /* parse: the VIP port's entry (forward) */
	__u32 svc_id;         /* conntrack/select: the service of a new flow */
	__u8 dir;             /* parse: enum xlb_dir */
	__u8 tcp_flags;       /* parse: TCP flags byte */
	__u16 pad;
	/* conntrack/select: the rewrite to apply */
	__be32 new_saddr;
	__be32 new_daddr;
	__be16 new_sport;
	__be16 new_dport;
	struct xlb_nh nh;
};

#endif
