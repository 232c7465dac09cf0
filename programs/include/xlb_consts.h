/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Constants shared by every xlb stage and by the Go control plane. Every
 * enum here reaches Go through the object's BTF (bpf2go -type, or read by
 * name as the counters are): none is copied by hand. */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

/* Stage slots in the xlb_progs program array. Tail-call indexes are
 * compile-time constants so the JIT emits direct jumps. The Go side names
 * them through the generated xlbXlbStage type (dispatcher.Stage). */
enum xlb_stage {
	XLB_STAGE_PARSE = 0,
	XLB_STAGE_CONNTRACK = 1,
	XLB_STAGE_SELECT = 2,
	XLB_STAGE_REWRITE = 3,
	XLB_STAGE_CONNTRACK6 = 4,
	XLB_STAGE_SELECT6 = 5,
	XLB_STAGE_REWRITE6 = 6,
	XLB_STAGE_MAX = 7,
};

/* Direction of a packet that parse decided xlb owns. */
enum xlb_dir {
	XLB_DIR_FWD = 1, /* client -> VIP */
	XLB_DIR_RET = 2, /* backend -> one of the load balancer's source addresses */
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
	XLB_CF_SYN = 1 << 0,    /* client SYN seen */
	XLB_CF_SYNACK = 1 << 1, /* the backend's SYN-ACK seen */
	XLB_CF_ESTAB = 1 << 2,  /* the client's ACK of that SYN-ACK seen */
	XLB_CF_FIN_C = 1 << 3,  /* an in-window FIN from the client */
	XLB_CF_FIN_B = 1 << 4,  /* an in-window FIN from the backend */
	XLB_CF_RST = 1 << 5,    /* an in-window RST from either side */
	XLB_CF_UDP = 1 << 6,    /* a UDP flow: no handshake, an idle timeout of its own */
	/* A slot whose connection ended (a tombstone): free for a new one,
	 * but scans go on past it. A slot never used has no flags at all,
	 * and scans stop there: no flow of the window lies beyond it. */
	XLB_CF_DEAD = 1 << 31,
};

/* Connection states, derived from the flags (conn_state); each has its
 * idle timeout (struct xlb_cfg.timeout_j). */
enum xlb_ct_state {
	XLB_CT_SYN = 0,         /* only the client's SYN seen */
	XLB_CT_SYN_RECV = 1,    /* the backend answered; the client has not yet */
	XLB_CT_ESTABLISHED = 2, /* the three-way handshake completed */
	XLB_CT_FIN = 3,         /* a FIN seen */
	XLB_CT_CLOSED = 4,      /* a RST, or FINs both ways */
	XLB_CT_UDP = 5,         /* a UDP flow */
	XLB_CT_MAX = 6,
};

/* State of a source-port way (struct xlb_rconn.state). */
enum xlb_port_state {
	XLB_PS_FREE = 0, /* free for a new connection */
	XLB_PS_USED = 1, /* a live connection's return side */
	/* The connection ended: the way still translates its late packets,
	 * and rests for the hold time (xlb_cfg.hold_j) before a new
	 * connection may take it. */
	XLB_PS_HOLD = 2,
};

/* Flags of a source-port way (struct xlb_rconn.flags). */
enum xlb_rconn_flag {
	/* tw_seq holds the backend's next expected sequence number after
	 * the client's FIN: the next connection's ISN must lie after it. */
	XLB_RF_TW_SEQ = 1 << 0,
	/* The way's connection is a UDP flow: TCP packets are not its. */
	XLB_RF_UDP = 1 << 1,
};

/* SYN flood defence (struct xlb_cfg.syn_mode). */
enum xlb_syn_mode {
	XLB_SYN_OFF = 0,  /* never challenge */
	XLB_SYN_AUTO = 1, /* challenge when a backend has too many half-open connections */
	XLB_SYN_ON = 2,   /* always challenge sources not validated recently */
};

/* Per-CPU counters, indexes into xlb_stats. */
enum xlb_stat {
	XLB_STAT_FWD = 0,         /* client->backend packets transmitted */
	XLB_STAT_RET,             /* backend->client packets transmitted */
	XLB_STAT_NEW_CONN,        /* connections created */
	XLB_STAT_RECYCLED,        /* closed or expired entries replaced by a new SYN */
	XLB_STAT_CLOSED,          /* connections closed by FIN/RST */
	XLB_STAT_REDIRECT,        /* transmitted through another interface */
	XLB_STAT_PASS_NOT_IPV4,   /* passed: neither IPv4 nor IPv6 */
	XLB_STAT_PASS_NOT_TCP,    /* passed: neither TCP nor UDP, nor an ICMP error about a flow */
	XLB_STAT_PASS_IP_OPTIONS, /* passed: IPv4 options, not for xlb */
	XLB_STAT_PASS_IPV6_EXT,   /* passed: IPv6 with an extension header other than a fragment header */
	XLB_STAT_PASS_FRAGMENT, /* passed: IPv4 fragment or IPv6 fragment header, not for xlb or not the first */
	XLB_STAT_PASS_NOT_OURS,     /* passed: not for a VIP nor a reply */
	XLB_STAT_DROP_ETH_TRUNC,    /* dropped: IPv4 frame shorter than its headers */
	XLB_STAT_DROP_IP_HDR,       /* dropped: bad version or IHL below 5 */
	XLB_STAT_DROP_IP_LEN,       /* dropped: total length inconsistent with frame */
	XLB_STAT_DROP_TCP_HDR,      /* dropped: TCP data offset below 5 or beyond the packet */
	XLB_STAT_DROP_IP_OPTIONS,   /* dropped: for xlb, with IPv4 options */
	XLB_STAT_DROP_FRAGMENT,     /* dropped: for xlb, the first fragment of a packet (IPv4 or IPv6) */
	XLB_STAT_DROP_NO_CONN,      /* dropped: a RST for a VIP, no entry */
	XLB_STAT_DROP_BAD_SOURCE,   /* dropped: SYN from an address no client can have */
	XLB_STAT_DROP_BAD_CSUM,     /* dropped: SYN with a wrong IPv4 or TCP checksum */
	XLB_STAT_RST_NO_BACKEND,    /* answered with a RST: no usable backend */
	XLB_STAT_RST_NO_PORT,       /* answered with a RST: no free source port for the backend */
	XLB_STAT_RESET_NO_CONN,     /* a segment for a VIP, no entry, not a SYN: answered with a RST */
	XLB_STAT_DROP_NO_BACKEND,   /* dropped: a UDP flow with no usable backend */
	XLB_STAT_DROP_NO_PORT,      /* dropped: a UDP flow with no free source port */
	XLB_STAT_DROP_UDP_HDR,      /* dropped: UDP header cut short or length inconsistent */
	XLB_STAT_DROP_FIB,          /* dropped: no route or neighbour towards the backend */
	XLB_STAT_DROP_CT_RACE,      /* dropped: the connection's slot was being rewritten */
	XLB_STAT_DROP_STALE,        /* dropped: packet of an ended connection whose port moved on */
	XLB_STAT_EVICTED,           /* live connections evicted from a full probe window */
	XLB_STAT_SYN_CHALLENGE,     /* SYNs answered with a challenge (SYN flood defence) */
	XLB_STAT_SYN_VALIDATED,     /* sources validated by their answer to a challenge */
	XLB_STAT_UNTRUSTED_RST_FIN, /* RST or FIN outside the tracked window: forwarded, state kept */
	XLB_STAT_ICMP_ERROR,        /* ICMP errors about a flow translated back to its client */
	XLB_STAT_DROP_INTERNAL,     /* dropped: a stage's internal state was missing */
	XLB_STAT_TAILCALL_FAIL,     /* passed: a stage slot was empty */
	XLB_STAT_MAX,
};

/* Limits, exported to Go through enum xlb_limit (read from BTF). */
enum xlb_limit {
	XLB_MAX_SERVICES = 1024,
	XLB_MAX_BACKENDS = 4096,
	XLB_MAX_SEL_TABLE = 65537, /* entries after the header */
	XLB_MAX_CANDIDATES = 64,   /* least-conn candidate set */
	XLB_MAX_SOURCES = 16,      /* source addresses */
	XLB_SRC_SLOTS = 64,        /* xlb_src_slots: addresses by hash */
	XLB_PORT_TRIES = 16,       /* source-port probes per address per new connection */
	/* Each source port has XLB_PORT_WAYS ways; a backend
	 * (address:port) always uses the way its hash picks, so a port is
	 * unique per backend and claimed with one compare-and-swap. Backends
	 * sharing a way share the port range. */
	XLB_PORT_WAYS_LOG2 = 3,
	XLB_PORT_WAYS = 8,
	/* A flow lives in one of XLB_CT_WAYS consecutive slots of xlb_conns
	 * from its hash; a full window evicts its least recently seen
	 * connection. */
	XLB_CT_WAYS = 8,
	XLB_SYN_OK_SLOTS = 65536, /* xlb_syn_ok: validated sources by hash */
	/* xlb_vip_port.svc when several VIPs use the port: see xlb_services */
	XLB_VIP_MULTI = 0x10000,
	/* How far a RST or FIN may lie from the sequence number the other
	 * side last acknowledged and still change xlb's state of the
	 * connection (RFC 5961 in spirit): a client's within 256 KiB after
	 * the backend's last ACK (a delayed ACK leaves it a little behind),
	 * a backend's within 16 MiB after the client's (a server that
	 * aborts a download has that much in flight). Either may lie up to
	 * 64 KiB before it. Others are forwarded, but change nothing. */
	XLB_WIN_BEFORE = 1 << 16,
	XLB_WIN_CLIENT = 1 << 18,
	XLB_WIN_BACKEND = 1 << 24,
};

#define TCP_FL_FIN 0x01
#define TCP_FL_SYN 0x02
#define TCP_FL_RST 0x04
#define TCP_FL_PSH 0x08
#define TCP_FL_ACK 0x10

#endif
