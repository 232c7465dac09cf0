// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* The xlb pipeline: a dispatcher and four stages chained by tail calls
 * through xlb_progs. Per-packet state travels in xlb_scratch; the layout
 * and each stage's contract are in docs/stage-abi.md. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xlb_consts.h"
#include "xlb_structs.h"
#include "xlb_maps.h"
#include "xlb_csum.h"
#include "xlb_common.h"
#include "xlb_hash.h"
#include "xlb_fib.h"
#include "xlb_ports.h"
#include "xlb_conn.h"
#include "xlb_ct.h"
#include "xlb_tcp.h"
#include "xlb_syn.h"

char _license[] SEC("license") = "Dual BSD/GPL";

/* Whether rewrite counts each backend's traffic (xlb_bk_ctr); set at
 * load time, and the verifier removes the code when it is 0. Off only to
 * measure what counting costs. */
volatile const __u32 xlb_count_traffic = 1;

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Force BTF for the types the control plane reads (bpf2go -type, or by
 * name: the counters and the limits). */
const enum xlb_stage *unused_stage __attribute__((unused));
const enum xlb_stat *unused_stat __attribute__((unused));
const enum xlb_sel_mode *unused_mode __attribute__((unused));
const enum xlb_conn_flag *unused_flag __attribute__((unused));
const enum xlb_dir *unused_dir __attribute__((unused));
const enum xlb_ct_state *unused_ct __attribute__((unused));
const enum xlb_port_state *unused_pstate __attribute__((unused));
const enum xlb_rconn_flag *unused_rflag __attribute__((unused));
const enum xlb_syn_mode *unused_synmode __attribute__((unused));
const enum xlb_limit *unused_limit __attribute__((unused));
const struct xlb_pkt *unused_pkt __attribute__((unused));
const struct xlb_vip_port *unused_vport __attribute__((unused));
const struct xlb_src_slot *unused_src __attribute__((unused));
const struct xlb_trusted *unused_synok __attribute__((unused));
const struct xlb_traffic *unused_traffic __attribute__((unused));

/* xlb_clock publishes the data path's clock (jiffies) in xlb_now; the
 * daemon runs it with BPF_PROG_TEST_RUN to age connections. */
SEC("xdp")
int xlb_clock(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *now = bpf_map_lookup_elem(&xlb_now, &zero);

	if (now)
		*now = bpf_jiffies64();
	return XDP_PASS;
}

/* xlb_dispatch is the entry point attached to the interface. */
SEC("xdp")
int xlb_dispatch(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_PARSE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* source_index returns the index + 1 of daddr in xlb_src, or 0 when it is
 * none of the source addresses. The first is compared directly, so one
 * source address costs replies no lookup. */
static __always_inline __u32 source_index(const struct xlb_cfg *cfg, __be32 daddr)
{
	struct xlb_src_slot *s;
	__u32 slot;

	if (daddr == cfg->src0)
		return 1;
	if (!cfg->src_mult)
		return 0;
	slot = (daddr * cfg->src_mult) >> 26;
	s = bpf_map_lookup_elem(&xlb_src_slots, &slot);
	if (!s || s->addr != daddr)
		return 0;
	return s->idx;
}

/* ICMP errors that may be about a flow's packet (RFC 792). */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_HLEN 8

/* parse_icmp takes an ICMP error about a packet xlb sent to a backend (its
 * quoted header from one of the source addresses, in the source-port
 * range) to conntrack, described as the reply it would be, so that the
 * error reaches the client translated back: path MTU discovery needs the
 * "fragmentation needed" errors of the path between the load balancer and
 * a backend. Other ICMP (echo requests to a VIP, errors about the host's
 * own packets) goes to the kernel. */
static __always_inline int parse_icmp(struct xdp_md *ctx, struct iphdr *ip, __u32 hlen, __u32 tot_len)
{
	void *end = (void *)(long)ctx->data_end;
	__u8 *icmp = (void *)ip + 20;
	struct iphdr *in = (void *)ip + 20 + ICMP_HLEN;
	struct udphdr *l4 = (void *)(in + 1);
	struct xlb_cfg *cfg;
	struct xlb_pkt *p;
	__u32 src;
	__u16 sport;

	if (hlen != 20 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) || (void *)(l4 + 1) > end ||
	    tot_len < 20 + ICMP_HLEN + 20 + 8)
		return pass(XLB_STAT_PASS_NOT_TCP);
	if (icmp[0] != ICMP_DEST_UNREACH && icmp[0] != ICMP_TIME_EXCEEDED)
		return pass(XLB_STAT_PASS_NOT_TCP);
	if (in->version != 4 || in->ihl != 5 || (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
		return pass(XLB_STAT_PASS_NOT_TCP);
	p = scratch();
	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	src = source_index(cfg, in->saddr);
	sport = bpf_ntohs(l4->source);
	if (!src || in->saddr != ip->daddr || sport < cfg->port_lo || sport > cfg->port_hi)
		return pass(XLB_STAT_PASS_NOT_TCP);
	p->flow.saddr = in->daddr;
	p->flow.daddr = in->saddr;
	p->flow.sport = l4->dest;
	p->flow.dport = l4->source;
	p->flow.proto = in->protocol;
	p->tcp_flags = 0;
	p->dir = XLB_DIR_RET;
	p->src_idx = src - 1;
	p->icmp = 1;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* xlb_parse validates Ethernet/IPv4/TCP and decides whether the packet is
 * for a VIP (forward), a reply to one of xlb's source addresses (return)
 * or neither (passed to the kernel untouched). */
SEC("xdp")
int xlb_parse(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct xlb_vip_port *vp = NULL;
	struct udphdr *udp;
	struct tcphdr *tcp;
	struct iphdr *ip;
	struct xlb_pkt *p;
	struct xlb_cfg *cfg;
	__u32 tot_len, hlen, doff, src, port;
	__u16 dport;
	__u8 dir = 0, proto, flags = 0;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return pass(XLB_STAT_PASS_NOT_IPV4);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return drop(XLB_STAT_DROP_ETH_TRUNC);
	if (ip->version != 4 || ip->ihl < 5)
		return drop(XLB_STAT_DROP_IP_HDR);
	tot_len = bpf_ntohs(ip->tot_len);
	hlen = ip->ihl * 4;
	if (tot_len < hlen || data + sizeof(*eth) + tot_len > end)
		return drop(XLB_STAT_DROP_IP_LEN);
	proto = ip->protocol;
	if (proto == IPPROTO_ICMP)
		return parse_icmp(ctx, ip, hlen, tot_len);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return pass(XLB_STAT_PASS_NOT_TCP);
	/* A later fragment has no ports to tell whose it is; the kernel
	 * drops it once its first fragment (dropped below if it is xlb's)
	 * never comes. */
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return pass(XLB_STAT_PASS_FRAGMENT);
	/* TCP and UDP headers both start with the ports. */
	tcp = (void *)ip + hlen;
	udp = (void *)ip + hlen;
	if (proto == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end || tot_len < hlen + sizeof(*tcp))
			return drop(XLB_STAT_DROP_TCP_HDR);
		doff = tcp->doff * 4;
		if (doff < sizeof(*tcp) || hlen + doff > tot_len)
			return drop(XLB_STAT_DROP_TCP_HDR);
		flags = ((__u8 *)tcp)[13];
	} else {
		if ((void *)(udp + 1) > end || bpf_ntohs(udp->len) < sizeof(*udp) ||
		    hlen + bpf_ntohs(udp->len) > tot_len)
			return drop(XLB_STAT_DROP_UDP_HDR);
	}

	p = scratch();
	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	dport = bpf_ntohs(udp->dest);
	src = source_index(cfg, ip->daddr);
	if (src && dport >= cfg->port_lo && dport <= cfg->port_hi) {
		dir = XLB_DIR_RET;
	} else {
		/* A port some VIP uses: when one VIP does, its service
		 * comes with the port's entry, so established traffic pays
		 * for no hash lookup. */
		port = vip_port_key(dport, proto);
		vp = bpf_map_lookup_elem(&xlb_vip_ports, &port);
		if (vp && vp->svc && (vp->svc == XLB_VIP_MULTI || vp->addr == ip->daddr))
			dir = XLB_DIR_FWD;
	}
	if (dir == XLB_DIR_FWD && vp && vp->svc == XLB_VIP_MULTI &&
	    (hlen != 20 || (ip->frag_off & bpf_htons(IP_MF)))) {
		/* Options or a fragment on a port several VIPs share:
		 * whether it is xlb's decides between drop and pass. */
		struct xlb_vip key = { .addr = ip->daddr, .port = udp->dest, .proto = proto };

		if (!bpf_map_lookup_elem(&xlb_services, &key))
			dir = 0;
	}
	if (!dir) {
		if (hlen != 20)
			return pass(XLB_STAT_PASS_IP_OPTIONS);
		if (ip->frag_off & bpf_htons(IP_MF))
			return pass(XLB_STAT_PASS_FRAGMENT);
		return pass(XLB_STAT_PASS_NOT_OURS);
	}
	/* xlb's own traffic never goes to the host's stack, which would
	 * answer a flow it does not know with a RST. */
	if (hlen != 20)
		return drop(XLB_STAT_DROP_IP_OPTIONS);
	if (ip->frag_off & bpf_htons(IP_MF))
		return drop(XLB_STAT_DROP_FRAGMENT);

	p->flow.saddr = ip->saddr;
	p->flow.daddr = ip->daddr;
	p->flow.sport = udp->source;
	p->flow.dport = udp->dest;
	p->flow.proto = proto;
	p->tcp_flags = flags;
	p->dir = dir;
	p->icmp = 0;
	if (dir == XLB_DIR_RET) {
		p->src_idx = src - 1;
	} else if (vp) {
		p->vip = *vp;
	}
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* tcp_at returns the TCP header of a packet parse accepted. */
static __always_inline struct tcphdr *tcp_at(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + XLB_TCP_OFF;

	if ((void *)(tcp + 1) > end)
		return NULL;
	return tcp;
}

/* tcp_payload_len returns how many bytes of data a packet parse accepted
 * carries. */
static __always_inline __u32 tcp_payload_len(struct xdp_md *ctx, const struct tcphdr *tcp)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + XLB_IP_OFF;

	if ((void *)(ip + 1) > end)
		return 0;
	return bpf_ntohs(ip->tot_len) - sizeof(*ip) - tcp->doff * 4;
}

/* service_of finds the service of a VIP flow for a packet without a
 * connection and stores its id for select: from the port's entry when
 * one VIP uses the port, from xlb_services when several do. */
static __always_inline int service_of(struct xlb_pkt *p)
{
	if (p->vip.svc != XLB_VIP_MULTI) {
		if (!p->vip.svc || p->vip.addr != p->flow.daddr)
			return 0;
		p->svc_id = p->vip.svc - 1;
		return 1;
	}
	struct xlb_vip vip = {
		.addr = p->flow.daddr,
		.port = p->flow.dport,
		.proto = p->flow.proto,
	};
	struct xlb_service *svc = bpf_map_lookup_elem(&xlb_services, &vip);

	if (!svc)
		return 0;
	p->svc_id = svc->id;
	return 1;
}

/* forward_along hands the rewrite of an existing connection, read from
 * its slot at seq, to the rewrite stage. */
static __always_inline int forward_along(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 struct xlb_conn *c, __u32 seq, __u64 now)
{
	struct xlb_backend_stats *bs;

	c->last_seen_j = now;
	p->new_saddr = c->laddr;
	p->new_daddr = c->baddr;
	p->new_sport = c->lport;
	p->new_dport = c->bport;
	p->seq_delta = c->seq_delta;
	p->backend_id = c->backend_id;
	bs = backend_nexthop(ctx, cfg, c->backend_id, c->laddr, c->baddr, now);
	if (!bs)
		return drop(XLB_STAT_DROP_FIB);
	p->nh = bs->nh;
	if (!ct_stable(c, seq))
		return drop(XLB_STAT_DROP_CT_RACE);
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* fwd_control follows a client's FIN or RST, and forwards any packet of
 * an ended connection only while its source port is still its own. It
 * returns 0 to go on, or a verdict. */
static __always_inline int fwd_control(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
				       struct xlb_conn *c, struct tcphdr *tcp, __u64 now)
{
	struct xlb_rconn *r = port_entry(cfg, c->src_idx, bpf_ntohs(c->lport), c->baddr, c->bport);
	__u8 fl = p->tcp_flags;
	__u32 seqb;

	if (!r || !port_owned(r, c))
		return drop(XLB_STAT_DROP_STALE);
	if (!(fl & (TCP_FL_FIN | TCP_FL_RST)))
		return 0;
	seqb = bpf_ntohl(tcp->seq) + c->seq_delta;
	if (!in_window(seqb, r->ack_b, XLB_WIN_CLIENT)) {
		count(XLB_STAT_UNTRUSTED_RST_FIN);
		return 0;
	}
	if (fl & TCP_FL_RST) {
		conn_mark(c, XLB_CF_RST, r, now);
		return 0;
	}
	/* The backend's next expected sequence number once it has the
	 * FIN: the next connection on this port must start after it. */
	r->tw_seq = seqb + tcp_payload_len(ctx, tcp) + 1;
	r->flags |= XLB_RF_TW_SEQ;
	conn_mark(c, XLB_CF_FIN_C, r, now);
	return 0;
}

/* conntrack_udp forwards a UDP packet along its flow, or hands the first
 * packet of a new flow to select. */
static __always_inline int conntrack_udp(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 __u64 now)
{
	__u32 seq;
	struct xlb_conn *c = ct_find(cfg, &p->flow, &seq);

	if (c)
		return forward_along(ctx, cfg, p, c, seq, now);
	if (!service_of(p))
		return pass(XLB_STAT_PASS_NOT_OURS);
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_SELECT);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* client_addr_ok reports whether a packet's source address could be a
 * client's: not 0/8, loopback, multicast, reserved or broadcast, and not
 * the VIP itself. */
static __always_inline int client_addr_ok(__be32 saddr, __be32 daddr)
{
	__u32 top = bpf_ntohl(saddr) >> 24;

	return top != 0 && top != 127 && top < 224 && saddr != daddr;
}

/* reset_stray answers a segment for a VIP that belongs to no connection
 * (its entry expired, was ended by the control plane, or never existed)
 * with a RST, as a host answers a segment for a closed port (RFC 9293
 * 3.10.7.1): the client learns at once that its connection is gone
 * instead of retransmitting into silence. Only a segment whose source
 * could be a client and whose checksums are right is answered. */
static __always_inline int reset_stray(struct xdp_md *ctx, struct xlb_pkt *p, struct tcphdr *tcp, __u8 fl)
{
	__u32 len;

	if (!client_addr_ok(p->flow.saddr, p->flow.daddr))
		return drop(XLB_STAT_DROP_BAD_SOURCE);
	if (!l4_csum_ok(ctx, IPPROTO_TCP))
		return drop(XLB_STAT_DROP_BAD_CSUM);
	count(XLB_STAT_RESET_NO_CONN);
	if (fl & TCP_FL_ACK)
		return tcp_reply(ctx, TCP_FL_RST, bpf_ntohl(tcp->ack_seq), 0);
	len = tcp_payload_len(ctx, tcp) + !!(fl & TCP_FL_SYN) + !!(fl & TCP_FL_FIN);
	return tcp_reply(ctx, TCP_FL_RST | TCP_FL_ACK, 0, bpf_ntohl(tcp->seq) + len);
}

static __always_inline int conntrack_fwd(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 __u64 now)
{
	__u8 fl = p->tcp_flags;
	struct xlb_conn *c;
	struct tcphdr *tcp;
	__u32 seq, flags;
	int v;

	if (p->flow.proto == IPPROTO_UDP)
		return conntrack_udp(ctx, cfg, p, now);
	/* A SYN goes straight to select, which finds an existing
	 * connection of its flow while it looks for a slot. */
	if ((fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_SYN) {
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_SELECT);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	tcp = tcp_at(ctx);
	if (!tcp)
		return drop(XLB_STAT_DROP_INTERNAL);
	c = ct_find(cfg, &p->flow, &seq);
	if (!c) {
		if (!service_of(p))
			return pass(XLB_STAT_PASS_NOT_OURS);
		if (fl & TCP_FL_RST) {
			/* A client's answer to a SYN challenge. */
			if (syn_validate(cfg, &p->flow, bpf_ntohl(tcp->seq), now))
				return drop(XLB_STAT_SYN_VALIDATED);
			return drop(XLB_STAT_DROP_NO_CONN);
		}
		return reset_stray(ctx, p, tcp, fl);
	}
	flags = c->flags;
	if ((fl & (TCP_FL_FIN | TCP_FL_RST)) || conn_closed(flags)) {
		v = fwd_control(ctx, cfg, p, c, tcp, now);
		if (v)
			return v;
	} else if ((flags & (XLB_CF_SYNACK | XLB_CF_ESTAB)) == XLB_CF_SYNACK && (fl & TCP_FL_ACK) &&
		   bpf_ntohl(tcp->ack_seq) == c->isn_b + 1) {
		/* The client's ACK of the backend's SYN-ACK: only now is
		 * the connection established. */
		conn_mark(c, XLB_CF_ESTAB, NULL, now);
	}
	if ((fl & (TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_ACK)
		c->ack_c = bpf_ntohl(tcp->ack_seq);
	return forward_along(ctx, cfg, p, c, seq, now);
}

/* ret_control follows a backend's SYN-ACK, FIN or RST in its connection's
 * slot, found from the way. */
static __always_inline void ret_control(const struct xlb_cfg *cfg, struct xlb_pkt *p, struct xlb_rconn *r,
					struct tcphdr *tcp, __u64 now)
{
	struct xlb_flow fk = {
		.saddr = r->caddr,
		.daddr = r->vaddr,
		.sport = r->cport,
		.dport = r->vport,
		.proto = IPPROTO_TCP,
	};
	__u8 fl = p->tcp_flags;
	__u32 seq, seqb = bpf_ntohl(tcp->seq);
	struct xlb_conn *c = ct_find(cfg, &fk, &seq);
	int ok;

	/* The flow's connection may be a newer one on another port. */
	if (!c || c->lport != p->flow.dport || c->baddr != p->flow.saddr || c->bport != p->flow.sport)
		return;
	if ((fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == (TCP_FL_SYN | TCP_FL_ACK)) {
		if (!(c->flags & XLB_CF_SYNACK)) {
			c->isn_b = seqb;
			c->ack_c = seqb + 1;
		}
		conn_mark(c, XLB_CF_SYNACK, r, now);
		return;
	}
	if (!(fl & (TCP_FL_FIN | TCP_FL_RST)))
		return;
	if ((fl & TCP_FL_RST) && !(c->flags & XLB_CF_SYNACK))
		/* A refused SYN: the RST acknowledges exactly the SYN. */
		ok = (fl & TCP_FL_ACK) && bpf_ntohl(tcp->ack_seq) == r->ack_b;
	else
		ok = in_window(seqb, c->ack_c, XLB_WIN_BACKEND);
	if (!ok) {
		count(XLB_STAT_UNTRUSTED_RST_FIN);
		return;
	}
	conn_mark(c, (fl & TCP_FL_RST) ? XLB_CF_RST : XLB_CF_FIN_B, r, now);
}

static __always_inline int conntrack_ret(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 __u64 now)
{
	__u8 fl = p->tcp_flags;
	struct xlb_rconn *r;
	struct tcphdr *tcp;

	r = port_entry(cfg, p->src_idx, bpf_ntohs(p->flow.dport), p->flow.saddr, p->flow.sport);
	if (!r || r->state == XLB_PS_FREE || r->baddr != p->flow.saddr || r->bport != p->flow.sport ||
	    !(r->flags & XLB_RF_UDP) != (p->flow.proto == IPPROTO_TCP))
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (p->icmp) {
		/* An error is no sign of life: it changes nothing. */
	} else if (p->flow.proto == IPPROTO_TCP) {
		tcp = tcp_at(ctx);
		if (!tcp)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (fl & (TCP_FL_SYN | TCP_FL_FIN | TCP_FL_RST))
			ret_control(cfg, p, r, tcp, now);
		/* What the backend acknowledged bounds the client's RST
		 * and FIN. A RST's acknowledgement, valid or forged, moves
		 * nothing. */
		if ((fl & (TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_ACK)
			r->ack_b = bpf_ntohl(tcp->ack_seq);
	}
	r->last_seen_j = now;
	client_nexthop(ctx, cfg, r, now);
	p->new_saddr = r->vaddr;
	p->new_daddr = r->caddr;
	p->new_sport = r->vport;
	p->new_dport = r->cport;
	p->seq_delta = r->seq_delta;
	p->backend_id = r->backend_id;
	p->nh = r->nh;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* xlb_conntrack finds the connection of a packet, follows its TCP state
 * and hands the rewrite to the rewrite stage; a SYN of a new flow goes to
 * select. */
SEC("xdp")
int xlb_conntrack(struct xdp_md *ctx)
{
	struct xlb_pkt *p = scratch();
	struct xlb_cfg *cfg = config();
	__u64 now = bpf_jiffies64();

	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->dir == XLB_DIR_FWD)
		return conntrack_fwd(ctx, cfg, p, now);
	return conntrack_ret(ctx, cfg, p, now);
}

/* select_backend reads the service's selection table and returns a
 * backend id, or -1. */
static __always_inline __s64 select_backend(struct xlb_pkt *p)
{
	__u32 zero = 0, key, mode, n;
	__u32 *hdr, *id;
	void *tbl;

	tbl = bpf_map_lookup_elem(&xlb_sel, &p->svc_id);
	if (!tbl)
		return -1;
	hdr = bpf_map_lookup_elem(tbl, &zero);
	if (!hdr)
		return -1;
	mode = *hdr & 0xff;
	n = *hdr >> 8;
	if (n == 0)
		return -1;

	switch (mode) {
	case XLB_SEL_RANDOM:
		key = 1 + pick(rand32(), n);
		break;
	case XLB_SEL_HASH:
		key = 1 + pick(flow_hash(&p->flow), n);
		break;
	case XLB_SEL_ROUND_ROBIN: {
		__u32 *pos = bpf_map_lookup_elem(&xlb_rr, &p->svc_id);

		if (!pos)
			return -1;
		key = 1 + (*pos % n);
		*pos += 1;
		break;
	}
	case XLB_SEL_LEAST_CONN: {
		__s64 best_active = 0;
		__u32 best_w = 0, best = 0, i;

		for (i = 0; i < XLB_MAX_CANDIDATES && i < n; i++) {
			struct xlb_backend_stats *bs;
			struct xlb_backend *b;
			__s64 active;
			__u32 k = i + 1;

			id = bpf_map_lookup_elem(tbl, &k);
			if (!id)
				break;
			b = bpf_map_lookup_elem(&xlb_backends, id);
			bs = bpf_map_lookup_elem(&xlb_bk_stats, id);
			if (!b || !bs || !b->weight)
				continue;
			active = bs->active;
			if (active < 0)
				active = 0;
			/* active/weight < best_active/best_w, without division */
			if (!best_w || active * best_w < best_active * b->weight) {
				best_active = active;
				best_w = b->weight;
				best = k;
			}
		}
		if (!best_w)
			return -1;
		key = best;
		break;
	}
	default:
		return -1;
	}
	id = bpf_map_lookup_elem(tbl, &key);
	if (!id)
		return -1;
	return *id;
}

/* first_source picks, from a flow's hash h, one of the source address
 * indexes set in a service's mask, each as likely as the others, or -1. */
static __always_inline int first_source(__u32 mask, __u32 h)
{
	__u32 n = pick(h, __builtin_popcount(mask)), seen = 0, k;

	for (k = 0; k < XLB_MAX_SOURCES; k++) {
		if (!(mask & (1u << k)))
			continue;
		if (seen++ == n)
			return k;
	}
	return -1;
}

/* State of the walk over a service's source addresses for a free port
 * (bpf_loop: the verifier checks its body once, where an open-coded walk
 * of 16 addresses of 16 probes each is too much for it). */
struct source_walk {
	__u32 mask;  /* the service's source addresses */
	__u32 first; /* the one to start from */
	__be32 baddr;
	__be16 bport;
	__u16 pad;
	__u64 now;
	__s32 idx; /* out: the way taken in xlb_ports, or -1 */
	__u32 src; /* out: its source address */
	__u32 off; /* out: its port's offset in the range */
};

static long source_step(__u64 k, void *arg)
{
	struct source_walk *w = arg;
	__u32 s = (w->first + k) & (XLB_MAX_SOURCES - 1), off = 0;
	struct xlb_cfg *cfg = config();
	struct xlb_rconn *r;

	if (!cfg || !(w->mask & (1u << s)))
		return 0;
	r = claim_port(cfg, s, w->baddr, w->bport, &off, w->now);
	if (!r)
		return 0;
	w->idx = (s * XLB_PORT_WAYS + port_way(w->baddr, w->bport)) * cfg->nports + off;
	w->src = s;
	w->off = off;
	return 1;
}

/* refuse answers a SYN with a RST that acknowledges it, so the client
 * gives up at once instead of retrying for a minute. */
static __always_inline int refuse(struct xdp_md *ctx, __u32 stat)
{
	struct tcphdr *tcp = tcp_at(ctx);

	count(stat);
	if (!tcp)
		return XDP_DROP;
	return tcp_reply(ctx, TCP_FL_RST | TCP_FL_ACK, 0,
			 bpf_ntohl(tcp->seq) + 1 + tcp_payload_len(ctx, tcp));
}

/* xlb_select creates the connection of a SYN: it finds the service,
 * chooses a backend, takes a slot in the connection table, claims a
 * source port unique for that backend on one of the service's source
 * addresses and chooses the backend-side ISN. A SYN whose flow has a live
 * connection (a retransmission) goes along it, with the same ISN; one
 * whose connection ended (closed, or idle past its timeout) replaces it:
 * a client may reuse its port at once. */
SEC("xdp")
int xlb_select(struct xdp_md *ctx)
{
	struct xlb_pkt *p = scratch();
	struct xlb_backend_stats *bs;
	struct xlb_conn *c = NULL;
	struct xlb_rconn *r = NULL;
	struct xlb_backend *b;
	struct xlb_cfg *cfg;
	struct tcphdr *tcp;
	struct ethhdr *eth;
	__u64 now = bpf_jiffies64();
	__u32 bid, seq = 0, slot = 0, off = 0, mask, *maskp, isn = 0, src = 0;
	__be32 *laddr = NULL;
	__s64 sel;
	int first, udp;

	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	/* First whether the SYN is for a VIP at all: a SYN to another
	 * address on a VIP's port must not take (or evict) a slot. */
	if (!service_of(p))
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (!client_addr_ok(p->flow.saddr, p->flow.daddr))
		return drop(XLB_STAT_DROP_BAD_SOURCE);
	if (!l4_csum_ok(ctx, p->flow.proto))
		return drop(XLB_STAT_DROP_BAD_CSUM);
	udp = p->flow.proto == IPPROTO_UDP;

	switch (ct_claim(cfg, &p->flow, &c, &seq, &slot)) {
	case CT_EXISTS:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (!conn_closed(c->flags) && !conn_expired(cfg, c->flags, c->last_seen_j, now))
			return forward_along(ctx, cfg, p, c, seq, now);
		if (!ct_take(c, seq))
			return drop(XLB_STAT_DROP_CT_RACE);
		conn_end(cfg, c, XLB_STAT_RECYCLED, now);
		break;
	case CT_NEW:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (c->flags && !(c->flags & XLB_CF_DEAD))
			conn_end(cfg, c, XLB_STAT_EVICTED, now);
		break;
	default:
		return drop(XLB_STAT_DROP_CT_RACE);
	}
	/* The slot is ours (odd) from here: every exit frees it or fills it. */
	c->flags = XLB_CF_DEAD;

	sel = select_backend(p);
	bid = sel;
	b = sel < 0 ? NULL : bpf_map_lookup_elem(&xlb_backends, &bid);
	maskp = bpf_map_lookup_elem(&xlb_svc_src, &p->svc_id);
	mask = maskp ? *maskp : 0;
	first = first_source(mask, flow_hash(&p->flow));
	if (first >= 0) {
		src = first;
		laddr = bpf_map_lookup_elem(&xlb_src, &src);
	}
	if (!b || !b->weight || !laddr) {
		ct_publish(c);
		return udp ? drop(XLB_STAT_DROP_NO_BACKEND) : refuse(ctx, XLB_STAT_RST_NO_BACKEND);
	}
	bs = backend_nexthop(ctx, cfg, bid, *laddr, b->addr, now);
	if (!bs) {
		ct_publish(c);
		return drop(XLB_STAT_DROP_FIB);
	}
	if (!udp && syn_challenge_due(cfg, bs, p->flow.saddr, now)) {
		ct_publish(c);
		count(XLB_STAT_SYN_CHALLENGE);
		return tcp_reply(ctx, TCP_FL_SYN | TCP_FL_ACK, rand32(),
				 syn_cookie(cfg, &p->flow, syn_slot(cfg, now)));
	}
	/* A port of the first source address with one free, from the one
	 * the flow's hash picks, so flows spread evenly over them. */
	{
		struct source_walk w = {
			.mask = mask,
			.first = first,
			.baddr = b->addr,
			.bport = b->port,
			.now = now,
			.idx = -1,
		};

		bpf_loop(XLB_MAX_SOURCES, source_step, &w, 0);
		if (w.idx >= 0) {
			__u32 idx = w.idx;

			r = bpf_map_lookup_elem(&xlb_ports, &idx);
			src = w.src;
			off = w.off;
		}
	}
	laddr = bpf_map_lookup_elem(&xlb_src, &src);
	if (!r || !laddr) {
		ct_publish(c);
		__sync_fetch_and_add(&bs->no_port, 1);
		return udp ? drop(XLB_STAT_DROP_NO_PORT) : refuse(ctx, XLB_STAT_RST_NO_PORT);
	}
	eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end) {
		ct_publish(c);
		return drop(XLB_STAT_DROP_INTERNAL);
	}

	c->key = p->flow;
	c->laddr = *laddr;
	c->baddr = b->addr;
	c->bport = b->port;
	c->lport = bpf_htons(cfg->port_lo + off);
	c->backend_id = bid;
	c->src_idx = src;
	c->last_seen_j = now;
	c->seq_delta = 0;
	if (!udp) {
		tcp = tcp_at(ctx);
		if (!tcp) {
			__sync_val_compare_and_swap(&r->state, XLB_PS_USED, XLB_PS_FREE);
			ct_publish(c);
			return drop(XLB_STAT_DROP_INTERNAL);
		}
		isn = backend_isn(cfg, r, c->laddr, c->lport, b->addr, b->port, now);
		c->seq_delta = isn - bpf_ntohl(tcp->seq);
	}
	c->isn_b = 0;
	c->ack_c = 0;
	c->flags = udp ? XLB_CF_UDP : XLB_CF_SYN;

	/* Replies go back the way the SYN came (its MACs and interface)
	 * until the return path asks the FIB, nh_ttl later. */
	r->baddr = b->addr;
	r->bport = b->port;
	r->caddr = p->flow.saddr;
	r->cport = p->flow.sport;
	r->vaddr = p->flow.daddr;
	r->vport = p->flow.dport;
	r->flags = udp ? XLB_RF_UDP : 0;
	r->backend_id = bid;
	r->last_seen_j = now;
	r->nh_j = now;
	r->seq_delta = c->seq_delta;
	r->ack_b = isn + 1;
	r->nh.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(r->nh.dmac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(r->nh.smac, eth->h_dest, ETH_ALEN);
	ct_publish(c);
	mark_busy(&xlb_ct_busy, slot);

	__sync_fetch_and_add(&bs->active, 1);
	if (!udp)
		__sync_fetch_and_add(&bs->half_open, 1);
	__sync_fetch_and_add(&bs->new_conns, 1);
	count(XLB_STAT_NEW_CONN);

	p->new_saddr = c->laddr;
	p->new_daddr = b->addr;
	p->new_sport = c->lport;
	p->new_dport = b->port;
	p->seq_delta = c->seq_delta;
	p->backend_id = bid;
	p->nh = bs->nh;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* backend_traffic counts a rewritten packet and its bytes for its
 * connection's backend. */
static __always_inline void backend_traffic(const struct xlb_pkt *p, const struct iphdr *ip)
{
	__u32 id = p->backend_id;
	struct xlb_traffic *bc = bpf_map_lookup_elem(&xlb_bk_ctr, &id);
	__u32 d = (p->dir - 1) & 1;

	if (!xlb_count_traffic || !bc)
		return;
	bc->packets[d]++;
	bc->bytes[d] += bpf_ntohs(ip->tot_len);
}

/* rewrite_udp rewrites a UDP datagram's ports and checksum: a checksum of
 * 0 (none, in IPv4) stays 0; a computed 0 is sent as 0xffff (RFC 768). */
static __always_inline int rewrite_udp(const struct xlb_pkt *p, struct udphdr *udp, void *end, __u64 addrs)
{
	__u16 sum;
	__u64 acc;

	if ((void *)(udp + 1) > end)
		return -1;
	if (udp->check) {
		acc = csum_start(udp->check) + addrs;
		acc = csum_acc16(acc, udp->source, p->new_sport);
		acc = csum_acc16(acc, udp->dest, p->new_dport);
		sum = csum_finish(acc);
		udp->check = sum ? sum : 0xffff;
	}
	udp->source = p->new_sport;
	udp->dest = p->new_dport;
	return 0;
}

/* rewrite_tcp rewrites a TCP segment's ports, translates its sequence
 * numbers (seq forward; ack and SACK blocks on the return), removes a
 * SYN's timestamp option and updates its checksum. */
static __always_inline int rewrite_tcp(struct xdp_md *ctx, const struct xlb_pkt *p, struct tcphdr *tcp,
				       void *end, __u64 addrs)
{
	__u32 optlen;
	__be32 old;
	__u64 acc;

	if ((void *)(tcp + 1) > end)
		return -1;
	acc = csum_start(tcp->check) + addrs;
	acc = csum_acc16(acc, tcp->source, p->new_sport);
	acc = csum_acc16(acc, tcp->dest, p->new_dport);
	optlen = tcp->doff * 4 - sizeof(*tcp);
	if (p->dir == XLB_DIR_FWD) {
		old = tcp->seq;
		tcp->seq = seq_add(old, p->seq_delta);
		acc = csum_acc32(acc, old, tcp->seq);
		if ((p->tcp_flags & TCP_FL_SYN) && optlen)
			acc = tcp_strip_ts(ctx, optlen, acc);
	} else {
		if (p->tcp_flags & TCP_FL_ACK) {
			old = tcp->ack_seq;
			tcp->ack_seq = seq_add(old, -p->seq_delta);
			acc = csum_acc32(acc, old, tcp->ack_seq);
		}
		if (optlen)
			acc = tcp_sack_sub(ctx, optlen, p->seq_delta, acc);
	}
	tcp->check = csum_finish(acc);
	tcp->source = p->new_sport;
	tcp->dest = p->new_dport;
	return 0;
}

/* rewrite_icmp translates an ICMP error about a packet xlb sent to a
 * backend back to the client: outer source the VIP, destination the
 * client; the quoted packet as the client sent it (source the client,
 * destination the VIP, its ports, a TCP sequence number back in the
 * client's space), with the quoted IPv4 and TCP or UDP checksums and the
 * ICMP checksum updated incrementally. A quoted TCP checksum is updated
 * when the error quotes it. */
static __always_inline int rewrite_icmp(struct xdp_md *ctx, const struct xlb_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u16 *icsum = (void *)ip + 20 + 2;
	struct iphdr *in = (void *)ip + 20 + ICMP_HLEN;
	__u8 *l4 = (void *)(in + 1);
	__u16 *lsum = NULL, old16;
	__u64 outer, inner, l4acc, icmp;
	__be32 old32;

	if ((void *)(l4 + 8) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	outer = csum_acc32(csum_acc32(0, ip->saddr, p->new_saddr), ip->daddr, p->new_daddr);
	ip->check = csum_finish(csum_start(ip->check) + outer);
	ip->saddr = p->new_saddr;
	ip->daddr = p->new_daddr;

	/* The quoted packet went from the source address to the backend: it
	 * becomes the client's to the VIP. */
	inner = csum_acc32(csum_acc32(0, in->saddr, p->new_daddr), in->daddr, p->new_saddr);
	l4acc = inner;
	l4acc = csum_acc16(l4acc, *(__be16 *)l4, p->new_dport);
	l4acc = csum_acc16(l4acc, *(__be16 *)(l4 + 2), p->new_sport);
	icmp = csum_start(*icsum) + l4acc; /* the quoted addresses and ports */
	old16 = in->check;
	in->check = csum_finish(csum_start(in->check) + inner);
	icmp = csum_acc16(icmp, old16, in->check);
	in->saddr = p->new_daddr;
	in->daddr = p->new_saddr;
	*(__be16 *)l4 = p->new_dport;
	*(__be16 *)(l4 + 2) = p->new_sport;
	if (p->flow.proto == IPPROTO_TCP) {
		old32 = *(__be32 *)(l4 + 4);
		*(__be32 *)(l4 + 4) = seq_add(old32, -p->seq_delta);
		l4acc = csum_acc32(l4acc, old32, *(__be32 *)(l4 + 4));
		icmp = csum_acc32(icmp, old32, *(__be32 *)(l4 + 4));
		if ((void *)(l4 + 18) <= end && (void *)l4 + 18 <= (void *)ip + bpf_ntohs(ip->tot_len))
			lsum = (void *)(l4 + 16);
	} else if (*(__u16 *)(l4 + 6)) {
		lsum = (void *)(l4 + 6);
	}
	if (lsum && (void *)(lsum + 1) <= end) {
		old16 = *lsum;
		*lsum = csum_finish(csum_start(old16) + l4acc);
		if (p->flow.proto == IPPROTO_UDP && !*lsum)
			*lsum = 0xffff;
		icmp = csum_acc16(icmp, old16, *lsum);
	}
	if ((void *)(icsum + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	*icsum = csum_finish(icmp);

	__builtin_memcpy(eth->h_dest, p->nh.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p->nh.smac, ETH_ALEN);
	count(XLB_STAT_ICMP_ERROR);
	if (p->nh.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	count(XLB_STAT_REDIRECT);
	return bpf_redirect(p->nh.ifindex, 0);
}

/* xlb_rewrite applies the NAT chosen by conntrack or select: MACs, IPs,
 * ports, and for TCP the sequence translation, with incremental IPv4 and
 * TCP or UDP checksum updates, and transmits. */
SEC("xdp")
int xlb_rewrite(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct xlb_pkt *p = scratch();
	__u64 addrs;
	int err;

	if (!p || (void *)(ip + 1) > end || ip->ihl != 5)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->icmp)
		return rewrite_icmp(ctx, p);

	/* The addresses' change counts in both checksums (the L4 one
	 * through its pseudo-header). */
	addrs = csum_acc32(csum_acc32(0, ip->saddr, p->new_saddr), ip->daddr, p->new_daddr);
	if (p->flow.proto == IPPROTO_UDP)
		err = rewrite_udp(p, (void *)(ip + 1), end, addrs);
	else
		err = rewrite_tcp(ctx, p, (void *)(ip + 1), end, addrs);
	if (err)
		return drop(XLB_STAT_DROP_INTERNAL);
	/* The packet may have moved under a helper: take it afresh. */
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	ip->check = csum_finish(csum_start(ip->check) + addrs);
	ip->saddr = p->new_saddr;
	ip->daddr = p->new_daddr;
	__builtin_memcpy(eth->h_dest, p->nh.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p->nh.smac, ETH_ALEN);

	count(p->dir == XLB_DIR_FWD ? XLB_STAT_FWD : XLB_STAT_RET);
	backend_traffic(p, ip);
	if (p->nh.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	count(XLB_STAT_REDIRECT);
	return bpf_redirect(p->nh.ifindex, 0);
}
