/* lbd's eBPF load balancer: map layouts and the lookup/selection logic shared by the
 * socket-level (sock.c) and packet-level (tc.c) programs.
 *
 * The service map is two-level, as in Cilium's lb4_services_v2: a frontend
 * (address, port, protocol, scope) has slot 0 holding the frontend entry (backend count,
 * flags, ids) and slots 1..count holding backend ids; backends live in their own map,
 * so a backend shared by many frontends is written once. Every struct below is mirrored
 * field for field by ctypes in bpf_lb/maps.py (a unit test compares the layouts), and is
 * explicitly padded so the two never disagree about holes.
 *
 * Addresses are 16 bytes for both families: IPv4 uses the first 4 (network order), the
 * rest is zero, and a family byte travels beside them.
 *
 * Compile-time parameters (set by the loader with -D): LBD_PIN_DIR (bpffs directory the
 * maps are pinned in, so a restarted daemon re-adopts them), the map sizes, and
 * LBD_MAGLEV_M (the prime Maglev table size, which is also the maglev map's value size).
 */
#ifndef LBD_LB_H
#define LBD_LB_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/errno.h>

#ifndef LBD_PIN_DIR
#error "LBD_PIN_DIR must name the bpffs directory the maps are pinned in"
#endif
#ifndef LBD_MAGLEV_M
#define LBD_MAGLEV_M 16381
#endif
#ifndef LBD_SERVICES_MAX
#define LBD_SERVICES_MAX 262144
#endif
#ifndef LBD_BACKENDS_MAX
#define LBD_BACKENDS_MAX 262144
#endif
#ifndef LBD_REV_NAT_MAX
#define LBD_REV_NAT_MAX 65536
#endif
#ifndef LBD_MAGLEV_MAX
#define LBD_MAGLEV_MAX 4096
#endif
#ifndef LBD_AFFINITY_MAX
#define LBD_AFFINITY_MAX 65536
#endif
#ifndef LBD_CT_MAX
#define LBD_CT_MAX 131072
#endif
#ifndef LBD_SRC_RANGE_MAX
#define LBD_SRC_RANGE_MAX 16384
#endif
#ifndef LBD_SOCK_REV_MAX
#define LBD_SOCK_REV_MAX 65536
#endif

#define LBD_FAMILY_V4 4
#define LBD_FAMILY_V6 6

/* Scopes of a frontend entry: EXT serves every lookup; a frontend whose in-cluster clients
 * must see other endpoints than external ones (externalTrafficPolicy: Local) also has an
 * INT entry, flagged on the EXT one with LBD_SVC_TWO_SCOPES. */
#define LBD_SCOPE_EXT 0
#define LBD_SCOPE_INT 1

/* lb_svc_val.flags (slot 0) */
#define LBD_SVC_EXTERNAL     (1 << 0) /* node port, external IP or load-balancer IP */
#define LBD_SVC_LOCAL        (1 << 1) /* node-local endpoints only: keep the client source */
#define LBD_SVC_AFFINITY     (1 << 2) /* sessionAffinity: ClientIP */
#define LBD_SVC_REJECT       (1 << 3) /* no endpoints at all: refuse (else count 0 = drop) */
#define LBD_SVC_TWO_SCOPES   (1 << 4) /* an LBD_SCOPE_INT entry exists for in-cluster clients */
#define LBD_SVC_SRC_RANGE    (1 << 5) /* loadBalancerSourceRanges apply (lbd_srcrange) */
#define LBD_SVC_NODEPORT     (1 << 6) /* the address is one of this node's */
#define LBD_SVC_LOADBALANCER (1 << 7) /* a status.loadBalancer.ingress IP */
#define LBD_SVC_EXTERNAL_IP  (1 << 8) /* a spec.externalIPs entry */

/* lb_backend_val.flags */
#define LBD_BACKEND_LOCAL (1 << 0) /* the endpoint runs on this node */

/* lb_ct_val.flags */
#define LBD_CT_SNAT      (1 << 0) /* the source was rewritten to the node (masquerade) */
#define LBD_CT_CLOSING   (1 << 1) /* a FIN or RST was seen: expire soon */
#define LBD_CT_SEEN_REPLY (1 << 2)
/* The frontend is a node address and the flow is not SNATed: replies translated back
 * before routing (on a pod's veth) need a FIB lookup + redirect, as the stack does not
 * forward packets from its own addresses. */
#define LBD_CT_FIB       (1 << 3)
/* A flow another mode's NAT carries (its SYN predates this datapath: see
 * lb_config.takeover_until_ns): its packets go to the stack untranslated, where the
 * kernel's conntrack still holds the binding iptables made, for as long as it lasts. A
 * forward entry only; replies never meet lbd's translation. */
#define LBD_CT_PASS      (1 << 4)

/* lb_ct_key.dir */
#define LBD_CT_FORWARD 0 /* client -> frontend, as it arrives */
#define LBD_CT_REPLY   1 /* backend -> client (or -> the SNAT address), as it arrives */

/* lb_config.flags */
#define LBD_CFG_MAGLEV      (1 << 0) /* select backends by Maglev hashing, not at random */
#define LBD_CFG_HOSTNS_ONLY (1 << 1) /* socket LB only for the host's network namespace */
/* Another mode is taking the node over (set by its daemon): replies translated on
 * ingress go straight to their next hop (see lbd_reply). */
#define LBD_CFG_HANDOVER    (1 << 2)

struct lb_svc_key {
	__be32 addr[4];
	__be16 dport;
	__u16 slot;   /* 0: the frontend entry; 1..count: backend slots */
	__u8 proto;   /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8 family;  /* LBD_FAMILY_V4 / _V6 */
	__u8 scope;   /* LBD_SCOPE_EXT / _INT */
	__u8 pad;
};

struct lb_svc_val {
	__u32 backend_id;       /* slots 1..count */
	__u32 svc_id;           /* slot 0: key of lbd_maglev, lbd_affinity and lbd_aff_match */
	__u32 rev_nat_id;       /* slot 0: key of lbd_revnat (the frontend's own address) */
	__u32 affinity_timeout; /* slot 0: seconds */
	__u16 count;            /* slot 0: number of backend slots */
	__u16 flags;            /* slot 0: LBD_SVC_* */
};

struct lb_backend_val {
	__be32 addr[4];
	__be16 port;
	__u8 family;
	__u8 flags; /* LBD_BACKEND_* */
};

struct lb_rev_nat_val {
	__be32 addr[4];
	__be16 port;
	__u8 family;
	__u8 pad;
};

struct lb_maglev_val {
	__u32 backend_ids[LBD_MAGLEV_M];
};

struct lb_affinity_key {
	__be32 client[4]; /* client address (tc), or the client's netns cookie (socket LB) */
	__u32 svc_id;
	__u8 family;      /* LBD_FAMILY_*, or 0 when `client` holds a netns cookie */
	__u8 pad[3];
};

struct lb_affinity_val {
	__u64 last_used_ns; /* bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC */
	__u32 backend_id;
	__u32 pad;
};

struct lb_aff_match_key {
	__u32 backend_id;
	__u32 svc_id;
};

struct lb_ct_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 dir; /* LBD_CT_FORWARD / LBD_CT_REPLY */
	__u8 pad;
};

struct lb_ct_val {
	__be32 addr[4];   /* forward: backend address; reply: frontend address (fallback) */
	__be32 addr2[4];  /* forward: SNAT source address; reply: original client address */
	__be16 port;      /* forward: backend port; reply: frontend port */
	__be16 port2;     /* forward: SNAT source port; reply: original client port */
	__u32 rev_nat_id;
	__u32 backend_id;
	__u16 flags;      /* LBD_CT_* */
	__u16 pad;
	__u64 last_seen_ns;
};

/* LPM key: rev_nat_id (32 bits, always matched in full) then the source address. */
struct lb_src_range_key {
	__u32 prefixlen;
	__u32 rev_nat_id;
	__be32 addr[4];
};

struct lb_sock_rev_key {
	__u64 cookie;     /* bpf_get_socket_cookie() of the client socket */
	__be32 addr[4];   /* the backend the socket was sent to */
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct lb_sock_rev_val {
	__be32 addr[4];   /* the frontend the application asked for */
	__be16 port;
	__u8 family;
	__u8 pad;
	__u32 rev_nat_id;
};

/* Not used by the datapath: who a svc_id belongs to ("ns/name:port/proto/vN#view"), for
 * `lbd status` and for re-adopting ids after a restart. */
#define LBD_SVC_NAME_LEN 256
struct lb_svc_name {
	char name[LBD_SVC_NAME_LEN];
};

struct lb_config {
	__be32 node_addr4[4]; /* SNAT source for IPv4 (first 4 bytes) */
	__be32 node_addr6[4]; /* SNAT source for IPv6 */
	__u64 host_netns_cookie;
	__u32 flags;          /* LBD_CFG_* */
	__u16 snat_port_min;
	__u16 snat_port_max;
	/* Until then (bpf_ktime_get_ns()), this datapath is taking a node over from another
	 * mode: a mid-flow TCP segment to a frontend, with no conntrack entry, belongs to a
	 * connection the previous mode NATed, and is passed on (LBD_CT_PASS) rather than
	 * balanced again (which resets it unless the same backend comes out). Afterwards such
	 * a segment means lbd_ct lost the flow, and re-balancing is the better guess (Maglev
	 * gives the same backend again, as in Cilium). */
	__u64 takeover_until_ns;
};

/* The control plane's maps are sized for large clusters (max_entries is a flag) and
 * allocate per entry, so an idle limit costs no memory; only user space writes them. */
BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc_val, lbd_services, LBD_SERVICES_MAX,
		 LBD_PIN_DIR "/lbd_services", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_backend_val, lbd_backends, LBD_BACKENDS_MAX,
		 LBD_PIN_DIR "/lbd_backends", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_rev_nat_val, lbd_revnat, LBD_REV_NAT_MAX,
		 LBD_PIN_DIR "/lbd_revnat", BPF_F_NO_PREALLOC);
/* 64 KiB values at the default M: allocate per entry, not the whole map up front. */
BPF_TABLE_PINNED("hash", __u32, struct lb_maglev_val, lbd_maglev, LBD_MAGLEV_MAX,
		 LBD_PIN_DIR "/lbd_maglev", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_val, lbd_affinity,
		 LBD_AFFINITY_MAX, LBD_PIN_DIR "/lbd_affinity");
BPF_TABLE_PINNED("hash", struct lb_aff_match_key, __u8, lbd_aff_match, LBD_BACKENDS_MAX,
		 LBD_PIN_DIR "/lbd_aff_match", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb_ct_key, struct lb_ct_val, lbd_ct, LBD_CT_MAX,
		 LBD_PIN_DIR "/lbd_ct");
BPF_TABLE_PINNED("lpm_trie", struct lb_src_range_key, __u8, lbd_srcrange, LBD_SRC_RANGE_MAX,
		 LBD_PIN_DIR "/lbd_srcrange", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct lb_sock_rev_key, struct lb_sock_rev_val, lbd_sockrev,
		 LBD_SOCK_REV_MAX, LBD_PIN_DIR "/lbd_sockrev");
BPF_TABLE_PINNED("array", __u32, struct lb_config, lbd_config, 1, LBD_PIN_DIR "/lbd_config");
BPF_TABLE_PINNED("hash", __u32, struct lb_svc_name, lbd_svcnames, LBD_SERVICES_MAX,
		 LBD_PIN_DIR "/lbd_svcnames", BPF_F_NO_PREALLOC);

#define LBD_NSEC_PER_SEC 1000000000ULL

static __always_inline struct lb_config *lbd_get_config(void)
{
	__u32 zero = 0;
	return lbd_config.lookup(&zero);
}

static __always_inline __u32 lbd_mix32(__u32 h)
{
	/* murmur3's finaliser: spreads every input bit over the output */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 lbd_hash_addr(const __be32 *a, __u32 h)
{
	h = lbd_mix32(h ^ a[0]);
	h = lbd_mix32(h ^ a[1]);
	h = lbd_mix32(h ^ a[2]);
	return lbd_mix32(h ^ a[3]);
}

/* Slot 0 of a frontend. `key` is filled in by the caller (slot is forced to 0 here).
 * In-cluster callers (`internal`) get the INT-scope entry when the frontend has one. */
static __always_inline struct lb_svc_val *lbd_lookup_frontend(struct lb_svc_key *key, int internal)
{
	struct lb_svc_val *fe;

	key->slot = 0;
	key->scope = LBD_SCOPE_EXT;
	fe = lbd_services.lookup(key);
	if (fe && internal && (fe->flags & LBD_SVC_TWO_SCOPES)) {
		struct lb_svc_val *in;

		key->scope = LBD_SCOPE_INT;
		in = lbd_services.lookup(key);
		if (in)
			return in;
		key->scope = LBD_SCOPE_EXT;
	}
	return fe;
}

static __always_inline struct lb_backend_val *lbd_lookup_backend(__u32 id)
{
	return lbd_backends.lookup(&id);
}

/* A backend remembered by session affinity, if still valid for this service. */
static __always_inline struct lb_backend_val *
lbd_affinity_backend(struct lb_affinity_key *akey, struct lb_svc_val *fe, __u64 now, __u32 *id)
{
	struct lb_affinity_val *av = lbd_affinity.lookup(akey);
	struct lb_aff_match_key mkey = {};

	if (!av)
		return 0;
	if (now - av->last_used_ns > (__u64)fe->affinity_timeout * LBD_NSEC_PER_SEC)
		return 0;
	/* The endpoint may have left this service (and its id may serve others): only a
	 * backend the control plane lists for this svc_id counts. */
	mkey.backend_id = av->backend_id;
	mkey.svc_id = fe->svc_id;
	if (!lbd_aff_match.lookup(&mkey))
		return 0;
	*id = av->backend_id;
	return lbd_lookup_backend(*id);
}

/* Pick a backend for a new flow of the frontend `fe` (key: its slot-0 key).
 * `hash` feeds Maglev; random selection ignores it unless `sticky` (then the same hash
 * always picks the same slot while the backends do not change). */
static __always_inline struct lb_backend_val *
lbd_select_backend(struct lb_svc_key *key, struct lb_svc_val *fe, __u32 hash, int sticky,
		   __u32 *id)
{
	struct lb_config *cfg = lbd_get_config();
	struct lb_svc_val *slot;
	__u32 count = fe->count;

	if (count == 0)
		return 0;
	if (cfg && (cfg->flags & LBD_CFG_MAGLEV)) {
		__u32 svc_id = fe->svc_id;
		struct lb_maglev_val *table = lbd_maglev.lookup(&svc_id);

		if (table) {
			__u32 idx = hash % LBD_MAGLEV_M;

			/* the compiler knows idx < M; the verifier must be told again */
			asm volatile("" : "+r"(idx));
			if (idx < LBD_MAGLEV_M) {
				*id = table->backend_ids[idx];
				return lbd_lookup_backend(*id);
			}
		}
		/* no table (yet): fall through to a random slot rather than fail the flow */
	}
	key->slot = ((sticky ? hash : bpf_get_prandom_u32()) % count) + 1;
	slot = lbd_services.lookup(key);
	key->slot = 0;
	if (!slot)
		return 0;
	*id = slot->backend_id;
	return lbd_lookup_backend(*id);
}

static __always_inline void lbd_remember_affinity(struct lb_affinity_key *akey, __u32 id, __u64 now)
{
	struct lb_affinity_val av = {};

	av.last_used_ns = now;
	av.backend_id = id;
	lbd_affinity.update(akey, &av);
}

#endif /* LBD_LB_H */
