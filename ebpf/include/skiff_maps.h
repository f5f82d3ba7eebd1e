/* The one definition of the maps Skiff's datapath shares between the
 * kernel (policy.bpf.c) and user space (skiff-netpol's datapath.rs, whose
 * #[repr(C)] mirrors are checked against the SKIFF_SIZEOF_* values below,
 * which _Static_assert ties to these structs). */
#ifndef SKIFF_MAPS_H
#define SKIFF_MAPS_H

#ifndef __u32
#include <linux/types.h>
#endif

/* Identities: 0 matches any peer in policy keys. */
#define SKIFF_ID_ANY 0
/* The node itself (its address and every veth's gateway): always allowed. */
#define SKIFF_ID_HOST 1
/* Addresses no ipcache prefix names more precisely than 0.0.0.0/0. */
#define SKIFF_ID_WORLD 2
/* Instance identities start here (allocated per node by the agent). */
#define SKIFF_ID_FIRST_LOCAL 256

/* Policy directions, from the endpoint's point of view. */
#define SKIFF_DIR_INGRESS 1
#define SKIFF_DIR_EGRESS 2

/* Policy verdicts. */
#define SKIFF_VERDICT_ALLOW 1
/* Allowed, but an audit-mode policy would deny it: pass and report. */
#define SKIFF_VERDICT_AUDIT 2

/* Endpoint flags: which directions the endpoint is isolated in. */
#define SKIFF_EP_INGRESS_ENFORCE (1u << 0)
#define SKIFF_EP_EGRESS_ENFORCE (1u << 1)
/* Audit-only isolation: unmatched flows pass and are reported. */
#define SKIFF_EP_INGRESS_AUDIT (1u << 2)
#define SKIFF_EP_EGRESS_AUDIT (1u << 3)

/* Event kinds in the ring buffer. */
#define SKIFF_EVENT_DENIED 1
#define SKIFF_EVENT_AUDIT 2

/* Map capacities (user space checks a policy set fits before writing). */
#define SKIFF_MAX_IPCACHE 65536
#define SKIFF_MAX_ENDPOINTS 4096
#define SKIFF_MAX_POLICY 262144
#define SKIFF_MAX_CONNTRACK 262144
#define SKIFF_EVENTS_BYTES (1 << 20)

/* Stats counters (per-CPU array indices). */
#define SKIFF_STAT_ALLOWED 0
#define SKIFF_STAT_DENIED 1
#define SKIFF_STAT_AUDIT 2
#define SKIFF_STAT_ESTABLISHED 3
#define SKIFF_STAT_EVENTS_LOST 4
#define SKIFF_STATS 5

/* ipcache: longest-prefix match of an IPv4 address to an identity. */
struct skiff_ipcache_key {
	__u32 prefixlen; /* bits, counting from the start of addr */
	__u32 addr;      /* network byte order */
};
struct skiff_ipcache_value {
	__u32 identity;
};

/* endpoints: the host-side veth ifindex of a local instance. */
struct skiff_endpoint {
	__u32 identity;
	__u32 flags;
};

/* policy: what one endpoint allows; 0 in peer, dport or proto is a wildcard. */
struct skiff_policy_key {
	__u32 ifindex;
	__u32 peer;
	__u16 dport; /* host byte order */
	__u8 proto;
	__u8 direction;
};
struct skiff_policy_value {
	__u32 verdict;
	__u32 rule; /* index into the agent's rule table, for events and counters */
};

/* conntrack: flows already decided for an endpoint and direction, as first
 * seen; replies are looked up reversed. Valid while epoch matches. */
struct skiff_ct_key {
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 direction;
	__u16 pad;
};
struct skiff_ct_value {
	__u32 epoch;
	__u32 verdict;
};

/* A denial or audit report. */
struct skiff_event {
	__u64 time_ns;
	__u32 saddr;
	__u32 daddr;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 rule;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 direction;
	__u8 kind;
	__u8 pad;
};

#define SKIFF_SIZEOF_IPCACHE_KEY 8
#define SKIFF_SIZEOF_ENDPOINT 8
#define SKIFF_SIZEOF_POLICY_KEY 12
#define SKIFF_SIZEOF_POLICY_VALUE 8
#define SKIFF_SIZEOF_CT_KEY 20
#define SKIFF_SIZEOF_CT_VALUE 8
#define SKIFF_SIZEOF_EVENT 40

_Static_assert(sizeof(struct skiff_ipcache_key) == SKIFF_SIZEOF_IPCACHE_KEY, "ipcache key");
_Static_assert(sizeof(struct skiff_endpoint) == SKIFF_SIZEOF_ENDPOINT, "endpoint");
_Static_assert(sizeof(struct skiff_policy_key) == SKIFF_SIZEOF_POLICY_KEY, "policy key");
_Static_assert(sizeof(struct skiff_policy_value) == SKIFF_SIZEOF_POLICY_VALUE, "policy value");
_Static_assert(sizeof(struct skiff_ct_key) == SKIFF_SIZEOF_CT_KEY, "ct key");
_Static_assert(sizeof(struct skiff_ct_value) == SKIFF_SIZEOF_CT_VALUE, "ct value");
_Static_assert(sizeof(struct skiff_event) == SKIFF_SIZEOF_EVENT, "event");

#endif
