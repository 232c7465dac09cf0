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
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "xlb_consts.h"
#include "xlb_structs.h"
#include "xlb_maps.h"
#include "xlb_csum.h"
#include "xlb_common.h"
#include "xlb_ct.h"

char _license[] SEC("license") = "Dual BSD/GPL";

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Force BTF for the types the control plane reads (bpf2go -type). */
const enum xlb_stage *unused_stage __attribute__((unused));
const enum xlb_stat *unused_stat __attribute__((unused));
const enum xlb_sel_mode *unused_mode __attribute__((unused));
const enum xlb_conn_flag *unused_flag __attribute__((unused));
const enum xlb_dir *unused_dir __attribute__((unused));
const enum xlb_ct_state *unused_ct __attribute__((unused));
const struct xlb_pkt *unused_pkt __attribute__((unused));
const enum xlb_port_state *unused_pstate __attribute__((unused));
const struct xlb_vip_port *unused_vport __attribute__((unused));

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

/* xlb_parse validates Ethernet/IPv4/TCP and decides whether the packet is
 * for a VIP (forward), a reply to xlb's source address (return) or neither
 * (passed to the kernel untouched). */
SEC("xdp")
int xlb_parse(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;
	struct xlb_pkt *p;
	__u32 tot_len, doff;
	__u16 dport;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return pass(XLB_STAT_PASS_NOT_IPV4);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return drop(XLB_STAT_DROP_ETH_TRUNC);
	if (ip->version != 4 || ip->ihl < 5)
		return drop(XLB_STAT_DROP_IP_HDR);
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ip->ihl * 4 || data + sizeof(*eth) + tot_len > end)
		return drop(XLB_STAT_DROP_IP_LEN);
	if (ip->protocol != IPPROTO_TCP)
		return pass(XLB_STAT_PASS_NOT_TCP);
	if (ip->ihl != 5)
		return pass(XLB_STAT_PASS_IP_OPTIONS);
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return pass(XLB_STAT_PASS_FRAGMENT);
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > end || tot_len < sizeof(*ip) + sizeof(*tcp))
		return drop(XLB_STAT_DROP_TCP_HDR);
	doff = tcp->doff * 4;
	if (doff < sizeof(*tcp) || sizeof(*ip) + doff > tot_len)
		return drop(XLB_STAT_DROP_TCP_HDR);

	p = scratch();
	if (!p)
		return drop(XLB_STAT_DROP_INTERNAL);
	p->flow.saddr = ip->saddr;
	p->flow.daddr = ip->daddr;
	p->flow.sport = tcp->source;
	p->flow.dport = tcp->dest;
	p->flow.proto = IPPROTO_TCP;
	p->tcp_flags = ((__u8 *)tcp)[13];

	dport = bpf_ntohs(tcp->dest);
	struct xlb_cfg *cfg = config();
	if (cfg && ip->daddr == cfg->snat_addr && dport >= cfg->port_lo && dport <= cfg->port_hi) {
		p->dir = XLB_DIR_RET;
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	/* A port some VIP uses: conntrack looks the flow up first, and the
	 * service only when there is no connection, so established
	 * traffic pays for one hash lookup. */
	__u32 port = dport;
	struct xlb_vip_port *vp = bpf_map_lookup_elem(&xlb_vip_ports, &port);
	if (vp && vp->svc) {
		p->vip = *vp;
		p->dir = XLB_DIR_FWD;
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	return pass(XLB_STAT_PASS_NOT_OURS);
}

/* conn_expired reports whether a connection outlived its state's timeout. */
static __always_inline int conn_expired(const struct xlb_cfg *cfg, __u32 flags, __u64 last, __u64 now)
{
	__u32 st = conn_state(flags);

	if (st > XLB_CT_CLOSED)
		return 0;
	return now - last > cfg->timeout_j[st];
}

/* port_release frees, or holds for the backend's TIME_WAIT, the source
 * port of a connection that ends, if its way still belongs to it. */
static __always_inline void port_release(const struct xlb_cfg *cfg, const struct xlb_conn *c)
{
	struct xlb_rconn *r = port_entry(cfg, bpf_ntohs(c->lport), c->baddr, c->bport);

	if (!r || r->baddr != c->baddr || r->bport != c->bport || r->caddr != c->key.saddr ||
	    r->cport != c->key.sport)
		return;
	/* Keep the port from reuse until the daemon's time-wait sweep
	 * frees it when the backend may hold TIME_WAIT for it. */
	r->state = (c->flags & XLB_CF_TW) ? XLB_PS_TW_HOLD : XLB_PS_FREE;
}

/* conn_end releases what a connection holds (its backend's count, its
 * source port) before its slot is reused. */
static __always_inline void conn_end(const struct xlb_cfg *cfg, const struct xlb_conn *c, __u32 stat)
{
	if (!conn_closed(c->flags))
		backend_uncount(c->backend_id);
	port_release(cfg, c);
	count(stat);
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
		.proto = IPPROTO_TCP,
	};
	struct xlb_service *svc = bpf_map_lookup_elem(&xlb_services, &vip);

	if (!svc)
		return 0;
	p->svc_id = svc->id;
	return 1;
}

/* backend_nexthop returns the next hop towards a backend, shared by its
 * connections and looked up in the FIB at most once per nh_ttl. */
static __always_inline struct xlb_backend_stats *backend_nexthop(struct xdp_md *ctx,
								 const struct xlb_cfg *cfg, __u32 id,
								 __be32 baddr, __u64 now)
{
	struct xlb_backend_stats *bs = bpf_map_lookup_elem(&xlb_bk_stats, &id);

	if (!bs)
		return NULL;
	if (!bs->nh_j || now - bs->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, cfg->snat_addr, baddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS) {
			bs->nh = nh;
			bs->nh_j = now;
		} else if (!bs->nh_j) {
			return NULL;
		}
	}
	return bs;
}

/* forward_along hands the rewrite of an existing connection, read from
 * its slot at seq, to the rewrite stage. */
static __always_inline int forward_along(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 struct xlb_conn *c, __u32 seq, __u64 now)
{
	struct xlb_backend_stats *bs;

	c->last_seen_j = now;
	p->new_saddr = cfg->snat_addr;
	p->new_daddr = c->baddr;
	p->new_sport = c->lport;
	p->new_dport = c->bport;
	bs = backend_nexthop(ctx, cfg, c->backend_id, c->baddr, now);
	if (!bs)
		return drop(XLB_STAT_DROP_FIB);
	p->nh = bs->nh;
	if (!ct_stable(c, seq))
		return drop(XLB_STAT_DROP_CT_RACE);
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

static __always_inline int conntrack_fwd(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 __u64 now)
{
	__u8 fl = p->tcp_flags;
	struct xlb_conn *c;
	__u32 seq;

	/* A SYN goes straight to select, which finds an existing
	 * connection of its flow while it looks for a slot. */
	if ((fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_SYN) {
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_SELECT);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	c = ct_find(cfg, &p->flow, &seq);
	if (!c) {
		if (!service_of(p))
			return pass(XLB_STAT_PASS_NOT_OURS);
		return drop(XLB_STAT_DROP_NO_CONN);
	}
	if (fl & (TCP_FL_FIN | TCP_FL_RST))
		conn_mark(c, tcp_conn_bits(fl, XLB_CF_FIN_C));
	return forward_along(ctx, cfg, p, c, seq, now);
}

static __always_inline int conntrack_ret(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					 __u64 now)
{
	__u8 fl = p->tcp_flags;
	struct xlb_rconn *r;

	r = port_entry(cfg, bpf_ntohs(p->flow.dport), p->flow.saddr, p->flow.sport);
	if (!r || r->state == XLB_PS_FREE || r->baddr != p->flow.saddr || r->bport != p->flow.sport)
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (fl & (TCP_FL_SYN | TCP_FL_FIN | TCP_FL_RST)) {
		/* State changes live in the connection's slot. */
		struct xlb_flow fk = {
			.saddr = r->caddr,
			.daddr = r->vaddr,
			.sport = r->cport,
			.dport = r->vport,
			.proto = IPPROTO_TCP,
		};
		__u32 seq;
		struct xlb_conn *c = ct_find(cfg, &fk, &seq);

		if (c) {
			__u32 bits = tcp_conn_bits(fl, XLB_CF_FIN_B);

			/* A backend that closes first holds TIME_WAIT. */
			if ((bits & XLB_CF_FIN_B) && !(c->flags & XLB_CF_FIN_C))
				bits |= XLB_CF_TW;
			if ((fl & (TCP_FL_SYN | TCP_FL_ACK)) == (TCP_FL_SYN | TCP_FL_ACK))
				bits |= XLB_CF_ESTAB;
			conn_mark(c, bits);
		}
	}
	r->last_seen_j = now;
	if (now - r->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, r->vaddr, r->caddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS)
			r->nh = nh;
		r->nh_j = now;
	}
	p->new_saddr = r->vaddr;
	p->new_daddr = r->caddr;
	p->new_sport = r->vport;
	p->new_dport = r->cport;
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

/* claim_port claims the backend's way of a free source port, walking
 * the range per backend as connect() does: a port comes back only after
 * the whole range was used, long after the backend's TIME_WAIT for it in
 * all but the busiest cases. One compare-and-swap per probe, so two CPUs
 * never share a way. Returns the way and its offset in the range. */
static __always_inline struct xlb_rconn *claim_port(const struct xlb_cfg *cfg, struct xlb_backend_stats *bs,
						    const struct xlb_backend *b, __u32 *off)
{
	__u32 range = (__u32)cfg->port_hi - cfg->port_lo + 1;
	__u32 way = port_way(b->addr, b->port);
	__u32 start, i;

	if (cfg->port_hi < cfg->port_lo)
		return NULL;
	/* Backends sharing a way start their walks far apart (their own
	 * hash), and a walk resumes after the port it last claimed. */
	start = (__u32)((__sync_fetch_and_add(&bs->port_seq, 1) + port_hash(b->addr, b->port)) % range);
	for (i = 0; i < XLB_PORT_TRIES; i++) {
		__u32 idx;
		struct xlb_rconn *r;

		*off = (start + i) % range;
		idx = way * range + *off;
		r = bpf_map_lookup_elem(&xlb_ports, &idx);
		if (!r)
			return NULL;
		if (__sync_val_compare_and_swap(&r->state, XLB_PS_FREE, XLB_PS_USED) == XLB_PS_FREE) {
			if (i)
				__sync_fetch_and_add(&bs->port_seq, i);
			return r;
		}
	}
	return NULL;
}

/* xlb_select creates the connection of a SYN: it finds the service,
 * chooses a backend, takes a slot in the connection table and claims a
 * source port unique for that backend. A SYN whose flow has a live
 * connection (a retransmission) goes along it; one whose connection ended
 * (closed, or idle past its timeout) replaces it: a client may reuse its
 * port at once. */
SEC("xdp")
int xlb_select(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct xlb_pkt *p = scratch();
	struct xlb_backend_stats *bs;
	struct xlb_conn *c = NULL;
	struct xlb_backend *b;
	struct xlb_rconn *r;
	struct xlb_cfg *cfg;
	__u64 now = bpf_jiffies64();
	__u32 bid, seq = 0, off = 0;
	__s64 sel;

	if (!p || (void *)(eth + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	cfg = config();
	if (!cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	/* First whether the SYN is for a VIP at all: a SYN to another
	 * address on a VIP's port must not take (or evict) a slot. */
	if (!service_of(p))
		return pass(XLB_STAT_PASS_NOT_OURS);

	switch (ct_claim(cfg, &p->flow, &c, &seq)) {
	case CT_EXISTS:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (!conn_closed(c->flags) && !conn_expired(cfg, c->flags, c->last_seen_j, now))
			return forward_along(ctx, cfg, p, c, seq, now);
		if (!ct_take(c, seq))
			return drop(XLB_STAT_DROP_CT_RACE);
		conn_end(cfg, c, XLB_STAT_RECYCLED);
		break;
	case CT_NEW:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (c->flags && !(c->flags & XLB_CF_DEAD))
			conn_end(cfg, c, XLB_STAT_EVICTED);
		break;
	default:
		return drop(XLB_STAT_DROP_CT_RACE);
	}
	/* The slot is ours (odd) from here: every exit frees it or fills it. */
	c->flags = XLB_CF_DEAD;

	sel = select_backend(p);
	bid = sel;
	b = sel < 0 ? NULL : bpf_map_lookup_elem(&xlb_backends, &bid);
	if (!b || !b->weight) {
		ct_publish(c);
		return drop(XLB_STAT_DROP_NO_BACKEND);
	}
	bs = backend_nexthop(ctx, cfg, bid, b->addr, now);
	if (!bs) {
		ct_publish(c);
		return drop(XLB_STAT_DROP_FIB);
	}
	r = claim_port(cfg, bs, b, &off);
	if (!r) {
		ct_publish(c);
		return drop(XLB_STAT_DROP_NO_PORT);
	}

	/* Replies go back the way the SYN came (its MACs and interface)
	 * until the return path asks the FIB, nh_ttl later. */
	r->baddr = b->addr;
	r->bport = b->port;
	r->caddr = p->flow.saddr;
	r->cport = p->flow.sport;
	r->vaddr = p->flow.daddr;
	r->vport = p->flow.dport;
	r->last_seen_j = now;
	r->nh_j = now;
	r->nh.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(r->nh.dmac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(r->nh.smac, eth->h_dest, ETH_ALEN);

	c->key = p->flow;
	c->baddr = b->addr;
	c->bport = b->port;
	c->lport = bpf_htons(cfg->port_lo + off);
	c->backend_id = bid;
	c->last_seen_j = now;
	c->flags = XLB_CF_SYN;
	ct_publish(c);

	__sync_fetch_and_add(&bs->active, 1);
	__sync_fetch_and_add(&bs->new_conns, 1);
	count(XLB_STAT_NEW_CONN);

	p->new_saddr = cfg->snat_addr;
	p->new_daddr = b->addr;
	p->new_sport = c->lport;
	p->new_dport = b->port;
	p->nh = bs->nh;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* xlb_rewrite applies the NAT chosen by conntrack or select: MACs, IPs and
 * ports, with incremental IPv4 and TCP checksum updates, and transmits. */
SEC("xdp")
int xlb_rewrite(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	struct xlb_pkt *p = scratch();
	__u64 acc;

	if (!p || (void *)(tcp + 1) > end || ip->ihl != 5)
		return drop(XLB_STAT_DROP_INTERNAL);

	__builtin_memcpy(eth->h_dest, p->nh.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p->nh.smac, ETH_ALEN);

	acc = csum_start(ip->check);
	acc = csum_acc32(acc, ip->saddr, p->new_saddr);
	acc = csum_acc32(acc, ip->daddr, p->new_daddr);
	ip->check = csum_finish(acc);

	acc = csum_start(tcp->check);
	acc = csum_acc32(acc, ip->saddr, p->new_saddr);
	acc = csum_acc32(acc, ip->daddr, p->new_daddr);
	acc = csum_acc16(acc, tcp->source, p->new_sport);
	acc = csum_acc16(acc, tcp->dest, p->new_dport);
	tcp->check = csum_finish(acc);

	ip->saddr = p->new_saddr;
	ip->daddr = p->new_daddr;
	tcp->source = p->new_sport;
	tcp->dest = p->new_dport;

	count(p->dir == XLB_DIR_FWD ? XLB_STAT_FWD : XLB_STAT_RET);
	if (p->nh.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	count(XLB_STAT_REDIRECT);
	return bpf_redirect(p->nh.ifindex, 0);
}
