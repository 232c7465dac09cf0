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
#include "include/xlb_consts.h"
#include "include/xlb_structs.h"
#include "include/xlb_maps.h"
#include "include/xlb_csum.h"
#include "include/xlb_common.h"

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
const enum xlb_rconn_flag *unused_rflag __attribute__((unused));

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
	__u32 word = dport >> 6;
	__u64 *bits = bpf_map_lookup_elem(&xlb_vip_ports, &word);
	if (bits && (*bits & (1ULL << (dport & 63)))) {
		p->dir = XLB_DIR_FWD;
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	return pass(XLB_STAT_PASS_NOT_OURS);
}

/* conn_expired reports whether an entry outlived its state's timeout. */
static __always_inline int conn_expired(__u32 flags, __u64 last, __u64 now)
{
	struct xlb_cfg *cfg = config();
	__u32 st = conn_state(flags);

	if (!cfg || st > XLB_CT_CLOSED)
		return 0;
	return now - last > cfg->timeout_j[st];
}

static __always_inline void conntrack_recycle(struct xlb_conn *c, struct xlb_flow *key)
{
	struct xlb_flow rk = {
		.saddr = c->baddr,
		.daddr = c->laddr,
		.sport = c->bport,
		.dport = c->lport,
		.proto = IPPROTO_TCP,
	};

	if (!conn_closed(c->flags))
		backend_uncount(c->backend_id);
	if (c->flags & XLB_CF_TW) {
		/* Keep the port from reuse until the daemon's time-wait
		 * sweep frees it: the backend may hold TIME_WAIT for it. */
		struct xlb_rconn *r = bpf_map_lookup_elem(&xlb_ret, &rk);

		if (r)
			r->flags |= XLB_RF_TW_HOLD;
	} else {
		bpf_map_delete_elem(&xlb_ret, &rk);
	}
	bpf_map_delete_elem(&xlb_fwd, key);
	count(XLB_STAT_RECYCLED);
}

/* service_of finds the service of a VIP flow, for a packet without a
 * connection; it stores its id for select. */
static __always_inline int service_of(struct xlb_pkt *p)
{
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

static __always_inline int conntrack_fwd(struct xdp_md *ctx, struct xlb_pkt *p, __u64 now)
{
	struct xlb_conn *c = bpf_map_lookup_elem(&xlb_fwd, &p->flow);
	__u8 fl = p->tcp_flags;
	int syn = (fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_SYN;
	struct xlb_cfg *cfg;

	if (!c) {
		if (!service_of(p))
			return pass(XLB_STAT_PASS_NOT_OURS);
		if (syn)
			bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_SELECT);
		return drop(XLB_STAT_DROP_NO_CONN);
	}
	if (syn && (conn_closed(c->flags) || conn_expired(c->flags, c->last_seen_j, now))) {
		/* The client reuses its port after the earlier connection
		 * ended: a new connection, a new selection. */
		conntrack_recycle(c, &p->flow);
		if (!service_of(p))
			return pass(XLB_STAT_PASS_NOT_OURS);
		bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_SELECT);
		return drop(XLB_STAT_DROP_INTERNAL);
	}
	if (fl & (TCP_FL_FIN | TCP_FL_RST))
		conn_mark(c, tcp_conn_bits(fl, XLB_CF_FIN_C));
	c->last_seen_j = now;
	cfg = config();
	if (cfg && now - c->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, c->laddr, c->baddr, &nh) == BPF_FIB_LKUP_RET_SUCCESS)
			c->nh = nh;
		c->nh_j = now;
	}
	p->new_saddr = c->laddr;
	p->new_daddr = c->baddr;
	p->new_sport = c->lport;
	p->new_dport = c->bport;
	p->nh = c->nh;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

static __always_inline int conntrack_ret(struct xdp_md *ctx, struct xlb_pkt *p, __u64 now)
{
	struct xlb_rconn *r = bpf_map_lookup_elem(&xlb_ret, &p->flow);
	__u8 fl = p->tcp_flags;

	if (!r)
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (fl & (TCP_FL_SYN | TCP_FL_FIN | TCP_FL_RST)) {
		/* State changes live in the forward entry. */
		struct xlb_flow fk = {
			.saddr = r->caddr,
			.daddr = r->vaddr,
			.sport = r->cport,
			.dport = r->vport,
			.proto = IPPROTO_TCP,
		};
		struct xlb_conn *c = bpf_map_lookup_elem(&xlb_fwd, &fk);

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
	struct xlb_cfg *cfg = config();
	if (cfg && now - r->nh_j > cfg->nh_ttl_j) {
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
	__u64 now = bpf_jiffies64();

	if (!p)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->dir == XLB_DIR_FWD)
		return conntrack_fwd(ctx, p, now);
	return conntrack_ret(ctx, p, now);
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

/* xlb_select creates the connection of a new flow: it chooses a backend,
 * finds next hops, allocates a source port unique for that backend and
 * inserts the forward and return entries. */
SEC("xdp")
int xlb_select(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct xlb_pkt *p = scratch();
	struct xlb_backend_stats *bs;
	struct xlb_backend *b;
	struct xlb_cfg *cfg;
	__u64 now = bpf_jiffies64();
	__u32 bid, range, start, i;
	__s64 sel;

	if (!p || (void *)(eth + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	cfg = config();
	if (!cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	sel = select_backend(p);
	if (sel < 0)
		return drop(XLB_STAT_DROP_NO_BACKEND);
	bid = sel;
	b = bpf_map_lookup_elem(&xlb_backends, &bid);
	if (!b || !b->weight)
		return drop(XLB_STAT_DROP_NO_BACKEND);
	bs = bpf_map_lookup_elem(&xlb_bk_stats, &bid);
	if (!bs)
		return drop(XLB_STAT_DROP_INTERNAL);

	/* The next hop towards a backend is shared by its new connections
	 * and looked up in the FIB at most once per nh_ttl. */
	if (!bs->nh_j || now - bs->nh_j > cfg->nh_ttl_j) {
		struct xlb_nh nh;

		if (fib_nexthop(ctx, cfg->snat_addr, b->addr, &nh) == BPF_FIB_LKUP_RET_SUCCESS) {
			bs->nh = nh;
			bs->nh_j = now;
		} else if (!bs->nh_j) {
			return drop(XLB_STAT_DROP_FIB);
		}
	}

	struct xlb_conn c = {
		.baddr = b->addr,
		.laddr = cfg->snat_addr,
		.bport = b->port,
		.backend_id = bid,
		.flags = XLB_CF_SYN,
		.svc_id = p->svc_id,
		.last_seen_j = now,
		.nh_j = bs->nh_j,
		.nh = bs->nh,
	};
	/* Replies go back the way the SYN came (its MACs and interface)
	 * until the return path asks the FIB, nh_ttl later. */
	struct xlb_rconn r = {
		.caddr = p->flow.saddr,
		.vaddr = p->flow.daddr,
		.cport = p->flow.sport,
		.vport = p->flow.dport,
		.last_seen_j = now,
		.nh_j = now,
		.nh.ifindex = ctx->ingress_ifindex,
	};
	__builtin_memcpy(r.nh.dmac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(r.nh.smac, eth->h_dest, ETH_ALEN);

	struct xlb_flow rk = {
		.saddr = c.baddr,
		.daddr = c.laddr,
		.sport = c.bport,
		.proto = IPPROTO_TCP,
	};
	range = (__u32)cfg->port_hi - cfg->port_lo + 1;
	if (cfg->port_hi < cfg->port_lo)
		return drop(XLB_STAT_DROP_INTERNAL);
	/* Walk the range per backend, as connect() does: a port comes back
	 * only after the whole range was used, long after the backend's
	 * TIME_WAIT for it, in all but the busiest cases. */
	start = (__u32)(__sync_fetch_and_add(&bs->port_seq, 1) % range);
	for (i = 0; i < XLB_PORT_TRIES; i++) {
		__u32 off = (start + i) % range;

		rk.dport = bpf_htons(cfg->port_lo + off);
		if (bpf_map_update_elem(&xlb_ret, &rk, &r, BPF_NOEXIST) == 0)
			break;
	}
	if (i == XLB_PORT_TRIES)
		return drop(XLB_STAT_DROP_NO_PORT);
	c.lport = rk.dport;
	if (bpf_map_update_elem(&xlb_fwd, &p->flow, &c, BPF_NOEXIST) != 0) {
		/* A copy of this SYN won the race on another CPU. */
		bpf_map_delete_elem(&xlb_ret, &rk);
		return drop(XLB_STAT_DROP_SYN_RACE);
	}
	__sync_fetch_and_add(&bs->active, 1);
	__sync_fetch_and_add(&bs->new_conns, 1);
	count(XLB_STAT_NEW_CONN);

	p->new_saddr = c.laddr;
	p->new_daddr = c.baddr;
	p->new_sport = c.lport;
	p->new_dport = c.bport;
	p->nh = c.nh;
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
