// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
/* Skiff's network policy datapath: two tc classifiers on the host side of
 * every instance's veth. `skiff_from_pod` (tc ingress of the host veth)
 * sees what the instance sends: its egress policy. `skiff_to_pod` (tc
 * egress of the host veth) sees what it receives: its ingress policy.
 *
 * A veth with no endpoint entry drops everything IPv4 (fail closed). An
 * endpoint isolated in neither direction passes after one lookup. Flows
 * already decided pass through conntrack while the policy epoch is the
 * one they were decided under; the agent bumps the epoch on every change,
 * so a removed rule also cuts established flows. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "skiff_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, SKIFF_MAX_IPCACHE);
	__type(key, struct skiff_ipcache_key);
	__type(value, struct skiff_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SKIFF_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct skiff_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SKIFF_MAX_POLICY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct skiff_policy_key);
	__type(value, struct skiff_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SKIFF_MAX_CONNTRACK);
	__type(key, struct skiff_ct_key);
	__type(value, struct skiff_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_epoch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SKIFF_STATS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SKIFF_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} skiff_events SEC(".maps");

struct flow {
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto;
	__u8 is_new; /* a TCP SYN without ACK, or any non-TCP packet */
};

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&skiff_stats, &stat);
	if (n)
		*n += 1;
}

static __always_inline __u32 identity_of(__u32 addr)
{
	struct skiff_ipcache_key k = {.prefixlen = 32, .addr = addr};
	struct skiff_ipcache_value *v = bpf_map_lookup_elem(&skiff_ipcache, &k);
	return v ? v->identity : SKIFF_ID_WORLD;
}

/* Parses Ethernet + IPv4 (+ TCP/UDP ports). Returns 0 for non-IPv4. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	f->sport = 0;
	f->dport = 0;
	f->is_new = 1;
	/* Later fragments carry no ports: they follow their flow's verdict. */
	if (ip->frag_off & bpf_htons(0x1fff)) {
		f->is_new = 0;
		return 1;
	}
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > end)
			return -1;
		f->sport = bpf_ntohs(t->source);
		f->dport = bpf_ntohs(t->dest);
		f->is_new = t->syn && !t->ack;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > end)
			return -1;
		f->sport = bpf_ntohs(u->source);
		f->dport = bpf_ntohs(u->dest);
	}
	return 1;
}

static __always_inline struct skiff_policy_value *lookup_policy(__u32 ifindex, __u32 peer, __u16 port, __u8 proto,
								 __u8 dir)
{
	struct skiff_policy_key k = {.ifindex = ifindex, .direction = dir};
	struct skiff_policy_value *v;
	__u32 peers[2] = {peer, SKIFF_ID_ANY};
	/* Most specific first: this peer, then any peer; for each, this port
	 * and protocol, then any port, then any protocol. */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		k.peer = peers[i];
		k.dport = port;
		k.proto = proto;
		v = bpf_map_lookup_elem(&skiff_policy, &k);
		if (v)
			return v;
		k.dport = 0;
		v = bpf_map_lookup_elem(&skiff_policy, &k);
		if (v)
			return v;
		k.proto = 0;
		v = bpf_map_lookup_elem(&skiff_policy, &k);
		if (v)
			return v;
	}
	return 0;
}

static __always_inline void report(struct flow *f, __u32 ifindex, __u8 dir, __u32 src_id, __u32 dst_id, __u32 rule,
				   __u8 kind)
{
	struct skiff_event *e = bpf_ringbuf_reserve(&skiff_events, sizeof(*e), 0);
	if (!e) {
		count(SKIFF_STAT_EVENTS_LOST);
		return;
	}
	e->time_ns = bpf_ktime_get_ns();
	e->saddr = f->saddr;
	e->daddr = f->daddr;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->ifindex = ifindex;
	e->rule = rule;
	e->sport = f->sport;
	e->dport = f->dport;
	e->proto = f->proto;
	e->direction = dir;
	e->kind = kind;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline __u32 bits(__u8 dir)
{
	return dir == SKIFF_DIR_INGRESS ? (SKIFF_EP_INGRESS_ENFORCE | SKIFF_EP_INGRESS_AUDIT)
					: (SKIFF_EP_EGRESS_ENFORCE | SKIFF_EP_EGRESS_AUDIT);
}

static __always_inline __u8 other(__u8 dir)
{
	return dir == SKIFF_DIR_INGRESS ? SKIFF_DIR_EGRESS : SKIFF_DIR_INGRESS;
}

static __always_inline int decide(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct flow f = {};
	int parsed = parse(skb, &f);
	if (parsed == 0)
		return TC_ACT_OK; /* ARP and the like */
	struct skiff_endpoint *ep = bpf_map_lookup_elem(&skiff_endpoints, &ifindex);
	if (!ep || parsed < 0) {
		count(SKIFF_STAT_DENIED);
		return TC_ACT_SHOT;
	}
	/* Isolated in neither direction: nothing to decide or remember. */
	if (!(ep->flags & (bits(dir) | bits(other(dir))))) {
		count(SKIFF_STAT_ALLOWED);
		return TC_ACT_OK;
	}
	__u32 zero = 0;
	__u32 *epoch_p = bpf_map_lookup_elem(&skiff_epoch, &zero);
	__u32 epoch = epoch_p ? *epoch_p : 0;
	struct skiff_ct_key ct = {
		.ifindex = ifindex,
		.saddr = f.saddr,
		.daddr = f.daddr,
		.sport = f.sport,
		.dport = f.dport,
		.proto = f.proto,
		.direction = dir,
	};
	int reply = 0;
	struct skiff_ct_value *known = bpf_map_lookup_elem(&skiff_conntrack, &ct);
	if (!known) {
		/* A reply to a flow decided the other way round. */
		struct skiff_ct_key rev = ct;
		rev.saddr = f.daddr;
		rev.daddr = f.saddr;
		rev.sport = f.dport;
		rev.dport = f.sport;
		rev.direction = other(dir);
		known = bpf_map_lookup_elem(&skiff_conntrack, &rev);
		reply = known != 0;
	}
	if (known && known->epoch == epoch) {
		count(SKIFF_STAT_ESTABLISHED);
		return TC_ACT_OK;
	}
	/* The peer (looked up only for flows being decided): the source of
	 * what the endpoint receives, the destination of what it sends. */
	__u32 peer = identity_of(dir == SKIFF_DIR_INGRESS ? f.saddr : f.daddr);
	if (peer == SKIFF_ID_HOST) {
		count(SKIFF_STAT_ALLOWED);
		return TC_ACT_OK;
	}
	/* Decide the flow as it was first seen: a reply is judged as the
	 * original flow, by the original direction's policy and port. */
	__u8 d = reply ? other(dir) : dir;
	__u16 port = reply ? f.sport : f.dport;
	__u32 src_id = d == SKIFF_DIR_INGRESS ? peer : ep->identity;
	__u32 dst_id = d == SKIFF_DIR_INGRESS ? ep->identity : peer;
	__u32 enforce = d == SKIFF_DIR_INGRESS ? SKIFF_EP_INGRESS_ENFORCE : SKIFF_EP_EGRESS_ENFORCE;
	__u32 verdict = SKIFF_VERDICT_ALLOW;
	__u32 rule = 0;
	if (ep->flags & bits(d)) {
		struct skiff_policy_value *v = lookup_policy(ifindex, peer, port, f.proto, d);
		if (v) {
			verdict = v->verdict;
			rule = v->rule;
		} else if (ep->flags & enforce) {
			/* New: refused. Decided under an older epoch and no longer
			 * allowed: cut. */
			count(SKIFF_STAT_DENIED);
			if (f.is_new && !reply)
				report(&f, ifindex, d, src_id, dst_id, 0, SKIFF_EVENT_DENIED);
			if (known)
				known->epoch = ~epoch; /* stays stale; LRU evicts it */
			return TC_ACT_SHOT;
		} else {
			verdict = SKIFF_VERDICT_AUDIT;
		}
	}
	if (verdict == SKIFF_VERDICT_AUDIT) {
		count(SKIFF_STAT_AUDIT);
		if (f.is_new && !reply)
			report(&f, ifindex, d, src_id, dst_id, rule, SKIFF_EVENT_AUDIT);
	} else {
		count(SKIFF_STAT_ALLOWED);
	}
	if (known) {
		known->epoch = epoch;
		known->verdict = verdict;
	} else {
		struct skiff_ct_value nv = {.epoch = epoch, .verdict = verdict};
		bpf_map_update_elem(&skiff_conntrack, &ct, &nv, BPF_ANY);
	}
	return TC_ACT_OK;
}

SEC("classifier")
int skiff_to_pod(struct __sk_buff *skb)
{
	return decide(skb, SKIFF_DIR_INGRESS);
}

SEC("classifier")
int skiff_from_pod(struct __sk_buff *skb)
{
	return decide(skb, SKIFF_DIR_EGRESS);
}
