/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the xlb pipeline. Sizes given here are defaults; the
 * control plane resizes the conntrack tables from configuration. */
#ifndef XLB_MAPS_H
#define XLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xlb_consts.h"
#include "xlb_structs.h"

/* Stage programs, indexed by enum xlb_stage. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, XLB_STAGE_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xlb_progs SEC(".maps");

/* Per-packet state passed between stages (one struct xlb_pkt per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xlb_pkt);
} xlb_scratch SEC(".maps");

/* Counters by enum xlb_stat, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} xlb_stats SEC(".maps");

/* Runtime settings (port range, secrets, timeouts). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xlb_cfg);
} xlb_settings SEC(".maps");

/* TCP or UDP port -> the VIP using it: a first filter so that traffic to other
 * ports never pays for a hash lookup, and, when one VIP uses the port
 * (the common case), its service without one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * 65536); /* TCP ports, then UDP ports (vip_port_key) */
	__type(key, __u32);
	__type(value, struct xlb_vip_port);
} xlb_vip_ports SEC(".maps");

/* VIP:port/proto -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_SERVICES);
	__type(key, struct xlb_vip);
	__type(value, struct xlb_service);
} xlb_services SEC(".maps");

/* Backend id -> address, port, weight. Ids are allocated by the daemon. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xlb_backend);
} xlb_backends SEC(".maps");

/* Backend id -> active, half-open and total connections and the cached
 * next hop, shared by all CPUs. Mappable so the daemon can uncount
 * expired connections atomically. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xlb_backend_stats);
} xlb_bk_stats SEC(".maps");

/* Backend id -> its packets and bytes each way, per CPU (the daemon sums
 * them when it is asked). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xlb_traffic);
} xlb_bk_ctr SEC(".maps");

/* Selection table template. Entry 0 is the header: mode in the low 8 bits,
 * entry count n above them; entries 1..n are backend ids. Every table
 * has the same size (256 KiB), so the verifier inlines its lookups
 * (BPF_F_INNER_MAP, for tables of their own sizes, makes each a kernel
 * call: 15 ns here). */
struct xlb_sel_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_SEL_TABLE + 1);
	__type(key, __u32);
	__type(value, __u32);
};

/* Service id -> its current selection table. The daemon fills a fresh
 * table and swaps it in with one update, so no packet sees half a table. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, XLB_MAX_SERVICES);
	__type(key, __u32);
	__array(values, struct xlb_sel_inner);
} xlb_sel SEC(".maps");

/* Service id -> round-robin position, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
} xlb_rr SEC(".maps");

/* Per-CPU pseudo-random state for random selection (xorshift32): an
 * inlined map access instead of a helper call, which costs about 20 ns on
 * CPUs with return-stack mitigations. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} xlb_rng SEC(".maps");

/* The data path's clock as the daemon reads it: xlb_clock writes
 * bpf_jiffies64() here when run with BPF_PROG_TEST_RUN. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} xlb_now SEC(".maps");

/* Connection table: an LRU hash table the data path runs itself on an
 * array, so a lookup or an insert costs no kernel call. A flow's slot is
 * one of XLB_CT_WAYS from flow_hash() & ct_mask; when all are taken the
 * least recently seen connection is evicted, so the table never fills up
 * for good. The daemon sizes it (a power of two), expires idle
 * connections by TCP state, and reads it through a memory mapping. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xlb_conn);
} xlb_conns SEC(".maps");

/* Return table and source-port allocator in one: entry
 * (src * XLB_PORT_WAYS + way(backend)) * nports + (port - port_lo) is the
 * return side of the connection holding that port of source address src
 * towards that backend. Replies find it with an array lookup; a new
 * connection claims it with a compare-and-swap. Sized by the daemon to
 * the source addresses and port range; mappable so the daemon's sweeper
 * can scan and free it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 22768 * XLB_PORT_WAYS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xlb_rconn);
} xlb_ports SEC(".maps");

/* Occupancy bitmaps of xlb_conns and xlb_ports, a bit per slot or way:
 * the data path sets a bit when it fills the slot or takes the way, the
 * daemon's sweeper visits only slots and ways whose bit is set and clears
 * the bits of those it finds free, so a sweep costs what is in use, not
 * the tables' size. Sized by the daemon; mappable for the sweeper. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 262144 * 2 / 64);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} xlb_ct_busy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 22768 * XLB_PORT_WAYS / 64 + 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} xlb_port_busy SEC(".maps");

/* Source address index -> address. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_SOURCES);
	__type(key, __u32);
	__type(value, __be32);
} xlb_src SEC(".maps");

/* The source addresses by a hash the daemon makes collision-free
 * ((addr * src_mult) >> 26): parse finds whether a packet is a reply,
 * and to which address, with one array lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_SRC_SLOTS);
	__type(key, __u32);
	__type(value, struct xlb_src_slot);
} xlb_src_slots SEC(".maps");

/* Service id -> the source addresses its connections use, a bit per
 * index of xlb_src. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, __u32);
} xlb_svc_src SEC(".maps");

/* (source address, port way) -> the allocation cursor: every backend of
 * the way, whatever service it serves, walks the range from it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, (XLB_MAX_SOURCES * XLB_PORT_WAYS));
	__type(key, __u32);
	__type(value, __u32);
} xlb_port_cur SEC(".maps");

/* Sources validated by answering a SYN challenge, by a hash of the
 * address (a collision only costs a new challenge). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_SYN_OK_SLOTS);
	__type(key, __u32);
	__type(value, struct xlb_trusted);
} xlb_syn_ok SEC(".maps");

/* The IPv6 tables: see docs/stage-abi.md, "Families". Sized by the
 * daemon; tiny unless an IPv6 service is configured. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xlb_conn6);
} xlb_conns6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct xlb_rconn6);
} xlb_ports6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} xlb_ct6_busy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} xlb_port6_busy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_SERVICES);
	__type(key, struct xlb_vip6);
	__type(value, struct xlb_service);
} xlb_services6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * 65536);
	__type(key, __u32);
	__type(value, struct xlb_vip_port6);
} xlb_vip_ports6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct xlb_backend6);
} xlb_backends6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_SOURCES);
	__type(key, __u32);
	__type(value, struct xlb_src6_slot);
} xlb_src6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_SRC_SLOTS);
	__type(key, __u32);
	__type(value, struct xlb_src6_slot);
} xlb_src6_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAX_SOURCES *XLB_PORT_WAYS);
	__type(key, __u32);
	__type(value, __u32);
} xlb_port6_cur SEC(".maps");

#endif
