/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Constants shared by every xlb stage and by the Go control plane. */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

/* Stage slots in the xlb_progs program array. Tail-call indexes are
 * compile-time constants so the JIT emits direct jumps. dispatcher/stages.go
 * mirrors these through the generated xlbStage type. */
enum xlb_stage {
	XLB_STAGE_PARSE = 0,
	XLB_STAGE_CONNTRACK = 1,
	XLB_STAGE_SELECT = 2,
	XLB_STAGE_REWRITE = 3,
	XLB_STAGE_MAX = 4,
};

/* Direction of a packet that parse decided xlb owns. */
enum xlb_dir {
	XLB_DIR_FWD = 1, /* client -> VIP */
	XLB_DIR_RET = 2, /* backend -> load balancer source address */
};

/* Selection modes of a service's selection table (header entry 0). */
enum xlb_sel_mode {
	XLB_SEL_RANDOM = 1,
	XLB_SEL_HASH = 2,
	XLB_SEL_LEAST_CONN = 3,
	XLB_SEL_ROUND_ROBIN = 4,
};

/* Connection flags (struct xlb_conn.flags); they only ever grow. */
enum xlb_conn_flag {
	XLB_CF_SYN = 1 << 0,   /* client SYN seen */
	XLB_CF_ESTAB = 1 << 1, /* backend SYN-ACK seen */
	XLB_CF_FIN_C = 1 << 2, /* FIN from the client */
	XLB_CF_FIN_B = 1 << 3, /* FIN from the backend */
	XLB_CF_RST = 1 << 4,   /* RST from either side */
	XLB_CF_TW = 1 << 5,    /* the backend closed first: it holds TIME_WAIT */
	/* A slot whose connection ended (a tombstone): free for a new one,
	 * but scans go on past it. A slot never used has no flags at all,
	 * and scans stop there: no flow of the window lies beyond it. */
	XLB_CF_DEAD = 1 << 31,
};

/* State of a source-port way (struct xlb_rconn.state). */
enum xlb_port_state {
	XLB_PS_FREE = 0,    /* the port is free for backends of this way */
	XLB_PS_USED = 1,    /* a connection's return side */
	/* The connection is gone; the way only keeps its port from being
	 * reused while the backend may still hold TIME_WAIT for it. */
	XLB_PS_TW_HOLD = 2,
};

/* Per-CPU counters, indexes into xlb_stats. */
enum xlb_stat {
	XLB_STAT_FWD = 0,               /* client->backend packets transmitted */
	XLB_STAT_RET,               /* backend->client packets transmitted */
	XLB_STAT_NEW_CONN,          /* connections created */
	XLB_STAT_RECYCLED,          /* closed or expired entries replaced by a new SYN */
	XLB_STAT_CLOSED,            /* connections closed by FIN/RST */
	XLB_STAT_REDIRECT,          /* transmitted through another interface */
	XLB_STAT_PASS_NOT_IPV4,     /* passed: not IPv4 */
	XLB_STAT_PASS_NOT_TCP,      /* passed: not TCP */
	XLB_STAT_PASS_IP_OPTIONS,   /* passed: IPv4 options present */
	XLB_STAT_PASS_FRAGMENT,     /* passed: IPv4 fragment */
	XLB_STAT_PASS_NOT_OURS,     /* passed: not for a VIP nor a reply */
	XLB_STAT_DROP_ETH_TRUNC,    /* dropped: IPv4 frame shorter than its headers */
	XLB_STAT_DROP_IP_HDR,       /* dropped: bad version or IHL below 5 */
	XLB_STAT_DROP_IP_LEN,       /* dropped: total length inconsistent with frame */
	XLB_STAT_DROP_TCP_HDR,      /* dropped: TCP data offset below 5 or beyond the packet */
	XLB_STAT_DROP_NO_CONN,      /* dropped: VIP packet, no entry, not a SYN */
	XLB_STAT_DROP_NO_BACKEND,   /* dropped: SYN for a service with no usable backend */
	XLB_STAT_DROP_NO_PORT,      /* dropped: no free source port for that backend */
	XLB_STAT_DROP_FIB,          /* dropped: no route or neighbour towards the backend */
	XLB_STAT_DROP_CT_RACE,      /* dropped: the connection's slot was being rewritten */
	XLB_STAT_EVICTED,           /* live connections evicted from a full probe window */
	XLB_STAT_DROP_INTERNAL,     /* dropped: a stage's internal state was missing */
	XLB_STAT_TAILCALL_FAIL,     /* passed: a stage slot was empty */
	XLB_STAT_MAX,
};

#define XLB_MAX_SERVICES 1024
#define XLB_MAX_BACKENDS 4096
#define XLB_MAX_SEL_TABLE 65537 /* entries after the header */
#define XLB_MAX_CANDIDATES 64   /* least-conn candidate set */
#define XLB_PORT_TRIES 16       /* source-port probes per new connection */
/* Each source port has 8 ways; a backend (address:port) always uses the
 * way its hash picks, so a port is unique per backend and claimed with
 * one compare-and-swap. Backends sharing a way share the port range. */
#define XLB_PORT_WAYS_LOG2 3
#define XLB_PORT_WAYS (1 << XLB_PORT_WAYS_LOG2)
#define XLB_VIP_MULTI 0xffffffff /* several VIPs use the port: see xlb_services */
/* A flow lives in one of XLB_CT_WAYS consecutive slots of xlb_conns from
 * its hash; a full window evicts its least recently seen connection. */
#define XLB_CT_WAYS 8

#define TCP_FL_FIN 0x01
#define TCP_FL_SYN 0x02
#define TCP_FL_RST 0x04
#define TCP_FL_PSH 0x08
#define TCP_FL_ACK 0x10

#endif
