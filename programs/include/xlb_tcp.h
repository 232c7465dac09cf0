/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* TCP and UDP at the byte level: sequence translation, options,
 * checksums checked in full, and replies built from a received SYN. Every
 * function here works on a packet that parse accepted: Ethernet, IPv4
 * without options (IHL 5), TCP with a data offset inside the packet or
 * UDP with a length inside it. */
#ifndef XLB_TCP_H
#define XLB_TCP_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/ipv6.h>
#include "xlb_common.h"
#include "xlb_csum.h"

/* Offsets in a packet parse accepted. */
#define XLB_IP_OFF ETH_HLEN
#define XLB_TCP_OFF (XLB_IP_OFF + 20)
#define XLB_OPT_OFF (XLB_TCP_OFF + 20)
#define XLB_TCP6_OFF (XLB_IP_OFF + 40) /* after an IPv6 header */
#define XLB_OPT6_OFF (XLB_TCP6_OFF + 20)
#define XLB_REPLY_LEN XLB_OPT_OFF /* a reply: headers only */
#define XLB_MAX_OPT_LEN 40
/* A SYN whose TCP checksum is checked in full carries at most this many
 * bytes of TCP (header, options and any data, as with TCP Fast Open). */
#define XLB_MAX_SYN_LEN 1480

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_SACK 5
#define TCPOPT_TIMESTAMP 8
#define TCPOLEN_TIMESTAMP 10

/* seq_add adds d to a sequence number in network order, modulo 2^32. */
static __always_inline __be32 seq_add(__be32 s, __u32 d)
{
	return bpf_htonl(bpf_ntohl(s) + d);
}

/* csum_acc_byte adds the change of one byte at offset off of the TCP
 * header: in the sum's 16-bit words (host memory order, as the checksum
 * field is read) a byte at an even offset is the low half, at an odd
 * offset the high half. */
static __always_inline __u64 csum_acc_byte(__u64 acc, __u32 off, __u8 old, __u8 new)
{
	__u32 sh = (off & 1) * 8;

	return csum_acc16(acc, (__u16)old << sh, (__u16)(new) << sh);
}

/* csum_acc32_at adds the change of a 32-bit field at offset off of the
 * TCP header: at an odd offset its bytes straddle three words, which sums
 * like the value rotated by a byte. */
static __always_inline __u64 csum_acc32_at(__u64 acc, __u32 off, __u32 old, __u32 new)
{
	if (off & 1) {
		old = (old << 8) | (old >> 24);
		new = (new << 8) | (new >> 24);
	}
	return csum_acc32(acc, old, new);
}

/* State of a walk over a packet's TCP options with bpf_loop (inlined by
 * the verifier since 5.19: a plain loop whose body it checks once, where
 * an open-coded walk over up to 40 options of any length is too much for
 * it). */
struct opt_walk {
	struct xdp_md *ctx;
	__u32 optoff; /* where the options start in the packet */
	__u32 optlen; /* bytes of options after the fixed header */
	__u32 i;      /* where the next option starts */
	__s32 at;     /* the option found, or -1 */
	__u8 want;    /* its kind */
	__u8 len;     /* its length */
};

static long opt_walk_step(__u64 n, void *arg)
{
	struct opt_walk *w = arg;
	void *data = (void *)(long)w->ctx->data;
	void *end = (void *)(long)w->ctx->data_end;
	__u8 *o = data + (w->optoff & 127) + (w->i & 63);

	if (w->i >= w->optlen || (void *)(o + 2) > end || o[0] == TCPOPT_EOL)
		return 1;
	if (o[0] == TCPOPT_NOP) {
		w->i++;
		return 0;
	}
	if (o[1] < 2 || w->i + o[1] > w->optlen)
		return 1;
	if (o[0] == w->want) {
		w->at = w->i;
		w->len = o[1];
		return 1;
	}
	w->i += o[1];
	return 0;
}

/* tcp_opt_find returns the offset in the options of the packet's first
 * TCP option of kind want, setting *len, or -1. Malformed options end the
 * walk: the packet is then forwarded as it is, as a router would. */
static __always_inline int tcp_opt_find(struct xdp_md *ctx, __u32 optoff, __u32 optlen, __u8 want, __u8 *len)
{
	struct opt_walk w = { .ctx = ctx, .optoff = optoff, .optlen = optlen, .at = -1, .want = want };

	bpf_loop(XLB_MAX_OPT_LEN, opt_walk_step, &w, 0);
	*len = w.len;
	return w.at;
}

/* tcp_strip_ts replaces a SYN's timestamp option with NOPs, so that the
 * connection negotiates no timestamps (see docs/architecture.md), and
 * returns the checksum accumulator with the change. */
static __always_inline __u64 tcp_strip_ts(struct xdp_md *ctx, __u32 optoff, __u32 optlen, __u64 acc)
{
	__u8 len = 0, *o;
	int at = tcp_opt_find(ctx, optoff, optlen, TCPOPT_TIMESTAMP, &len);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 k;

	if (at < 0 || len != TCPOLEN_TIMESTAMP)
		return acc;
	o = data + optoff + (at & 63);
	if ((void *)(o + TCPOLEN_TIMESTAMP) > end)
		return acc;
	for (k = 0; k < TCPOLEN_TIMESTAMP; k++) {
		acc = csum_acc_byte(acc, 20 + at + k, o[k], TCPOPT_NOP);
		o[k] = TCPOPT_NOP;
	}
	return acc;
}

/* tcp_sack_sub takes delta from both edges of every block of a reply's
 * SACK option (they acknowledge the client's data in the backend's
 * sequence space) and returns the checksum accumulator with the change. */
static __always_inline __u64 tcp_sack_sub(struct xdp_md *ctx, __u32 optoff, __u32 optlen, __u32 delta,
					  __u64 acc)
{
	__u8 len = 0, *o;
	int at = tcp_opt_find(ctx, optoff, optlen, TCPOPT_SACK, &len);
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 k;

	if (at < 0 || len < 10 || (len - 2) % 8)
		return acc;
	o = data + optoff + (at & 63);
	for (k = 0; k < 8; k++) {
		__u32 old, new, *edge = (void *)(o + 2 + 4 * k);

		if (2 + 4 * k >= len || (void *)(edge + 1) > end)
			break;
		old = *edge;
		new = seq_add(old, -delta);
		acc = csum_acc32_at(acc, 20 + at + 2 + 4 * k, old, new);
		*edge = new;
	}
	return acc;
}

/* csum_words sums n 16-bit words from p (host memory order). */
static __always_inline __u64 csum_words(const __u16 *p, __u32 n)
{
	__u64 sum = 0;
	__u32 i;

	for (i = 0; i < n; i++)
		sum += p[i];
	return sum;
}

/* l4_pseudo sums the TCP or UDP pseudo-header. */
static __always_inline __u64 l4_pseudo(__be32 saddr, __be32 daddr, __u8 proto, __u32 len)
{
	return (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) + (daddr >> 16) + bpf_htons(proto) +
	       bpf_htons(len);
}

/* l4_sum_ok adds the len bytes of an L4 header and payload at w (len at
 * most XLB_MAX_SYN_LEN) to sum, a pseudo-header's, and reports whether the
 * checksum they hold is right: 0 too when the packet ends before len. */
static __always_inline int l4_sum_ok(const __u16 *w, const void *end, __u32 len, __u64 sum)
{
	__u32 i;

	for (i = 0; i < XLB_MAX_SYN_LEN / 2; i++) {
		if (2 * i + 1 >= len)
			break;
		if ((const void *)(w + i + 1) > end)
			return 0;
		sum += w[i];
	}
	if (len & 1) {
		const __u8 *last = (const void *)w + len - 1;

		if ((const void *)(last + 1) > end)
			return 0;
		sum += *last; /* an even offset: the low half of its word */
	}
	return csum_finish(sum) == 0;
}

/* l4_csum_ok checks the IPv4 and TCP or UDP checksums of the first
 * packet of a flow (a TCP SYN, or a UDP datagram) in full, so that a
 * corrupted or forged packet never takes a connection slot or a source
 * port. A UDP checksum of 0 means none (RFC 768); a UDP datagram of more
 * than XLB_MAX_SYN_LEN bytes is taken unchecked, a TCP SYN that long is
 * refused. */
static __always_inline int l4_csum_ok(struct xdp_md *ctx, __u8 proto)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + XLB_IP_OFF;
	__u16 *w = data + XLB_TCP_OFF;
	__u32 len;

	if ((void *)(ip + 1) > end || (void *)(w + 4) > end)
		return 0;
	if (csum_finish(csum_words((void *)ip, 10)) != 0)
		return 0;
	len = bpf_ntohs(ip->tot_len) - 20;
	if (proto == IPPROTO_UDP && (w[3] == 0 || len > XLB_MAX_SYN_LEN))
		return 1;
	if (len > XLB_MAX_SYN_LEN)
		return 0;
	return l4_sum_ok(w, end, len, l4_pseudo(ip->saddr, ip->daddr, proto, len));
}

/* csum_addr6 adds the change of a 128-bit address to an accumulator. */
static __always_inline __u64 csum_addr6(__u64 acc, const __u32 *old, const __u32 *new)
{
	acc = csum_acc32(acc, old[0], new[0]);
	acc = csum_acc32(acc, old[1], new[1]);
	acc = csum_acc32(acc, old[2], new[2]);
	return csum_acc32(acc, old[3], new[3]);
}

/* l4_pseudo6 sums the IPv6 pseudo-header (RFC 8200). */
static __always_inline __u64 l4_pseudo6(const __u32 *saddr, const __u32 *daddr, __u8 proto, __u32 len)
{
	__u64 sum = bpf_htonl(len) + bpf_htonl(proto);
	int i;

	for (i = 0; i < 4; i++)
		sum += (__u64)saddr[i] + daddr[i];
	return sum;
}

/* l4_csum_ok6 is l4_csum_ok for IPv6, where a UDP checksum is mandatory. */
static __always_inline int l4_csum_ok6(struct xdp_md *ctx, __u8 proto)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + XLB_IP_OFF;
	__u16 *w = data + XLB_TCP6_OFF;
	__u32 len;

	if ((void *)(ip6 + 1) > end || (void *)(w + 4) > end)
		return 0;
	len = bpf_ntohs(ip6->payload_len);
	if (proto == IPPROTO_UDP && w[3] == 0)
		return 0;
	if (len > XLB_MAX_SYN_LEN)
		return proto == IPPROTO_UDP;
	return l4_sum_ok(w, end, len, l4_pseudo6((void *)&ip6->saddr, (void *)&ip6->daddr, proto, len));
}

/* tcp_reply6 is tcp_reply for a SYN over IPv6. */
static __always_inline int tcp_reply6(struct xdp_md *ctx, __u8 flags, __u32 seq, __u32 ack)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + XLB_IP_OFF;
	struct tcphdr *tcp = data + XLB_TCP6_OFF;
	__u32 saddr[4], daddr[4];
	__u8 mac[ETH_ALEN];
	__be16 sport, dport;
	int trim;

	if ((void *)(tcp + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(saddr, &ip6->daddr, 16);
	__builtin_memcpy(daddr, &ip6->saddr, 16);
	sport = tcp->dest;
	dport = tcp->source;
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	trim = XLB_TCP6_OFF + 20 - (int)(end - data);
	if (trim < 0 && bpf_xdp_adjust_tail(ctx, trim))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip6 = data + XLB_IP_OFF;
	tcp = data + XLB_TCP6_OFF;
	if ((void *)(tcp + 1) > end)
		return XDP_DROP;

	*(__be32 *)ip6 = bpf_htonl(6 << 28); /* version 6, no traffic class or flow label */
	ip6->payload_len = bpf_htons(20);
	ip6->nexthdr = IPPROTO_TCP;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, saddr, 16);
	__builtin_memcpy(&ip6->daddr, daddr, 16);

	tcp->source = sport;
	tcp->dest = dport;
	tcp->seq = bpf_htonl(seq);
	tcp->ack_seq = bpf_htonl(ack);
	((__u8 *)tcp)[12] = 5 << 4;
	((__u8 *)tcp)[13] = flags;
	tcp->window = 0;
	tcp->check = 0;
	tcp->urg_ptr = 0;
	tcp->check = csum_finish(l4_pseudo6(saddr, daddr, IPPROTO_TCP, 20) + csum_words((void *)tcp, 10));
	return XDP_TX;
}

/* tcp_reply turns a received SYN into a bare TCP segment back to its
 * sender, flags with seq and ack (host order): a RST that refuses the
 * connection, or the SYN-ACK of a SYN challenge. Headers only, checksums
 * computed afresh. Returns XDP_TX, or XDP_DROP if the packet cannot be
 * trimmed. */
static __always_inline int tcp_reply(struct xdp_md *ctx, __u8 flags, __u32 seq, __u32 ack)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + XLB_IP_OFF;
	struct tcphdr *tcp = data + XLB_TCP_OFF;
	__u8 mac[ETH_ALEN];
	__be32 saddr, daddr;
	__be16 sport, dport;
	int trim;

	if ((void *)(tcp + 1) > end)
		return XDP_DROP;
	saddr = ip->daddr;
	daddr = ip->saddr;
	sport = tcp->dest;
	dport = tcp->source;
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	trim = XLB_REPLY_LEN - (int)(end - data);
	if (trim < 0 && bpf_xdp_adjust_tail(ctx, trim))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip = data + XLB_IP_OFF;
	tcp = data + XLB_TCP_OFF;
	if ((void *)(tcp + 1) > end)
		return XDP_DROP;

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(40);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* don't fragment */
	ip->ttl = 64;
	ip->protocol = IPPROTO_TCP;
	ip->check = 0;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_finish(csum_words((void *)ip, 10));

	tcp->source = sport;
	tcp->dest = dport;
	tcp->seq = bpf_htonl(seq);
	tcp->ack_seq = bpf_htonl(ack);
	((__u8 *)tcp)[12] = 5 << 4; /* data offset 5, reserved bits clear */
	((__u8 *)tcp)[13] = flags;
	tcp->window = 0;
	tcp->check = 0;
	tcp->urg_ptr = 0;
	tcp->check = csum_finish(l4_pseudo(saddr, daddr, IPPROTO_TCP, 20) + csum_words((void *)tcp, 10));
	return XDP_TX;
}

#endif
