// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* The xlb pipeline: a dispatcher and four stages chained by tail calls
 * through xlb_progs. Per-packet state travels in xlb_scratch; the layout
 * and each stage's contract are in docs/stage-abi.md. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
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
const struct xlb_conn_head *unused_chead __attribute__((unused));
const struct xlb_rconn_head *unused_rhead __attribute__((unused));

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

/* source_index6 is source_index for an IPv6 address. */
static __always_inline __u32 source_index6(const struct xlb_cfg *cfg, const __u32 *daddr)
{
	struct xlb_src6_slot *s;
	__u32 slot;

	if (addr6_eq(daddr, cfg->src6_0))
		return 1;
	if (!cfg->src6_mult)
		return 0;
	slot = (addr6_fold(daddr) * cfg->src6_mult) >> 26;
	s = bpf_map_lookup_elem(&xlb_src6_slots, &slot);
	if (!s || !addr6_eq(s->addr, daddr))
		return 0;
	return s->idx;
}

/* ICMPv6 errors that may be about a flow's packet (RFC 4443). */
#define ICMP6_DST_UNREACH 1
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3

/* parse6_icmp is parse_icmp for ICMPv6: an error about a packet xlb sent
 * to a backend goes to conntrack6 to be translated back to its client;
 * neighbour discovery and everything else goes to the kernel. */
static __always_inline int parse6_icmp(struct xdp_md *ctx, struct ipv6hdr *ip6, void *end)
{
	__u8 *icmp = (void *)(ip6 + 1);
	struct ipv6hdr *in = (void *)(icmp + ICMP_HLEN);
	struct udphdr *l4 = (void *)(in + 1);
	struct xlb_cfg *cfg;
	struct xlb_pkt *p;
	__u32 src;
	__u16 sport;

	if ((void *)(l4 + 1) > end || bpf_ntohs(ip6->payload_len) < ICMP_HLEN + sizeof(*in) + 8)
		return pass(XLB_STAT_PASS_NOT_TCP);
	if (icmp[0] != ICMP6_DST_UNREACH && icmp[0] != ICMP6_PACKET_TOO_BIG && icmp[0] != ICMP6_TIME_EXCEEDED)
		return pass(XLB_STAT_PASS_NOT_TCP);
	if (in->version != 6 || (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
		return pass(XLB_STAT_PASS_NOT_TCP);
	p = scratch();
	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	src = source_index6(cfg, (void *)&in->saddr);
	sport = bpf_ntohs(l4->source);
	if (!src || !addr6_eq((void *)&in->saddr, (void *)&ip6->daddr) || sport < cfg->port_lo ||
	    sport > cfg->port_hi)
		return pass(XLB_STAT_PASS_NOT_TCP);
	__builtin_memcpy(p->flow6.saddr, &in->daddr, 16);
	__builtin_memcpy(p->flow6.daddr, &in->saddr, 16);
	p->flow6.sport = l4->dest;
	p->flow6.dport = l4->source;
	p->flow6.proto = in->nexthdr;
	p->tcp_flags = 0;
	p->dir = XLB_DIR_RET;
	p->src_idx = src - 1;
	p->icmp = 1;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK6);
	return pass(XLB_STAT_TAILCALL_FAIL);
}

#define IPV6_FRAGMENT 44

/* parse6_fragment takes an IPv6 packet whose next header is a fragment
 * header as IPv4 fragments are taken: the first fragment of a TCP or UDP
 * packet for a VIP or a reply is dropped (xlb does not reassemble, and
 * the host's stack would answer a flow it does not know), counted
 * drop_fragment; a later fragment, which has no ports to tell whose it
 * is, and a fragment not for xlb pass, counted pass_fragment. */
static __always_inline int parse6_fragment(struct xdp_md *ctx, struct ipv6hdr *ip6, void *end)
{
	__u8 *frag = (void *)(ip6 + 1);
	struct udphdr *l4 = (void *)(frag + 8);
	struct xlb_vip_port6 *vp;
	struct xlb_cfg *cfg;
	__u32 port;
	__u16 dport;

	if ((void *)(frag + 8) > end)
		return drop(XLB_STAT_DROP_IP_LEN);
	/* The offset is the top 13 bits of bytes 2-3. */
	if ((frag[2] << 8 | frag[3]) & 0xfff8)
		return pass(XLB_STAT_PASS_FRAGMENT);
	if ((frag[0] != IPPROTO_TCP && frag[0] != IPPROTO_UDP) || (void *)(l4 + 1) > end)
		return pass(XLB_STAT_PASS_FRAGMENT);
	cfg = config();
	if (!cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	dport = bpf_ntohs(l4->dest);
	if (source_index6(cfg, (void *)&ip6->daddr) && dport >= cfg->port_lo && dport <= cfg->port_hi)
		return drop(XLB_STAT_DROP_FRAGMENT);
	port = vip_port_key(dport, frag[0]);
	vp = bpf_map_lookup_elem(&xlb_vip_ports6, &port);
	if (vp && vp->svc && (vp->svc == XLB_VIP_MULTI || addr6_eq(vp->addr, (void *)&ip6->daddr)))
		return drop(XLB_STAT_DROP_FRAGMENT);
	return pass(XLB_STAT_PASS_FRAGMENT);
}

/* parse6 is xlb_parse for IPv6: TCP, UDP or ICMPv6 right after the fixed
 * header (a packet with extension headers goes to the kernel), for a VIP
 * or in reply to one of the source addresses, on to conntrack6. */
static __always_inline int parse6(struct xdp_md *ctx, struct ipv6hdr *ip6, void *end)
{
	struct xlb_vip_port6 *vp = NULL;
	struct udphdr *udp = (void *)(ip6 + 1);
	struct tcphdr *tcp = (void *)(ip6 + 1);
	__u32 plen, doff, src, port;
	struct xlb_pkt *p;
	struct xlb_cfg *cfg;
	__u8 dir = 0, proto, flags = 0;
	__u16 dport;

	if ((void *)(ip6 + 1) > end)
		return drop(XLB_STAT_DROP_ETH_TRUNC);
	if (ip6->version != 6)
		return drop(XLB_STAT_DROP_IP_HDR);
	plen = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + plen > end)
		return drop(XLB_STAT_DROP_IP_LEN);
	proto = ip6->nexthdr;
	if (proto == IPPROTO_ICMPV6)
		return parse6_icmp(ctx, ip6, end);
	if (proto == IPV6_FRAGMENT)
		return parse6_fragment(ctx, ip6, end);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
		switch (proto) {
		case 0:   /* hop-by-hop options */
		case 43:  /* routing */
		case 50:  /* ESP */
		case 51:  /* AH */
		case 60:  /* destination options */
		case 135: /* mobility */
		case 139: /* HIP */
		case 140: /* shim6 */
			return pass(XLB_STAT_PASS_IPV6_EXT);
		}
		return pass(XLB_STAT_PASS_NOT_TCP);
	}
	if (proto == IPPROTO_TCP) {
		if ((void *)(tcp + 1) > end || plen < sizeof(*tcp))
			return drop(XLB_STAT_DROP_TCP_HDR);
		doff = tcp->doff * 4;
		if (doff < sizeof(*tcp) || doff > plen)
			return drop(XLB_STAT_DROP_TCP_HDR);
		flags = ((__u8 *)tcp)[13];
	} else {
		if ((void *)(udp + 1) > end || bpf_ntohs(udp->len) < sizeof(*udp) ||
		    bpf_ntohs(udp->len) > plen)
			return drop(XLB_STAT_DROP_UDP_HDR);
	}

	p = scratch();
	cfg = config();
	if (!p || !cfg)
		return drop(XLB_STAT_DROP_INTERNAL);
	dport = bpf_ntohs(udp->dest);
	src = source_index6(cfg, (void *)&ip6->daddr);
	if (src && dport >= cfg->port_lo && dport <= cfg->port_hi) {
		dir = XLB_DIR_RET;
	} else {
		port = vip_port_key(dport, proto);
		vp = bpf_map_lookup_elem(&xlb_vip_ports6, &port);
		if (vp && vp->svc && (vp->svc == XLB_VIP_MULTI || addr6_eq(vp->addr, (void *)&ip6->daddr)))
			dir = XLB_DIR_FWD;
	}
	if (!dir)
		return pass(XLB_STAT_PASS_NOT_OURS);

	__builtin_memcpy(p->flow6.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->flow6.daddr, &ip6->daddr, 16);
	p->flow6.sport = udp->source;
	p->flow6.dport = udp->dest;
	p->flow6.proto = proto;
	p->tcp_flags = flags;
	p->dir = dir;
	p->icmp = 0;
	if (dir == XLB_DIR_RET)
		p->src_idx = src - 1;
	else if (vp)
		p->vip6 = *vp;
	bpf_tail_call(ctx, &xlb_progs, XLB_STAGE_CONNTRACK6);
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

	if ((void *)(eth + 1) > end)
		return pass(XLB_STAT_PASS_NOT_IPV4);
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		if (eth->h_proto == bpf_htons(ETH_P_IPV6))
			return parse6(ctx, (void *)(eth + 1), end);
		return pass(XLB_STAT_PASS_NOT_IPV4);
	}
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

/* tcp_at returns the TCP header of a packet parse accepted, IPv6 when v6. */
static __always_inline struct tcphdr *tcp_at(struct xdp_md *ctx, int v6)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + (v6 ? XLB_TCP6_OFF : XLB_TCP_OFF);

	if ((void *)(tcp + 1) > end)
		return NULL;
	return tcp;
}

/* tcp_payload_len returns how many bytes of data a packet parse accepted
 * carries, IPv6 when v6. */
static __always_inline __u32 tcp_payload_len(struct xdp_md *ctx, const struct tcphdr *tcp, int v6)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + XLB_IP_OFF;
	struct iphdr *ip = data + XLB_IP_OFF;

	if (v6)
		return (void *)(ip6 + 1) > end ? 0 : bpf_ntohs(ip6->payload_len) - tcp->doff * 4;
	return (void *)(ip + 1) > end ? 0 : bpf_ntohs(ip->tot_len) - sizeof(*ip) - tcp->doff * 4;
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

/* client_addr_ok reports whether a packet's source address could be a
 * client's: not 0/8, loopback, multicast, reserved or broadcast, and not
 * the VIP itself. */
static __always_inline int client_addr_ok(__be32 saddr, __be32 daddr)
{
	__u32 top = bpf_ntohl(saddr) >> 24;

	return top != 0 && top != 127 && top < 224 && saddr != daddr;
}

/* The IPv6 forms of the helpers above. */

static __always_inline int service_of6(struct xlb_pkt *p)
{
	if (p->vip6.svc != XLB_VIP_MULTI) {
		if (!p->vip6.svc || !addr6_eq(p->vip6.addr, p->flow6.daddr))
			return 0;
		p->svc_id = p->vip6.svc - 1;
		return 1;
	}
	struct xlb_vip6 vip = {
		.port = p->flow6.dport,
		.proto = p->flow6.proto,
	};
	struct xlb_service *svc;

	addr6_copy(vip.addr, p->flow6.daddr);
	svc = bpf_map_lookup_elem(&xlb_services6, &vip);
	if (!svc)
		return 0;
	p->svc_id = svc->id;
	return 1;
}

/* client_addr_ok6 reports whether an IPv6 source address could be a
 * client's: not unspecified, loopback, multicast or IPv4-mapped, and not
 * the VIP itself. */
static __always_inline int client_addr_ok6(const __u32 *saddr, const __u32 *daddr)
{
	__u32 w0 = bpf_ntohl(saddr[0]);

	if ((w0 >> 24) == 0xff)
		return 0; /* multicast */
	if (!saddr[0] && !saddr[1]) {
		if (!saddr[2] && (!saddr[3] || saddr[3] == bpf_htonl(1)))
			return 0; /* :: and ::1 */
		if (saddr[2] == bpf_htonl(0xffff))
			return 0; /* ::ffff:a.b.c.d */
	}
	return !addr6_eq(saddr, daddr);
}

/* backend_weight is a backend's weight in its family's table, 0 when it
 * has none. */
static __always_inline __u32 backend_weight(__u32 *id, int v6)
{
	if (v6) {
		struct xlb_backend6 *b6 = bpf_map_lookup_elem(&xlb_backends6, id);

		return b6 ? b6->weight : 0;
	}
	struct xlb_backend *b = bpf_map_lookup_elem(&xlb_backends, id);

	return b ? b->weight : 0;
}

/* select_backend reads the service's selection table and returns a
 * backend id, or -1. hash is the flow's hash, for the hash mode. */
static __always_inline __s64 select_backend(struct xlb_pkt *p, __u32 hash, int v6)
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
		key = 1 + pick(hash, n);
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
			__u32 k = i + 1, w;
			__s64 active;

			id = bpf_map_lookup_elem(tbl, &k);
			if (!id)
				break;
			w = backend_weight(id, v6);
			bs = bpf_map_lookup_elem(&xlb_bk_stats, id);
			if (!w || !bs)
				continue;
			active = bs->active;
			if (active < 0)
				active = 0;
			/* active/weight < best_active/best_w, without division */
			if (!best_w || active * best_w < best_active * w) {
				best_active = active;
				best_w = w;
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

/* The conntrack and select stages of each family (xlb_family.h). */
#define XLB_CAT_(a, b) a##b
#define XLB_CAT(a, b) XLB_CAT_(a, b)
#define F(name) XLB_CAT(name, XLB_SFX)

#define XLB_SFX
#define CONN_T struct xlb_conn
#define RCONN_T struct xlb_rconn
#define FLOW_T struct xlb_flow
#define BACKEND_T struct xlb_backend
#define SRC_T __be32
#define SRC_ADDR(s) (*(s))
#define PKT_FLOW(p) ((p)->flow)
#define PKT_NEW_SADDR(p) ((p)->new_saddr)
#define PKT_NEW_DADDR(p) ((p)->new_daddr)
#define ADDR_FIELD(name) __be32 name
#define ADDR_CPY(to, from) ((to) = (from))
#define ADDR_EQ(a, b) ((a) == (b))
#define ADDR_FOLD(a) (a)
#define ADDR_XOR(a) (a)
#define MAP_CT_BUSY xlb_ct_busy
#define MAP_PORTS xlb_ports
#define STAGE_SELECT XLB_STAGE_SELECT
#define STAGE_REWRITE XLB_STAGE_REWRITE
#define IS_V6 0
#include "xlb_family.h"
#undef XLB_SFX
#undef CONN_T
#undef RCONN_T
#undef FLOW_T
#undef BACKEND_T
#undef SRC_T
#undef SRC_ADDR
#undef PKT_FLOW
#undef PKT_NEW_SADDR
#undef PKT_NEW_DADDR
#undef ADDR_FIELD
#undef ADDR_CPY
#undef ADDR_EQ
#undef ADDR_FOLD
#undef ADDR_XOR
#undef MAP_CT_BUSY
#undef MAP_PORTS
#undef STAGE_SELECT
#undef STAGE_REWRITE
#undef IS_V6

#define XLB_SFX 6
#define CONN_T struct xlb_conn6
#define RCONN_T struct xlb_rconn6
#define FLOW_T struct xlb_flow6
#define BACKEND_T struct xlb_backend6
#define SRC_T struct xlb_src6_slot
#define SRC_ADDR(s) ((s)->addr)
#define PKT_FLOW(p) ((p)->flow6)
#define PKT_NEW_SADDR(p) ((p)->new_saddr6)
#define PKT_NEW_DADDR(p) ((p)->new_daddr6)
#define ADDR_FIELD(name) __u32 name[4]
#define ADDR_CPY(to, from) addr6_copy(to, from)
#define ADDR_EQ(a, b) addr6_eq(a, b)
#define ADDR_FOLD(a) addr6_fold(a)
#define ADDR_XOR(a) ((a)[0] ^ (a)[1] ^ (a)[2] ^ (a)[3])
#define MAP_CT_BUSY xlb_ct6_busy
#define MAP_PORTS xlb_ports6
#define STAGE_SELECT XLB_STAGE_SELECT6
#define STAGE_REWRITE XLB_STAGE_REWRITE6
#define IS_V6 1
#include "xlb_family.h"

/* backend_traffic counts a rewritten packet and its bytes for its
 * connection's backend. */
static __always_inline void backend_traffic(const struct xlb_pkt *p, __u32 bytes)
{
	__u32 id = p->backend_id;
	struct xlb_traffic *bc = bpf_map_lookup_elem(&xlb_bk_ctr, &id);
	__u32 d = (p->dir - 1) & 1;

	if (!xlb_count_traffic || !bc)
		return;
	bc->packets[d]++;
	bc->bytes[d] += bytes;
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
				       void *end, __u64 addrs, __u32 optoff)
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
			acc = tcp_strip_ts(ctx, optoff, optlen, acc);
	} else {
		if (p->tcp_flags & TCP_FL_ACK) {
			old = tcp->ack_seq;
			tcp->ack_seq = seq_add(old, -p->seq_delta);
			acc = csum_acc32(acc, old, tcp->ack_seq);
		}
		if (optlen)
			acc = tcp_sack_sub(ctx, optoff, optlen, p->seq_delta, acc);
	}
	tcp->check = csum_finish(acc);
	tcp->source = p->new_sport;
	tcp->dest = p->new_dport;
	return 0;
}

/* transmit gives a rewritten frame its next hop's MACs and sends it there:
 * back out of the interface it came in on, or redirected. */
static __always_inline int transmit(struct xdp_md *ctx, struct ethhdr *eth, const struct xlb_nh *nh)
{
	__builtin_memcpy(eth->h_dest, nh->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, nh->smac, ETH_ALEN);
	if (nh->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	count(XLB_STAT_REDIRECT);
	return bpf_redirect(nh->ifindex, 0);
}

/* transmit_icmp finishes a translated ICMP error's checksum from its
 * accumulator and sends the error on. */
static __always_inline int transmit_icmp(struct xdp_md *ctx, struct ethhdr *eth, const struct xlb_nh *nh,
					 __u16 *icsum, void *end, __u64 icmp)
{
	if ((void *)(icsum + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	*icsum = csum_finish(icmp);
	count(XLB_STAT_ICMP_ERROR);
	return transmit(ctx, eth, nh);
}

/* transmit_flow counts a rewritten packet of a flow, len bytes of IP
 * packet, to its direction and backend and sends it on. */
static __always_inline int transmit_flow(struct xdp_md *ctx, const struct xlb_pkt *p, struct ethhdr *eth,
					 __u32 len)
{
	count(p->dir == XLB_DIR_FWD ? XLB_STAT_FWD : XLB_STAT_RET);
	backend_traffic(p, len);
	return transmit(ctx, eth, &p->nh);
}

/* rewrite_l4 rewrites the TCP or UDP header at l4 (TCP options at optoff
 * in the frame); addrs is the addresses' checksum change. Non-zero when
 * the header is not in the frame. */
static __always_inline int rewrite_l4(struct xdp_md *ctx, const struct xlb_pkt *p, __u8 proto, void *l4,
				      void *end, __u64 addrs, __u32 optoff)
{
	if (proto == IPPROTO_UDP)
		return rewrite_udp(p, l4, end, addrs);
	return rewrite_tcp(ctx, p, l4, end, addrs, optoff);
}

/* rewrite_quoted_l4 translates the ports, and for TCP the sequence number,
 * of the packet an ICMP error quotes at l4 (its first 8 bytes are in the
 * frame) back to the client's flow. l4acc holds the quoted addresses' and
 * ports' change, which the quoted checksum takes when the quote holds it
 * (below quote_end, the quoted packet's end, and below end); icmp is the
 * ICMP checksum's accumulator, returned with the changes added. */
static __always_inline __u64 rewrite_quoted_l4(const struct xlb_pkt *p, __u8 proto, __u8 *l4, void *quote_end,
					       void *end, __u64 l4acc, __u64 icmp)
{
	__u16 *lsum = NULL, old16;
	__be32 old32;

	*(__be16 *)l4 = p->new_dport;
	*(__be16 *)(l4 + 2) = p->new_sport;
	if (proto == IPPROTO_TCP) {
		old32 = *(__be32 *)(l4 + 4);
		*(__be32 *)(l4 + 4) = seq_add(old32, -p->seq_delta);
		l4acc = csum_acc32(l4acc, old32, *(__be32 *)(l4 + 4));
		icmp = csum_acc32(icmp, old32, *(__be32 *)(l4 + 4));
		if ((void *)(l4 + 18) <= end && (void *)l4 + 18 <= quote_end)
			lsum = (void *)(l4 + 16);
	} else if (*(__u16 *)(l4 + 6)) {
		lsum = (void *)(l4 + 6);
	}
	if (lsum && (void *)(lsum + 1) <= end) {
		old16 = *lsum;
		*lsum = csum_finish(csum_start(old16) + l4acc);
		if (proto == IPPROTO_UDP && !*lsum)
			*lsum = 0xffff;
		icmp = csum_acc16(icmp, old16, *lsum);
	}
	return icmp;
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
	__u16 old16;
	__u64 outer, inner, l4acc, icmp;

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
	icmp = rewrite_quoted_l4(p, p->flow.proto, l4, (void *)ip + bpf_ntohs(ip->tot_len), end, l4acc, icmp);
	return transmit_icmp(ctx, eth, &p->nh, icsum, end, icmp);
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

	if (!p || (void *)(ip + 1) > end || ip->ihl != 5)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->icmp)
		return rewrite_icmp(ctx, p);

	/* The addresses' change counts in both checksums (the L4 one
	 * through its pseudo-header). */
	addrs = csum_acc32(csum_acc32(0, ip->saddr, p->new_saddr), ip->daddr, p->new_daddr);
	if (rewrite_l4(ctx, p, p->flow.proto, (void *)(ip + 1), end, addrs, XLB_OPT_OFF))
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
	return transmit_flow(ctx, p, eth, bpf_ntohs(ip->tot_len));
}

/* rewrite_icmp6 is rewrite_icmp for ICMPv6. ICMPv6 has no IP header
 * checksum to mend, but its own checksum covers a pseudo-header with the
 * outer addresses, so their change counts in it too. */
static __always_inline int rewrite_icmp6(struct xdp_md *ctx, const struct xlb_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u16 *icsum = (void *)(ip6 + 1) + 2;
	struct ipv6hdr *in = (void *)(ip6 + 1) + ICMP_HLEN;
	__u8 *l4 = (void *)(in + 1);
	__u64 l4acc, icmp;

	if ((void *)(l4 + 8) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	icmp = csum_start(*icsum);
	icmp = csum_addr6(icmp, (void *)&ip6->saddr, p->new_saddr6);
	icmp = csum_addr6(icmp, (void *)&ip6->daddr, p->new_daddr6);
	__builtin_memcpy(&ip6->saddr, p->new_saddr6, 16);
	__builtin_memcpy(&ip6->daddr, p->new_daddr6, 16);

	/* The quoted packet went from the source address to the backend: it
	 * becomes the client's to the VIP. */
	l4acc = csum_addr6(0, (void *)&in->saddr, p->new_daddr6);
	l4acc = csum_addr6(l4acc, (void *)&in->daddr, p->new_saddr6);
	l4acc = csum_acc16(l4acc, *(__be16 *)l4, p->new_dport);
	l4acc = csum_acc16(l4acc, *(__be16 *)(l4 + 2), p->new_sport);
	icmp += l4acc;
	__builtin_memcpy(&in->saddr, p->new_daddr6, 16);
	__builtin_memcpy(&in->daddr, p->new_saddr6, 16);
	icmp = rewrite_quoted_l4(p, p->flow6.proto, l4, (void *)(ip6 + 1) + bpf_ntohs(ip6->payload_len), end,
				 l4acc, icmp);
	return transmit_icmp(ctx, eth, &p->nh, icsum, end, icmp);
}

/* xlb_rewrite6 is xlb_rewrite for IPv6: no header checksum, 128-bit
 * addresses in the TCP or UDP pseudo-header. */
SEC("xdp")
int xlb_rewrite6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct xlb_pkt *p = scratch();
	__u64 addrs;

	if (!p || (void *)(ip6 + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	if (p->icmp)
		return rewrite_icmp6(ctx, p);

	addrs = csum_addr6(csum_addr6(0, (void *)&ip6->saddr, p->new_saddr6), (void *)&ip6->daddr,
			   p->new_daddr6);
	if (rewrite_l4(ctx, p, p->flow6.proto, (void *)(ip6 + 1), end, addrs, XLB_OPT6_OFF))
		return drop(XLB_STAT_DROP_INTERNAL);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > end)
		return drop(XLB_STAT_DROP_INTERNAL);
	__builtin_memcpy(&ip6->saddr, p->new_saddr6, 16);
	__builtin_memcpy(&ip6->daddr, p->new_daddr6, 16);
	return transmit_flow(ctx, p, eth, sizeof(*ip6) + bpf_ntohs(ip6->payload_len));
}
