/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by the stages and the Go control plane (bpf2go -type). */
#ifndef XLB_STRUCTS_H
#define XLB_STRUCTS_H

#include <linux/types.h>
#include "xlb_consts.h"

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
	__u32 id;    /* index into xlb_sel, xlb_rr and xlb_svc_src */
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
	__s64 active;     /* open connections: +1 on create, -1 on close or expiry */
	__u64 new_conns;  /* connections created, ever */
	__s64 half_open;  /* connections whose handshake is not complete */
	__u64 no_port;    /* SYNs refused for want of a free source port */
	__u64 nh_j;       /* when nh was looked up (jiffies); 0: never */
	struct xlb_nh nh; /* towards the backend, shared by its new connections */
};

/* The fields struct xlb_conn and struct xlb_conn6 start with, at the same
 * offsets, so the daemon reads both families' slots through one type,
 * struct xlb_conn_head:
 * - seq: even: stable; odd: being written. Taken by compare-and-swap;
 * - flags: enum xlb_conn_flag, set with atomic or; 0: free slot;
 * - last_seen_j: last client packet, jiffies;
 * - seq_delta: the backend-side ISN minus the client's, added to the
 *   client's sequence numbers, taken from the backend's acknowledgements;
 * - isn_b: the backend's ISN, from its SYN-ACK;
 * - ack_c: the client's latest acknowledgement (backend sequence space);
 * - src_idx: index of laddr in xlb_src;
 * - lport: the source port towards the backend. */
#define XLB_CONN_HEAD      \
	__u32 seq;         \
	__u32 flags;       \
	__u64 last_seen_j; \
	__u32 backend_id;  \
	__u32 seq_delta;   \
	__u32 isn_b;       \
	__u32 ack_c;       \
	__u32 src_idx;     \
	__be16 bport;      \
	__be16 lport

struct xlb_conn_head {
	XLB_CONN_HEAD;
};

/* A slot of xlb_conns, the connection table: a client flow and how to
 * rewrite its packets. One cache line. See docs/stage-abi.md for the
 * protocol that lets CPUs and the daemon share slots without locks. The
 * head is struct xlb_conn_head's; the addresses come after. */
struct xlb_conn {
	XLB_CONN_HEAD;
	struct xlb_flow key;
	__be32 laddr; /* the source address towards the backend */
	__be32 baddr; /* backend */
};

/* The fields struct xlb_rconn and struct xlb_rconn6 start with, at the
 * same offsets, as struct xlb_rconn_head:
 * - state: enum xlb_port_state, claimed with compare-and-swap;
 * - flags: enum xlb_rconn_flag;
 * - bport, cport, vport: the backend holding the way, the client, the VIP;
 * - last_seen_j: low 32 bits of the jiffies of the last backend packet;
 *   in XLB_PS_HOLD, when the hold began (late packets of the ended
 *   connection extend it);
 * - nh_j: low 32 bits of the jiffies when nh was looked up;
 * - seq_delta: as in struct xlb_conn;
 * - tw_seq: see XLB_RF_TW_SEQ;
 * - ack_b: the backend's latest acknowledgement (backend sequence space);
 * - nh: towards the client. */
#define XLB_RCONN_HEAD     \
	__u32 state;       \
	__u16 flags;       \
	__be16 bport;      \
	__be16 cport;      \
	__be16 vport;      \
	__u32 last_seen_j; \
	__u32 backend_id;  \
	__u32 nh_j;        \
	__u32 seq_delta;   \
	__u32 tw_seq;      \
	__u32 ack_b;       \
	struct xlb_nh nh

struct xlb_rconn_head {
	XLB_RCONN_HEAD;
};

/* Value of xlb_ports, one way of a source port: the return side of a
 * connection, how to rewrite the backend's replies. One cache line. The
 * head is struct xlb_rconn_head's; the addresses come after. */
struct xlb_rconn {
	XLB_RCONN_HEAD;
	__be32 baddr;
	__be32 caddr;
	__be32 vaddr;
};

/* Value of xlb_bk_ctr: a backend's traffic on one CPU, by direction
 * (enum xlb_dir - 1: 0 client to backend, 1 backend to client); bytes are
 * IP packet lengths (IPv4 total length, IPv6 40 + payload length). */
struct xlb_traffic {
	__u64 packets[2];
	__u64 bytes[2];
};

/* Value of xlb_vip_ports: which VIP uses a TCP port. */
struct xlb_vip_port {
	__be32 addr; /* the VIP when svc names one service */
	__u32 svc;   /* 0: none; service id + 1; XLB_VIP_MULTI: several */
};

/* Value of xlb_src_slots: a source address and its index in xlb_src. */
struct xlb_src_slot {
	__be32 addr;
	__u32 idx; /* index + 1; 0: empty slot */
};

/* Value of xlb_syn_ok: a source that answered a SYN challenge. */
struct xlb_trusted {
	__be32 addr;
	__u32 until_j; /* low 32 bits of the jiffies until which it is trusted */
};

/* An IPv6 flow as it appears on the wire: the key of a connection in
 * xlb_conns6. */
struct xlb_flow6 {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Key of xlb_services6. */
struct xlb_vip6 {
	__u32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Value of xlb_backends6: an IPv6 backend, by the same ids as
 * xlb_backends. */
struct xlb_backend6 {
	__u32 addr[4];
	__be16 port;
	__u16 weight; /* 0: not selectable */
};

/* A slot of xlb_conns6: struct xlb_conn for an IPv6 flow, the same
 * head. Two cache lines. */
struct xlb_conn6 {
	XLB_CONN_HEAD;
	struct xlb_flow6 key;
	__u32 laddr[4];
	__u32 baddr[4];
	__u64 pad[2];
};

/* Value of xlb_ports6: struct xlb_rconn for an IPv6 connection, the same
 * head. Two cache lines. */
struct xlb_rconn6 {
	XLB_RCONN_HEAD;
	__u32 baddr[4];
	__u32 caddr[4];
	__u32 vaddr[4];
	__u32 pad[7];
};

/* Value of xlb_vip_ports6: which IPv6 VIP uses a port. */
struct xlb_vip_port6 {
	__u32 addr[4];
	__u32 svc; /* as struct xlb_vip_port's */
};

/* Value of xlb_src6_slots. */
struct xlb_src6_slot {
	__u32 addr[4];
	__u32 idx; /* index + 1; 0: empty slot */
};

/* Runtime settings, single entry of xlb_settings. */
struct xlb_cfg {
	__u16 port_lo; /* source port range, host order, inclusive */
	__u16 port_hi;
	__u32 nports;                /* port_hi - port_lo + 1 */
	__u32 ct_mask;               /* xlb_conns has ct_mask + 1 slots (a power of two) */
	__be32 src0;                 /* the first source address (xlb_src[0]) */
	__u32 src_mult;              /* xlb_src_slots index: (addr * src_mult) >> 26; 0: only src0 */
	__u32 isn_key[2];            /* secret of the ISN hash */
	__u32 cookie_key[2];         /* secret of the SYN challenge cookie */
	__u32 isn_per_j;             /* ISN clock: increments per jiffy (about 4 per microsecond) */
	__u32 hold_j;                /* how long a port rests after its connection ended */
	__u32 syn_mode;              /* enum xlb_syn_mode */
	__u32 syn_half_open;         /* per backend: half-open connections that start the defence */
	__u32 syn_ok_j;              /* how long a validated source skips the challenge */
	__u32 cookie_shift;          /* the cookie's clock: jiffies >> cookie_shift */
	__u32 src6_0[4];             /* the first IPv6 source address (xlb_src6[0]) */
	__u32 src6_mult;             /* xlb_src6_slots index, as src_mult */
	__u32 ct6_mask;              /* xlb_conns6 has ct6_mask + 1 slots */
	__u64 nh_ttl_j;              /* next hops are refreshed from the FIB after this */
	__u64 timeout_j[XLB_CT_MAX]; /* idle timeouts by enum xlb_ct_state */
};

/* Per-packet state handed from stage to stage (xlb_scratch, per CPU).
 * See docs/stage-abi.md. */
struct xlb_pkt {
	struct xlb_flow flow;    /* parse: as received */
	struct xlb_vip_port vip; /* parse: the VIP port's entry (forward) */
	__u32 svc_id;            /* conntrack/select: the service of a new flow */
	__u8 dir;                /* parse: enum xlb_dir */
	__u8 tcp_flags;          /* parse: TCP flags byte */
	__u8 src_idx;            /* parse: the source address of a reply (return) */
	/* parse: an ICMP error about a flow's packet to its backend; flow
	 * then describes that packet seen as a reply (backend -> source
	 * address), so that conntrack finds its way as for a reply. */
	__u8 icmp;
	__u32 backend_id; /* conntrack/select: the connection's backend */
	/* conntrack/select: the rewrite to apply */
	__be32 new_saddr;
	__be32 new_daddr;
	__be16 new_sport;
	__be16 new_dport;
	__u32 seq_delta; /* added to seq (forward), taken from ack and SACK (return) */
	struct xlb_nh nh;
	/* IPv6 (the stages of slots 4 to 6): as flow, vip, new_saddr and
	 * new_daddr. */
	struct xlb_flow6 flow6;
	struct xlb_vip_port6 vip6;
	__u32 new_saddr6[4];
	__u32 new_daddr6[4];
};

/* The layouts the comments above promise. */
_Static_assert(sizeof(struct xlb_conn) == 64, "struct xlb_conn is one cache line");
_Static_assert(sizeof(struct xlb_rconn) == 64, "struct xlb_rconn is one cache line");
_Static_assert(sizeof(struct xlb_conn6) == 128, "struct xlb_conn6 is two cache lines");
_Static_assert(sizeof(struct xlb_rconn6) == 128, "struct xlb_rconn6 is two cache lines");
_Static_assert(__builtin_offsetof(struct xlb_conn, key) == __builtin_offsetof(struct xlb_conn6, key),
	       "struct xlb_conn and xlb_conn6 share their fields up to key");
_Static_assert(__builtin_offsetof(struct xlb_rconn, baddr) == __builtin_offsetof(struct xlb_rconn6, baddr),
	       "struct xlb_rconn and xlb_rconn6 share their fields up to baddr");

#endif
