/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The conntrack and select stages, written once for both address
 * families: programs/xlb.c includes this file twice, first for IPv4, then
 * for IPv6, each time with these macros defined (see "Families" in
 * docs/stage-abi.md):
 *
 *   F(name)            the family's name of a function, map or type: name
 *                      for IPv4, name##6 for IPv6
 *   CONN_T, RCONN_T, FLOW_T, BACKEND_T
 *                      the family's connection slot, port way, flow key and
 *                      backend
 *   SRC_T, SRC_ADDR(s) a source address table entry, and its address
 *   PKT_FLOW(p), PKT_NEW_SADDR(p), PKT_NEW_DADDR(p)
 *                      the family's fields of the per-packet state
 *   ADDR_FIELD(name)   declares an address member
 *   ADDR_CPY(to, from), ADDR_EQ(a, b)
 *                      copy and compare addresses
 *   ADDR_FOLD(a)       an address as 32 bits, every bit mixed (the SYN
 *                      defence's keys)
 *   ADDR_XOR(a)        an address as 32 bits, its words XORed (inputs of
 *                      a keyed hash)
 *   MAP_CT_BUSY, MAP_PORTS
 *                      the connection table's occupancy bitmap, the ports
 *   STAGE_SELECT, STAGE_REWRITE, IS_V6
 *
 * For IPv4 the macros expand to what the code said before IPv6 existed,
 * so the IPv4 stages compile to the same instructions. No include guard:
 * that is the point. */

/* forward_along hands the rewrite of an existing connection, read from
 * its slot at seq, to the rewrite stage. */
static __always_inline int F(forward_along)(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					    CONN_T *c, __u32 seq, __u64 now)
{
	struct xlb_backend_stats *bs;

	c->last_seen_j = now;
	ADDR_CPY(PKT_NEW_SADDR(p), c->laddr);
	ADDR_CPY(PKT_NEW_DADDR(p), c->baddr);
	p->new_sport = c->lport;
	p->new_dport = c->bport;
	p->seq_delta = c->seq_delta;
	p->backend_id = c->backend_id;
	bs = F(backend_nexthop)(ctx, cfg, c->backend_id, c->laddr, c->baddr, now);
	if (!bs)
		return drop(XLB_STAT_DROP_FIB);
	p->nh = bs->nh;
	if (!ct_stable(&c->seq, seq))
		return drop(XLB_STAT_DROP_CT_RACE);
	bpf_tail_call(ctx, &xlb_progs, STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* fwd_control follows a client's FIN or RST, and forwards any packet of
 * an ended connection only while its source port is still its own. It
 * returns 0 to go on, or a verdict. */
static __always_inline int F(fwd_control)(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					  CONN_T *c, struct tcphdr *tcp, __u64 now)
{
	RCONN_T *r = F(port_entry)(cfg, c->src_idx, bpf_ntohs(c->lport), c->baddr, c->bport);
	__u8 fl = p->tcp_flags;
	__u32 seqb;

	if (!r || !F(port_owned)(r, c))
		return drop(XLB_STAT_DROP_STALE);
	if (!(fl & (TCP_FL_FIN | TCP_FL_RST)))
		return 0;
	seqb = bpf_ntohl(tcp->seq) + c->seq_delta;
	if (!in_window(seqb, r->ack_b, XLB_WIN_CLIENT)) {
		count(XLB_STAT_UNTRUSTED_RST_FIN);
		return 0;
	}
	if (fl & TCP_FL_RST) {
		F(conn_mark)(c, XLB_CF_RST, r, now);
		return 0;
	}
	/* The backend's next expected sequence number once it has the
	 * FIN: the next connection on this port must start after it. */
	r->tw_seq = seqb + tcp_payload_len(ctx, tcp, IS_V6) + 1;
	r->flags |= XLB_RF_TW_SEQ;
	F(conn_mark)(c, XLB_CF_FIN_C, r, now);
	return 0;
}

/* conntrack_udp forwards a UDP packet along its flow, or hands the first
 * packet of a new flow to select. */
static __always_inline int F(conntrack_udp)(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					    __u64 now)
{
	__u32 seq;
	CONN_T *c = F(ct_find)(cfg, &PKT_FLOW(p), &seq);

	if (c)
		return F(forward_along)(ctx, cfg, p, c, seq, now);
	if (!F(service_of)(p))
		return pass(XLB_STAT_PASS_NOT_OURS);
	bpf_tail_call(ctx, &xlb_progs, STAGE_SELECT);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* reset_stray answers a segment for a VIP that belongs to no connection
 * (its entry expired, was ended by the control plane, or never existed)
 * with a RST, as a host answers a segment for a closed port (RFC 9293
 * 3.10.7.1): the client learns at once that its connection is gone
 * instead of retransmitting into silence. Only a segment whose source
 * could be a client and whose checksums are right is answered. */
static __always_inline int F(reset_stray)(struct xdp_md *ctx, struct xlb_pkt *p, struct tcphdr *tcp, __u8 fl)
{
	__u32 len;

	if (!F(client_addr_ok)(PKT_FLOW(p).saddr, PKT_FLOW(p).daddr))
		return drop(XLB_STAT_DROP_BAD_SOURCE);
	if (!F(l4_csum_ok)(ctx, IPPROTO_TCP))
		return drop(XLB_STAT_DROP_BAD_CSUM);
	count(XLB_STAT_RESET_NO_CONN);
	if (fl & TCP_FL_ACK)
		return F(tcp_reply)(ctx, TCP_FL_RST, bpf_ntohl(tcp->ack_seq), 0);
	len = tcp_payload_len(ctx, tcp, IS_V6) + !!(fl & TCP_FL_SYN) + !!(fl & TCP_FL_FIN);
	return F(tcp_reply)(ctx, TCP_FL_RST | TCP_FL_ACK, 0, bpf_ntohl(tcp->seq) + len);
}

static __always_inline int F(conntrack_fwd)(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					    __u64 now)
{
	__u8 fl = p->tcp_flags;
	CONN_T *c;
	struct tcphdr *tcp;
	__u32 seq, flags;
	int v;

	if (PKT_FLOW(p).proto == IPPROTO_UDP)
		return F(conntrack_udp)(ctx, cfg, p, now);
	/* A SYN goes straight to select, which finds an existing
	 * connection of its flow while it looks for a slot. */
	if ((fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_SYN) {
		bpf_tail_call(ctx, &xlb_progs, STAGE_SELECT);
		return pass(XLB_STAT_TAILCALL_FAIL);
	}
	tcp = tcp_at(ctx, IS_V6);
	if (!tcp)
		return drop(XLB_STAT_DROP_INTERNAL);
	c = F(ct_find)(cfg, &PKT_FLOW(p), &seq);
	if (!c) {
		if (!F(service_of)(p))
			return pass(XLB_STAT_PASS_NOT_OURS);
		if (fl & TCP_FL_RST) {
			/* A client's answer to a SYN challenge. */
			if (F(syn_validate)(cfg, &PKT_FLOW(p), bpf_ntohl(tcp->seq), now))
				return drop(XLB_STAT_SYN_VALIDATED);
			return drop(XLB_STAT_DROP_NO_CONN);
		}
		return F(reset_stray)(ctx, p, tcp, fl);
	}
	flags = c->flags;
	if ((fl & (TCP_FL_FIN | TCP_FL_RST)) || conn_closed(flags)) {
		v = F(fwd_control)(ctx, cfg, p, c, tcp, now);
		if (v)
			return v;
	} else if ((flags & (XLB_CF_SYNACK | XLB_CF_ESTAB)) == XLB_CF_SYNACK && (fl & TCP_FL_ACK) &&
		   bpf_ntohl(tcp->ack_seq) == c->isn_b + 1) {
		/* The client's ACK of the backend's SYN-ACK: only now is
		 * the connection established. */
		F(conn_mark)(c, XLB_CF_ESTAB, NULL, now);
	}
	if ((fl & (TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_ACK)
		c->ack_c = bpf_ntohl(tcp->ack_seq);
	return F(forward_along)(ctx, cfg, p, c, seq, now);
}

/* ret_control follows a backend's SYN-ACK, FIN or RST in its connection's
 * slot, found from the way. */
static __always_inline void F(ret_control)(const struct xlb_cfg *cfg, struct xlb_pkt *p, RCONN_T *r,
					   struct tcphdr *tcp, __u64 now)
{
	FLOW_T fk = {
		.sport = r->cport,
		.dport = r->vport,
		.proto = IPPROTO_TCP,
	};
	__u8 fl = p->tcp_flags;
	__u32 seq, seqb = bpf_ntohl(tcp->seq);
	CONN_T *c;
	int ok;

	ADDR_CPY(fk.saddr, r->caddr);
	ADDR_CPY(fk.daddr, r->vaddr);
	c = F(ct_find)(cfg, &fk, &seq);

	/* The flow's connection may be a newer one on another port. */
	if (!c || c->lport != PKT_FLOW(p).dport || !ADDR_EQ(c->baddr, PKT_FLOW(p).saddr) ||
	    c->bport != PKT_FLOW(p).sport)
		return;
	if ((fl & (TCP_FL_SYN | TCP_FL_ACK | TCP_FL_RST)) == (TCP_FL_SYN | TCP_FL_ACK)) {
		if (!(c->flags & XLB_CF_SYNACK)) {
			c->isn_b = seqb;
			c->ack_c = seqb + 1;
		}
		F(conn_mark)(c, XLB_CF_SYNACK, r, now);
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
	F(conn_mark)(c, (fl & TCP_FL_RST) ? XLB_CF_RST : XLB_CF_FIN_B, r, now);
}

static __always_inline int F(conntrack_ret)(struct xdp_md *ctx, const struct xlb_cfg *cfg, struct xlb_pkt *p,
					    __u64 now)
{
	__u8 fl = p->tcp_flags;
	RCONN_T *r;
	struct tcphdr *tcp;

	r = F(port_entry)(cfg, p->src_idx, bpf_ntohs(PKT_FLOW(p).dport), PKT_FLOW(p).saddr,
			  PKT_FLOW(p).sport);
	if (!r || r->state == XLB_PS_FREE || !ADDR_EQ(r->baddr, PKT_FLOW(p).saddr) ||
	    r->bport != PKT_FLOW(p).sport || !(r->flags & XLB_RF_UDP) != (PKT_FLOW(p).proto == IPPROTO_TCP))
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (p->icmp) {
		/* An error is no sign of life: it changes nothing. */
	} else if (PKT_FLOW(p).proto == IPPROTO_TCP) {
		tcp = tcp_at(ctx, IS_V6);
		if (!tcp)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (fl & (TCP_FL_SYN | TCP_FL_FIN | TCP_FL_RST))
			F(ret_control)(cfg, p, r, tcp, now);
		/* What the backend acknowledged bounds the client's RST
		 * and FIN. A RST's acknowledgement, valid or forged, moves
		 * nothing. */
		if ((fl & (TCP_FL_ACK | TCP_FL_RST)) == TCP_FL_ACK)
			r->ack_b = bpf_ntohl(tcp->ack_seq);
	}
	r->last_seen_j = now;
	F(client_nexthop)(ctx, cfg, r, now);
	ADDR_CPY(PKT_NEW_SADDR(p), r->vaddr);
	ADDR_CPY(PKT_NEW_DADDR(p), r->caddr);
	p->new_sport = r->vport;
	p->new_dport = r->cport;
	p->seq_delta = r->seq_delta;
	p->backend_id = r->backend_id;
	p->nh = r->nh;
	bpf_tail_call(ctx, &xlb_progs, STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

/* xlb_conntrack finds the connection of a packet, follows its TCP state
 * and hands the rewrite to the rewrite stage; a SYN of a new flow goes to
 * select. */
SEC("xdp")
int F(xlb_conntrack)(struct xdp_md *ctx)
{
	struct xlb_pkt *p = scratch();
	struct xlb_cfg *cfg = config();
	__u64 now = bpf_jiffies64();

	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->dir == XLB_DIR_FWD)
		return F(conntrack_fwd)(ctx, cfg, p, now);
	return F(conntrack_ret)(ctx, cfg, p, now);
}

/* State of the walk over a service's source addresses for a free port
 * (bpf_loop: the verifier checks its body once, where an open-coded walk
 * of 16 addresses of 16 probes each is too much for it). */
struct F(source_walk) {
	__u32 mask;  /* the service's source addresses */
	__u32 first; /* the one to start from */
	ADDR_FIELD(baddr);
	__be16 bport;
	__u16 pad;
	__u64 now;
	__s32 idx; /* out: the way taken in xlb_ports, or -1 */
	__u32 src; /* out: its source address */
	__u32 off; /* out: its port's offset in the range */
};

static long F(source_step)(__u64 k, void *arg)
{
	struct F(source_walk) *w = arg;
	__u32 s = (w->first + k) & (XLB_MAX_SOURCES - 1), off = 0;
	struct xlb_cfg *cfg = config();
	RCONN_T *r;

	if (!cfg || !(w->mask & (1u << s)))
		return 0;
	r = F(claim_port)(cfg, s, w->baddr, w->bport, &off, w->now);
	if (!r)
		return 0;
	w->idx = (s * XLB_PORT_WAYS + F(port_way)(w->baddr, w->bport)) * cfg->nports + off;
	w->src = s;
	w->off = off;
	return 1;
}

/* refuse answers a SYN with a RST that acknowledges it, so the client
 * gives up at once instead of retrying for a minute. */
static __always_inline int F(refuse)(struct xdp_md *ctx, __u32 stat)
{
	struct tcphdr *tcp = tcp_at(ctx, IS_V6);

	count(stat);
	if (!tcp)
		return XDP_DROP;
	return F(tcp_reply)(ctx, TCP_FL_RST | TCP_FL_ACK, 0,
			    bpf_ntohl(tcp->seq) + 1 + tcp_payload_len(ctx, tcp, IS_V6));
}

/* xlb_select creates the connection of a SYN: it finds the service,
 * chooses a backend, takes a slot in the connection table, claims a
 * source port unique for that backend on one of the service's source
 * addresses and chooses the backend-side ISN. A SYN whose flow has a live
 * connection (a retransmission) goes along it, with the same ISN; one
 * whose connection ended (closed, or idle past its timeout) replaces it:
 * a client may reuse its port at once. */
SEC("xdp")
int F(xlb_select)(struct xdp_md *ctx)
{
	struct xlb_pkt *p = scratch();
	struct xlb_backend_stats *bs;
	CONN_T *c = NULL;
	RCONN_T *r = NULL;
	BACKEND_T *b;
	struct xlb_cfg *cfg;
	struct tcphdr *tcp;
	struct ethhdr *eth;
	__u64 now = bpf_jiffies64();
	__u32 bid, seq = 0, slot = 0, off = 0, mask, *maskp, isn = 0, src = 0, h;
	SRC_T *laddr = NULL;
	__s64 sel;
	int first, udp;

	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	/* First whether the SYN is for a VIP at all: a SYN to another
	 * address on a VIP's port must not take (or evict) a slot. */
	if (!F(service_of)(p))
		return pass(XLB_STAT_PASS_NOT_OURS);
	if (!F(client_addr_ok)(PKT_FLOW(p).saddr, PKT_FLOW(p).daddr))
		return drop(XLB_STAT_DROP_BAD_SOURCE);
	if (!F(l4_csum_ok)(ctx, PKT_FLOW(p).proto))
		return drop(XLB_STAT_DROP_BAD_CSUM);
	udp = PKT_FLOW(p).proto == IPPROTO_UDP;

	h = F(flow_hash)(&PKT_FLOW(p));
	switch (F(ct_claim)(cfg, &PKT_FLOW(p), h, &c, &seq, &slot)) {
	case CT_EXISTS:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (!conn_closed(c->flags) && !conn_expired(cfg, c->flags, c->last_seen_j, now))
			return F(forward_along)(ctx, cfg, p, c, seq, now);
		if (!ct_take(&c->seq, seq))
			return drop(XLB_STAT_DROP_CT_RACE);
		F(conn_end)(cfg, c, XLB_STAT_RECYCLED, now);
		break;
	case CT_NEW:
		if (!c)
			return drop(XLB_STAT_DROP_INTERNAL);
		if (c->flags && !(c->flags & XLB_CF_DEAD))
			F(conn_end)(cfg, c, XLB_STAT_EVICTED, now);
		break;
	default:
		return drop(XLB_STAT_DROP_CT_RACE);
	}
	/* The slot is ours (odd) from here: every exit frees it or fills it. */
	c->flags = XLB_CF_DEAD;

	sel = select_backend(p, h, IS_V6);
	bid = sel;
	b = sel < 0 ? NULL : bpf_map_lookup_elem(&F(xlb_backends), &bid);
	maskp = bpf_map_lookup_elem(&xlb_svc_src, &p->svc_id);
	mask = maskp ? *maskp : 0;
	first = first_source(mask, h);
	if (first >= 0) {
		src = first;
		laddr = bpf_map_lookup_elem(&F(xlb_src), &src);
	}
	if (!b || !b->weight || !laddr) {
		ct_publish(&c->seq);
		return udp ? drop(XLB_STAT_DROP_NO_BACKEND) : F(refuse)(ctx, XLB_STAT_RST_NO_BACKEND);
	}
	bs = F(backend_nexthop)(ctx, cfg, bid, SRC_ADDR(laddr), b->addr, now);
	if (!bs) {
		ct_publish(&c->seq);
		return drop(XLB_STAT_DROP_FIB);
	}
	if (!udp && syn_challenge_due(cfg, bs, ADDR_FOLD(PKT_FLOW(p).saddr), now)) {
		ct_publish(&c->seq);
		count(XLB_STAT_SYN_CHALLENGE);
		return F(tcp_reply)(ctx, TCP_FL_SYN | TCP_FL_ACK, rand32(),
				    F(syn_cookie)(cfg, &PKT_FLOW(p), syn_slot(cfg, now)));
	}
	/* A port of the first source address with one free, from the one
	 * the flow's hash picks, so flows spread evenly over them. */
	{
		struct F(source_walk) w = {
			.mask = mask,
			.first = first,
			.bport = b->port,
			.now = now,
			.idx = -1,
		};

		ADDR_CPY(w.baddr, b->addr);
		bpf_loop(XLB_MAX_SOURCES, F(source_step), &w, 0);
		if (w.idx >= 0) {
			__u32 idx = w.idx;

			r = bpf_map_lookup_elem(&MAP_PORTS, &idx);
			src = w.src;
			off = w.off;
		}
	}
	laddr = bpf_map_lookup_elem(&F(xlb_src), &src);
	if (!r || !laddr) {
		ct_publish(&c->seq);
		__sync_fetch_and_add(&bs->no_port, 1);
		return udp ? drop(XLB_STAT_DROP_NO_PORT) : F(refuse)(ctx, XLB_STAT_RST_NO_PORT);
	}
	eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end) {
		ct_publish(&c->seq);
		return drop(XLB_STAT_DROP_INTERNAL);
	}

	c->key = PKT_FLOW(p);
	ADDR_CPY(c->laddr, SRC_ADDR(laddr));
	ADDR_CPY(c->baddr, b->addr);
	c->bport = b->port;
	c->lport = bpf_htons(cfg->port_lo + off);
	c->backend_id = bid;
	c->src_idx = src;
	c->last_seen_j = now;
	c->seq_delta = 0;
	if (!udp) {
		tcp = tcp_at(ctx, IS_V6);
		if (!tcp) {
			__sync_val_compare_and_swap(&r->state, XLB_PS_USED, XLB_PS_FREE);
			ct_publish(&c->seq);
			return drop(XLB_STAT_DROP_INTERNAL);
		}
		isn = backend_isn(cfg, r->flags, r->tw_seq, ADDR_XOR(c->laddr), c->lport, ADDR_XOR(b->addr),
				  b->port, now);
		c->seq_delta = isn - bpf_ntohl(tcp->seq);
	}
	c->isn_b = 0;
	c->ack_c = 0;
	c->flags = udp ? XLB_CF_UDP : XLB_CF_SYN;

	/* Replies go back the way the SYN came (its MACs and interface)
	 * until the return path asks the FIB, nh_ttl later. */
	ADDR_CPY(r->baddr, b->addr);
	r->bport = b->port;
	ADDR_CPY(r->caddr, PKT_FLOW(p).saddr);
	r->cport = PKT_FLOW(p).sport;
	ADDR_CPY(r->vaddr, PKT_FLOW(p).daddr);
	r->vport = PKT_FLOW(p).dport;
	r->flags = udp ? XLB_RF_UDP : 0;
	r->backend_id = bid;
	r->last_seen_j = now;
	r->nh_j = now;
	r->seq_delta = c->seq_delta;
	r->ack_b = isn + 1;
	r->nh.ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(r->nh.dmac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(r->nh.smac, eth->h_dest, ETH_ALEN);
	ct_publish(&c->seq);
	mark_busy(&MAP_CT_BUSY, slot);

	__sync_fetch_and_add(&bs->active, 1);
	if (!udp)
		__sync_fetch_and_add(&bs->half_open, 1);
	__sync_fetch_and_add(&bs->new_conns, 1);
	count(XLB_STAT_NEW_CONN);

	ADDR_CPY(PKT_NEW_SADDR(p), c->laddr);
	ADDR_CPY(PKT_NEW_DADDR(p), b->addr);
	p->new_sport = c->lport;
	p->new_dport = b->port;
	p->seq_delta = c->seq_delta;
	p->backend_id = bid;
	p->nh = bs->nh;
	bpf_tail_call(ctx, &xlb_progs, STAGE_REWRITE);
	return pass(XLB_STAT_TAILCALL_FAIL);
}
