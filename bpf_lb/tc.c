/* Packet-level load balancing: tc (clsact) programs on a node's interfaces.
 *
 *   lbd_tc_from_netdev  ingress of the node's uplink (eth0): external clients reaching
 *                       node ports, external IPs and load-balancer IPs; replies of SNATed
 *                       flows coming back from remote backends.
 *   lbd_tc_from_pod     ingress of pod-facing veths (hostns-only socket LB): pods reaching
 *                       any frontend, as in-cluster clients; replies of local backends.
 *   lbd_tc_egress       egress of the uplink: replies of local backends to external
 *                       clients (source rewritten back to the frontend).
 *
 * A new flow to a frontend gets a backend (session affinity, Maglev or random), a pair of
 * conntrack entries (lbd_ct: the forward tuple as it arrives, and the reply tuple as the
 * backend will send it) and is DNATed; flows that may be answered by another node
 * (externalTrafficPolicy: Cluster towards a remote backend, and hairpin) are also SNATed to
 * the node's address and then forwarded with a FIB lookup + redirect, because the stack
 * would drop a forwarded packet whose source is one of its own addresses. Later packets
 * follow their conntrack entry, so a flow keeps its backend while the service changes.
 *
 * Frontends without any endpoint are refused (TCP RST or ICMP port unreachable built in
 * place and sent back); frontends with only non-local endpoints under a Local policy, and
 * sources outside loadBalancerSourceRanges, are dropped.
 *
 * Not handled (passed through untouched): IPv4 options and fragments, IPv6 extension
 * headers, SCTP, and ICMP errors about NATed flows.
 *
 * Known limit: a DNATed flow keeps the client's port and only load-balanced flows are
 * tracked, so nothing moves the port off a tuple the backend still holds in TIME_WAIT
 * from a *direct* connection of the same client, or the other way round (SNATed: from
 * another client's flow through the same port, once its pair was collected 10 s after
 * the close, while TIME_WAIT lasts 60 s). TCP timestamps are offset per tuple as the
 * client sees it (frontend or backend address; another host), so about half such SYNs
 * fail the backend's PAWS check: ACK, client RST, SYN retransmitted ~10 ms later.
 * conntrack's NAT avoids it by remapping the port of a clashing tuple, socket LB by
 * translating before the tuple exists. It takes a client mixing both addresses of one
 * backend fast enough to cycle its ports within 60 s (the data-plane benchmark did,
 * until it gave the two kinds of path separate client port ranges).
 */
#include "lb.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define LBD_HTONS(x) ((__be16)__builtin_bswap16(x))
#define LBD_HTONL(x) ((__be32)__builtin_bswap32(x))
#else
#define LBD_HTONS(x) ((__be16)(x))
#define LBD_HTONL(x) ((__be32)(x))
#endif
#define LBD_NTOHS(x) LBD_HTONS(x)
#define LBD_NTOHL(x) LBD_HTONL(x)

#define LBD_ETH_HLEN 14
#define LBD_L4_V4 (LBD_ETH_HLEN + 20)
#define LBD_L4_V6 (LBD_ETH_HLEN + 40)

#define LBD_TCP_FIN 0x01
#define LBD_TCP_SYN 0x02
#define LBD_TCP_RST 0x04
#define LBD_TCP_ACK 0x10

#define LBD_SNAT_TRIES 6

/* BCC 0.26 declares bpf_redirect_neigh without its `plen` argument. */
static long (*lbd_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

struct lbd_pkt {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 family;
	__u8 proto;
	__u8 tcp_flags;
	__u8 pad;
	__u16 tot_len; /* IPv4 total length / IPv6 payload length */
	__u16 pad2;
};

static __always_inline int lbd_parse(struct __sk_buff *skb, struct lbd_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if (data + LBD_ETH_HLEN > end)
		return -1;
	if (eth->h_proto == LBD_HTONS(ETH_P_IP)) {
		struct iphdr *ip = data + LBD_ETH_HLEN;

		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ihl != 5 || (ip->frag_off & LBD_HTONS(0x3fff)))
			return -1;
		p->family = LBD_FAMILY_V4;
		p->proto = ip->protocol;
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->tot_len = LBD_NTOHS(ip->tot_len);
		if (p->proto == IPPROTO_TCP) {
			struct tcphdr *th = data + LBD_L4_V4;

			if ((void *)(th + 1) > end)
				return -1;
			p->sport = th->source;
			p->dport = th->dest;
			p->tcp_flags = ((__u8 *)th)[13];
			return 0;
		}
		if (p->proto == IPPROTO_UDP) {
			struct udphdr *uh = data + LBD_L4_V4;

			if ((void *)(uh + 1) > end)
				return -1;
			p->sport = uh->source;
			p->dport = uh->dest;
			return 0;
		}
		return -1;
	}
	if (eth->h_proto == LBD_HTONS(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + LBD_ETH_HLEN;

		if ((void *)(ip6 + 1) > end)
			return -1;
		p->family = LBD_FAMILY_V6;
		p->proto = ip6->nexthdr;
		p->saddr[0] = ip6->saddr.in6_u.u6_addr32[0];
		p->saddr[1] = ip6->saddr.in6_u.u6_addr32[1];
		p->saddr[2] = ip6->saddr.in6_u.u6_addr32[2];
		p->saddr[3] = ip6->saddr.in6_u.u6_addr32[3];
		p->daddr[0] = ip6->daddr.in6_u.u6_addr32[0];
		p->daddr[1] = ip6->daddr.in6_u.u6_addr32[1];
		p->daddr[2] = ip6->daddr.in6_u.u6_addr32[2];
		p->daddr[3] = ip6->daddr.in6_u.u6_addr32[3];
		p->tot_len = LBD_NTOHS(ip6->payload_len);
		if (p->proto == IPPROTO_TCP) {
			struct tcphdr *th = data + LBD_L4_V6;

			if ((void *)(th + 1) > end)
				return -1;
			p->sport = th->source;
			p->dport = th->dest;
			p->tcp_flags = ((__u8 *)th)[13];
			return 0;
		}
		if (p->proto == IPPROTO_UDP) {
			struct udphdr *uh = data + LBD_L4_V6;

			if ((void *)(uh + 1) > end)
				return -1;
			p->sport = uh->source;
			p->dport = uh->dest;
			return 0;
		}
	}
	return -1;
}

static __always_inline void lbd_copy_addr(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int lbd_addr_eq(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline __u32 lbd_l4_off(struct lbd_pkt *p)
{
	return p->family == LBD_FAMILY_V4 ? LBD_L4_V4 : LBD_L4_V6;
}

static __always_inline __u32 lbd_csum_off(struct lbd_pkt *p)
{
	return lbd_l4_off(p) + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							: offsetof(struct udphdr, check));
}

/* Rewrite the source (is_src) or destination address, fixing the L3 (IPv4) and L4
 * (pseudo-header) checksums. */
static __always_inline int lbd_set_addr(struct __sk_buff *skb, struct lbd_pkt *p, int is_src,
					const __be32 *new)
{
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 *cur = is_src ? p->saddr : p->daddr;
	__be32 val[4];

	lbd_copy_addr(val, new);
	if (p->family == LBD_FAMILY_V4) {
		__u32 off = LBD_ETH_HLEN + (is_src ? offsetof(struct iphdr, saddr)
						   : offsetof(struct iphdr, daddr));

		if (bpf_l4_csum_replace(skb, lbd_csum_off(p), cur[0], val[0],
					BPF_F_PSEUDO_HDR | mangled | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, LBD_ETH_HLEN + offsetof(struct iphdr, check), cur[0],
					val[0], 4))
			return -1;
		if (bpf_skb_store_bytes(skb, off, &val[0], 4, 0))
			return -1;
	} else {
		__u32 off = LBD_ETH_HLEN + (is_src ? offsetof(struct ipv6hdr, saddr)
						   : offsetof(struct ipv6hdr, daddr));
		__be32 old[4];
		__s64 diff;

		lbd_copy_addr(old, cur);
		diff = bpf_csum_diff(old, 16, val, 16, 0);
		if (bpf_l4_csum_replace(skb, lbd_csum_off(p), 0, diff, BPF_F_PSEUDO_HDR | mangled))
			return -1;
		if (bpf_skb_store_bytes(skb, off, val, 16, 0))
			return -1;
	}
	lbd_copy_addr(cur, val);
	return 0;
}

static __always_inline int lbd_set_port(struct __sk_buff *skb, struct lbd_pkt *p, int is_src,
					__be16 port)
{
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 old = is_src ? p->sport : p->dport;

	if (old == port)
		return 0;
	if (bpf_l4_csum_replace(skb, lbd_csum_off(p), old, port, mangled | 2))
		return -1;
	if (bpf_skb_store_bytes(skb, lbd_l4_off(p) + (is_src ? 0 : 2), &port, 2, 0))
		return -1;
	if (is_src)
		p->sport = port;
	else
		p->dport = port;
	return 0;
}

/* Send an already translated packet straight to its next hop. Used where the stack would
 * refuse to forward it (its source is now one of the node's own addresses). */
static __always_inline int lbd_fib_redirect(struct __sk_buff *skb, struct lbd_pkt *p)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.ifindex = skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	if (p->family == LBD_FAMILY_V4) {
		fib.family = 2; /* AF_INET */
		fib.tot_len = p->tot_len;
		fib.ipv4_src = p->saddr[0];
		fib.ipv4_dst = p->daddr[0];
	} else {
		fib.family = 10; /* AF_INET6 */
		fib.tot_len = p->tot_len + 40;
		lbd_copy_addr(fib.ipv6_src, p->saddr);
		lbd_copy_addr(fib.ipv6_dst, p->daddr);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) ||
		    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The next hop's MAC is not known yet: let the neighbour subsystem resolve it. */
		struct bpf_redir_neigh nh = {};

		nh.nh_family = fib.family;
		if (p->family == LBD_FAMILY_V4)
			nh.ipv4_nh = fib.ipv4_dst;
		else
			lbd_copy_addr(nh.ipv6_nh, fib.ipv6_dst);
		return lbd_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_OK;
}

static __always_inline void lbd_ct_key_of(struct lb_ct_key *k, struct lbd_pkt *p, __u8 dir)
{
	lbd_copy_addr(k->saddr, p->saddr);
	lbd_copy_addr(k->daddr, p->daddr);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->dir = dir;
}

static __always_inline void lbd_ct_touch(struct lb_ct_val *v, struct lbd_pkt *p, __u64 now)
{
	v->last_seen_ns = now;
	if (p->tcp_flags & (LBD_TCP_FIN | LBD_TCP_RST))
		v->flags |= LBD_CT_CLOSING;
}

static __always_inline int lbd_is_syn(struct lbd_pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (LBD_TCP_SYN | LBD_TCP_ACK)) == LBD_TCP_SYN;
}

/* Delete a reply entry (key `rk`, value `v`) and the forward entry it was created with.
 * The forward entry goes only while it still names this reply's backend: the client may
 * already have reused its tuple towards the frontend for a newer flow. */
static __always_inline void lbd_ct_drop_reply(struct lb_ct_key *rk, struct lb_ct_val *v)
{
	struct lb_ct_key fk = {};
	struct lb_ct_val *fv;

	lbd_copy_addr(fk.saddr, v->addr2);
	lbd_copy_addr(fk.daddr, v->addr);
	fk.sport = v->port2;
	fk.dport = v->port;
	fk.proto = rk->proto;
	fk.family = rk->family;
	fk.dir = LBD_CT_FORWARD;
	fv = lbd_ct.lookup(&fk);
	if (fv && fv->port == rk->sport && lbd_addr_eq(fv->addr, rk->saddr))
		lbd_ct.delete(&fk);
	lbd_ct.delete(rk);
}

/* `p` opens a flow that no service translates (its destination is not a frontend). Its
 * replies will carry the reverse tuple; a reply entry still holding that tuple belongs to
 * an earlier load-balanced flow that used the same client port towards a frontend
 * (client:port -> frontend, DNATed to this very destination), and would rewrite the new
 * flow's replies to come from the frontend, which the client drops. The tuple now belongs
 * to the new flow: forget the old one. TCP: on a SYN only (later segments of a direct flow
 * cannot meet such an entry, the SYN cleared it); UDP: on every datagram, as nothing marks
 * a new UDP flow and a live load-balanced one never sends to the backend itself. */
static __always_inline void lbd_ct_claim_direct(struct lbd_pkt *p)
{
	struct lb_ct_key rk = {};
	struct lb_ct_val *v;

	if (p->proto == IPPROTO_TCP && !lbd_is_syn(p))
		return;
	lbd_copy_addr(rk.saddr, p->daddr);
	lbd_copy_addr(rk.daddr, p->saddr);
	rk.sport = p->dport;
	rk.dport = p->sport;
	rk.proto = p->proto;
	rk.family = p->family;
	rk.dir = LBD_CT_REPLY;
	v = lbd_ct.lookup(&rk);
	if (v)
		lbd_ct_drop_reply(&rk, v);
}

/* A reply of a translated flow: restore the frontend as source (and the client as
 * destination when the flow was SNATed). Returns -1 when `p` is not such a reply.
 * `ingress`: the packet has yet to be routed (it entered a device), so a reply whose
 * restored source is one of the node's addresses (LBD_CT_FIB) must be redirected here;
 * on the uplink's egress it is already on its way out. */
static __always_inline int lbd_reply(struct __sk_buff *skb, struct lbd_pkt *p, __u64 now,
				     int ingress)
{
	struct lb_ct_key k = {};
	struct lb_ct_val *v;
	struct lb_rev_nat_val *rn;
	__be32 faddr[4], caddr[4];
	__be16 fport, cport;
	__u32 rev_nat_id;
	__u16 flags;

	lbd_ct_key_of(&k, p, LBD_CT_REPLY);
	v = lbd_ct.lookup(&k);
	if (!v)
		return -1;
	/* A SYN-ACK on a flow that already saw FIN or RST answers a new connection that
	 * reuses the tuple without us having seen its SYN (a direct one, or one we did not
	 * balance): the old translation must not apply to it. */
	if ((v->flags & LBD_CT_CLOSING) && p->proto == IPPROTO_TCP &&
	    (p->tcp_flags & (LBD_TCP_SYN | LBD_TCP_ACK)) == (LBD_TCP_SYN | LBD_TCP_ACK)) {
		lbd_ct_drop_reply(&k, v);
		return -1;
	}
	lbd_ct_touch(v, p, now);
	v->flags |= LBD_CT_SEEN_REPLY;
	flags = v->flags;
	rev_nat_id = v->rev_nat_id;
	lbd_copy_addr(faddr, v->addr);
	fport = v->port;
	lbd_copy_addr(caddr, v->addr2);
	cport = v->port2;
	rn = lbd_revnat.lookup(&rev_nat_id);
	if (rn && rn->family == p->family) {
		lbd_copy_addr(faddr, rn->addr);
		fport = rn->port;
	}
	if (lbd_set_addr(skb, p, 1, faddr) || lbd_set_port(skb, p, 1, fport))
		return TC_ACT_SHOT;
	if (!(flags & LBD_CT_SNAT)) {
		struct lb_config *cfg;

		/* A local backend's reply to a node-port client, seen on the pod's veth: with
		 * the node's address as source the stack would drop it as a martian rather
		 * than forward it, so it goes straight to its next hop. */
		if (ingress && (flags & LBD_CT_FIB))
			return lbd_fib_redirect(skb, p);
		/* While another mode's state is in the kernel, the stack may break any
		 * translated reply. Handing over (LBD_CFG_HANDOVER): IPVS binds the frontends
		 * to a local device (the reply's source becomes a martian too), and iptables
		 * drops what its conntrack calls INVALID (it never saw the flow's translated
		 * form). Taking over (takeover_until_ns): while a nat table is in place,
		 * conntrack picks the translated reply up as a flow of its own and nf_nat may
		 * remap its source port (frontend:80 left as frontend:148, seen on 6.1). */
		if (!ingress)
			return TC_ACT_OK; /* egress: no config lookup on this per-packet path */
		cfg = lbd_get_config();
		if (cfg && ((cfg->flags & LBD_CFG_HANDOVER) || now < cfg->takeover_until_ns))
			return lbd_fib_redirect(skb, p);
		return TC_ACT_OK;
	}
	if (lbd_set_addr(skb, p, 0, caddr) || lbd_set_port(skb, p, 0, cport))
		return TC_ACT_SHOT;
	return lbd_fib_redirect(skb, p);
}

static __always_inline int lbd_apply_forward(struct __sk_buff *skb, struct lbd_pkt *p,
					     __be32 *baddr, __be16 bport, __be32 *saddr,
					     __be16 sport, __u16 flags)
{
	if (lbd_set_addr(skb, p, 0, baddr) || lbd_set_port(skb, p, 0, bport))
		return TC_ACT_SHOT;
	if (!(flags & LBD_CT_SNAT))
		return TC_ACT_OK;
	if (lbd_set_addr(skb, p, 1, saddr) || lbd_set_port(skb, p, 1, sport))
		return TC_ACT_SHOT;
	return lbd_fib_redirect(skb, p);
}

/* A later packet of a known flow. Returns -1 when the flow is not known (or is a new
 * connection reusing the tuple of a closing one, which gets a fresh backend). A flow
 * another mode balanced (LBD_CT_PASS) goes on to the stack untranslated. */
static __always_inline int lbd_forward(struct __sk_buff *skb, struct lbd_pkt *p, __u64 now)
{
	struct lb_ct_key k = {};
	struct lb_ct_val *v;
	__be32 baddr[4], saddr[4];
	__be16 bport, sport;
	__u16 flags;

	lbd_ct_key_of(&k, p, LBD_CT_FORWARD);
	v = lbd_ct.lookup(&k);
	if (!v)
		return -1;
	if ((v->flags & LBD_CT_CLOSING) && lbd_is_syn(p)) {
		lbd_ct.delete(&k);
		return -1;
	}
	lbd_ct_touch(v, p, now);
	flags = v->flags;
	if (flags & LBD_CT_PASS)
		return TC_ACT_OK;
	lbd_copy_addr(baddr, v->addr);
	bport = v->port;
	lbd_copy_addr(saddr, v->addr2);
	sport = v->port2;
	return lbd_apply_forward(skb, p, baddr, bport, saddr, sport, flags);
}

static __always_inline __u32 lbd_flow_hash(struct lbd_pkt *p)
{
	__u32 h = lbd_hash_addr(p->saddr, p->proto);

	h = lbd_hash_addr(p->daddr, h);
	return lbd_mix32(h ^ (((__u32)p->sport << 16) | p->dport));
}

static __always_inline __u16 lbd_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* Answer a TCP segment with a RST from the frontend, in place, back out the way it came. */
static __always_inline int lbd_reject_tcp(struct __sk_buff *skb, struct lbd_pkt *p)
{
	__u32 l4 = lbd_l4_off(p);
	struct tcphdr th = {};
	__u32 seq, ack_seq, plen, hlen;
	__u8 in_flags = p->tcp_flags;
	__u8 macs[12];
	__u32 csum;

	if (in_flags & LBD_TCP_RST)
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)) || bpf_skb_load_bytes(skb, 0, macs, 12))
		return TC_ACT_SHOT;
	hlen = th.doff * 4;
	plen = (p->family == LBD_FAMILY_V4 ? p->tot_len - 20 : p->tot_len);
	plen = plen > hlen ? plen - hlen : 0;
	seq = LBD_NTOHL(th.seq);
	ack_seq = LBD_NTOHL(th.ack_seq);
	__builtin_memset(&th, 0, sizeof(th));
	th.source = p->dport;
	th.dest = p->sport;
	th.doff = 5;
	th.rst = 1;
	if (in_flags & LBD_TCP_ACK) {
		th.seq = LBD_HTONL(ack_seq);
	} else {
		th.ack = 1;
		th.ack_seq = LBD_HTONL(seq + plen + ((in_flags & LBD_TCP_SYN) ? 1 : 0) +
				       ((in_flags & LBD_TCP_FIN) ? 1 : 0));
	}
	if (bpf_skb_change_tail(skb, l4 + sizeof(th), 0))
		return TC_ACT_SHOT;
	/* checksum: pseudo header (swapped addresses) + the 20-byte header */
	csum = bpf_csum_diff(0, 0, (__be32 *)&th, sizeof(th), 0);
	csum = bpf_csum_diff(0, 0, p->daddr, 16, csum);
	csum = bpf_csum_diff(0, 0, p->saddr, 16, csum);
	{
		__be32 tail = LBD_HTONL(IPPROTO_TCP + sizeof(th));

		csum = bpf_csum_diff(0, 0, &tail, 4, csum);
	}
	th.check = lbd_csum_fold(csum);
	if (bpf_skb_store_bytes(skb, l4, &th, sizeof(th), 0))
		return TC_ACT_SHOT;
	if (p->family == LBD_FAMILY_V4) {
		struct iphdr ip = {};

		ip.version = 4;
		ip.ihl = 5;
		ip.tot_len = LBD_HTONS(20 + sizeof(th));
		ip.ttl = 64;
		ip.protocol = IPPROTO_TCP;
		ip.saddr = p->daddr[0];
		ip.daddr = p->saddr[0];
		ip.check = lbd_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));
		if (bpf_skb_store_bytes(skb, LBD_ETH_HLEN, &ip, sizeof(ip), 0))
			return TC_ACT_SHOT;
	} else {
		struct ipv6hdr ip6 = {};

		ip6.version = 6;
		ip6.payload_len = LBD_HTONS(sizeof(th));
		ip6.nexthdr = IPPROTO_TCP;
		ip6.hop_limit = 64;
		lbd_copy_addr(ip6.saddr.in6_u.u6_addr32, p->daddr);
		lbd_copy_addr(ip6.daddr.in6_u.u6_addr32, p->saddr);
		if (bpf_skb_store_bytes(skb, LBD_ETH_HLEN, &ip6, sizeof(ip6), 0))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, 0, &macs[6], 6, 0) || bpf_skb_store_bytes(skb, 6, macs, 6, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answer a UDP datagram with an ICMP(v6) port unreachable from the frontend, quoting the
 * offending IP header and the first 8 bytes after it, as a router would. */
static __always_inline int lbd_reject_udp(struct __sk_buff *skb, struct lbd_pkt *p)
{
	__u8 macs[12];

	if (bpf_skb_load_bytes(skb, 0, macs, 12))
		return TC_ACT_SHOT;
	if (p->family == LBD_FAMILY_V4) {
		/* eth | ip | icmp(8) | quoted ip(20) | quoted udp(8) */
		struct {
			struct icmphdr icmp;
			struct iphdr ip;
			__u8 l4[8];
		} q = {};
		struct iphdr ip = {};

		if (bpf_skb_load_bytes(skb, LBD_ETH_HLEN, &q.ip, sizeof(q.ip) + sizeof(q.l4)))
			return TC_ACT_SHOT;
		if (bpf_skb_change_tail(skb, LBD_L4_V4 + 8, 0))
			return TC_ACT_SHOT;
		if (bpf_skb_adjust_room(skb, sizeof(struct icmphdr) + sizeof(struct iphdr),
					BPF_ADJ_ROOM_NET, 0))
			return TC_ACT_SHOT;
		q.icmp.type = ICMP_DEST_UNREACH;
		q.icmp.code = ICMP_PORT_UNREACH;
		q.icmp.checksum = lbd_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&q, sizeof(q), 0));
		ip.version = 4;
		ip.ihl = 5;
		ip.tos = 0xc0;
		ip.tot_len = LBD_HTONS(sizeof(ip) + sizeof(q));
		ip.ttl = 64;
		ip.protocol = IPPROTO_ICMP;
		ip.saddr = p->daddr[0];
		ip.daddr = p->saddr[0];
		ip.check = lbd_csum_fold(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));
		if (bpf_skb_store_bytes(skb, LBD_ETH_HLEN, &ip, sizeof(ip), 0) ||
		    bpf_skb_store_bytes(skb, LBD_L4_V4, &q, sizeof(q), 0))
			return TC_ACT_SHOT;
	} else {
		/* eth | ip6 | icmp6(8) | quoted ip6(40) | quoted udp(8) */
		struct {
			struct icmp6hdr icmp;
			struct ipv6hdr ip;
			__u8 l4[8];
		} q = {};
		struct ipv6hdr ip6 = {};
		__u32 csum;

		if (bpf_skb_load_bytes(skb, LBD_ETH_HLEN, &q.ip, sizeof(q.ip) + sizeof(q.l4)))
			return TC_ACT_SHOT;
		if (bpf_skb_change_tail(skb, LBD_L4_V6 + 8, 0))
			return TC_ACT_SHOT;
		if (bpf_skb_adjust_room(skb, sizeof(struct icmp6hdr) + sizeof(struct ipv6hdr),
					BPF_ADJ_ROOM_NET, 0))
			return TC_ACT_SHOT;
		q.icmp.icmp6_type = ICMPV6_DEST_UNREACH;
		q.icmp.icmp6_code = ICMPV6_PORT_UNREACH;
		csum = bpf_csum_diff(0, 0, (__be32 *)&q, sizeof(q), 0);
		csum = bpf_csum_diff(0, 0, p->daddr, 16, csum);
		csum = bpf_csum_diff(0, 0, p->saddr, 16, csum);
		{
			__be32 tail[2] = {LBD_HTONL(sizeof(q)), LBD_HTONL(IPPROTO_ICMPV6)};

			csum = bpf_csum_diff(0, 0, tail, 8, csum);
		}
		q.icmp.icmp6_cksum = lbd_csum_fold(csum);
		ip6.version = 6;
		ip6.payload_len = LBD_HTONS(sizeof(q));
		ip6.nexthdr = IPPROTO_ICMPV6;
		ip6.hop_limit = 64;
		lbd_copy_addr(ip6.saddr.in6_u.u6_addr32, p->daddr);
		lbd_copy_addr(ip6.daddr.in6_u.u6_addr32, p->saddr);
		if (bpf_skb_store_bytes(skb, LBD_ETH_HLEN, &ip6, sizeof(ip6), 0) ||
		    bpf_skb_store_bytes(skb, LBD_L4_V6, &q, sizeof(q), 0))
			return TC_ACT_SHOT;
	}
	if (bpf_skb_store_bytes(skb, 0, &macs[6], 6, 0) || bpf_skb_store_bytes(skb, 6, macs, 6, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int lbd_reject(struct __sk_buff *skb, struct lbd_pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return lbd_reject_tcp(skb, p);
	return lbd_reject_udp(skb, p);
}

/* Create the conntrack pair of a new flow; with SNAT, find a free source port first. */
static __always_inline int lbd_ct_create(struct lbd_pkt *p, struct lb_ct_val *fwd,
					 struct lb_config *cfg)
{
	struct lb_ct_key fk = {}, rk = {};
	struct lb_ct_val rv = {};
	__u16 lo = 1024, hi = 65535;
	int i;

	lbd_ct_key_of(&fk, p, LBD_CT_FORWARD);
	lbd_copy_addr(rk.saddr, fwd->addr);
	rk.sport = fwd->port;
	rk.proto = p->proto;
	rk.family = p->family;
	rk.dir = LBD_CT_REPLY;
	lbd_copy_addr(rv.addr, p->daddr);
	rv.port = p->dport;
	lbd_copy_addr(rv.addr2, p->saddr);
	rv.port2 = p->sport;
	rv.rev_nat_id = fwd->rev_nat_id;
	rv.backend_id = fwd->backend_id;
	rv.flags = fwd->flags;
	rv.last_seen_ns = fwd->last_seen_ns;
	if (!(fwd->flags & LBD_CT_SNAT)) {
		lbd_copy_addr(rk.daddr, p->saddr);
		rk.dport = p->sport;
		if (lbd_ct.update(&rk, &rv))
			return -1;
		return lbd_ct.update(&fk, fwd);
	}
	if (cfg && cfg->snat_port_min && cfg->snat_port_max > cfg->snat_port_min) {
		lo = cfg->snat_port_min;
		hi = cfg->snat_port_max;
	}
	lbd_copy_addr(rk.daddr, fwd->addr2);
	/* Keep the client's port when free (as MASQUERADE does), else try random ones. */
	rk.dport = p->sport;
#pragma unroll
	for (i = 0; i < LBD_SNAT_TRIES; i++) {
		if (i > 0)
			rk.dport = LBD_HTONS(lo + bpf_get_prandom_u32() % (hi - lo + 1));
		if (lbd_ct.insert(&rk, &rv) == 0) {
			fwd->port2 = rk.dport;
			return lbd_ct.update(&fk, fwd);
		}
	}
	return -1;
}

/* While taking a node over from another mode, a TCP segment other than a SYN, to a
 * frontend, with no conntrack entry is a connection that mode NATed before this datapath
 * was attached: the kernel's conntrack holds its binding, so it is left to the stack for
 * its lifetime (a pass entry, expired by the GC like any other). Returns -1 otherwise. */
static __always_inline int lbd_takeover_pass(struct lbd_pkt *p, __u64 now)
{
	struct lb_config *cfg;
	struct lb_ct_key k = {};
	struct lb_ct_val v = {};

	if (p->proto != IPPROTO_TCP || (p->tcp_flags & LBD_TCP_SYN))
		return -1;
	cfg = lbd_get_config();
	if (!cfg || now >= cfg->takeover_until_ns)
		return -1;
	lbd_ct_key_of(&k, p, LBD_CT_FORWARD);
	/* established: the GC gives it the established timeout, not the SYN one */
	v.flags = LBD_CT_PASS | LBD_CT_SEEN_REPLY;
	lbd_ct_touch(&v, p, now);
	lbd_ct.update(&k, &v);
	return TC_ACT_OK;
}

/* A new flow to a frontend (or not a frontend: TC_ACT_OK). */
static __always_inline int lbd_balance(struct __sk_buff *skb, struct lbd_pkt *p, __u64 now,
				       int internal)
{
	struct lb_svc_key key = {};
	struct lb_affinity_key akey = {};
	struct lb_ct_val fwd = {};
	struct lb_backend_val *be = 0;
	struct lb_config *cfg;
	struct lb_svc_val *fe;
	__u32 id = 0, rev_nat_id;
	__u16 flags;
	__be32 baddr[4], saddr[4];
	__be16 bport;
	__u8 bflags;

	lbd_copy_addr(key.addr, p->daddr);
	key.dport = p->dport;
	key.proto = p->proto;
	key.family = p->family;
	fe = lbd_lookup_frontend(&key, internal);
	if (!fe) {
		lbd_ct_claim_direct(p);
		return TC_ACT_OK;
	}
	if (lbd_takeover_pass(p, now) >= 0)
		return TC_ACT_OK;
	flags = fe->flags;
	rev_nat_id = fe->rev_nat_id;
	if (flags & LBD_SVC_SRC_RANGE) {
		struct lb_src_range_key rk = {};

		rk.prefixlen = 32 + (p->family == LBD_FAMILY_V4 ? 32 : 128);
		rk.rev_nat_id = rev_nat_id;
		lbd_copy_addr(rk.addr, p->saddr);
		if (!lbd_srcrange.lookup(&rk))
			return TC_ACT_SHOT;
	}
	if (fe->count == 0) {
		if (flags & LBD_SVC_REJECT)
			return lbd_reject(skb, p);
		return TC_ACT_SHOT;
	}
	if (flags & LBD_SVC_AFFINITY) {
		lbd_copy_addr(akey.client, p->saddr);
		akey.family = p->family;
		akey.svc_id = fe->svc_id;
		be = lbd_affinity_backend(&akey, fe, now, &id);
	}
	if (!be)
		be = lbd_select_backend(&key, fe, lbd_flow_hash(p), 0, &id);
	if (!be || be->family != p->family)
		return TC_ACT_SHOT;
	lbd_copy_addr(baddr, be->addr);
	bport = be->port;
	bflags = be->flags;
	if (flags & LBD_SVC_AFFINITY)
		lbd_remember_affinity(&akey, id, now);

	lbd_copy_addr(fwd.addr, baddr);
	fwd.port = bport;
	fwd.rev_nat_id = rev_nat_id;
	fwd.backend_id = id;
	fwd.last_seen_ns = now;
	cfg = lbd_get_config();
	/* Masquerade what another node may answer (Cluster policy, remote backend; also
	 * off-node clients of a cluster IP) and hairpin, whose reply would skip us. */
	if ((!(flags & LBD_SVC_LOCAL) && !(bflags & LBD_BACKEND_LOCAL) && !internal) ||
	    lbd_addr_eq(baddr, p->saddr)) {
		if (cfg) {
			if (p->family == LBD_FAMILY_V4)
				lbd_copy_addr(saddr, cfg->node_addr4);
			else
				lbd_copy_addr(saddr, cfg->node_addr6);
			if (saddr[0] | saddr[1] | saddr[2] | saddr[3]) {
				fwd.flags |= LBD_CT_SNAT;
				lbd_copy_addr(fwd.addr2, saddr);
			}
		}
	}
	/* The frontend is one of the node's own addresses: its replies, once translated
	 * back, cannot be forwarded by the stack (see lbd_reply). */
	if ((flags & LBD_SVC_NODEPORT) && !(fwd.flags & LBD_CT_SNAT))
		fwd.flags |= LBD_CT_FIB;
	if (lbd_ct_create(p, &fwd, cfg))
		return TC_ACT_SHOT;
	lbd_copy_addr(saddr, fwd.addr2);
	return lbd_apply_forward(skb, p, baddr, bport, saddr, fwd.port2, fwd.flags);
}

static __always_inline int lbd_ingress(struct __sk_buff *skb, int internal)
{
	struct lbd_pkt p = {};
	__u64 now;
	int ret;

	if (lbd_parse(skb, &p))
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	ret = lbd_reply(skb, &p, now, 1);
	if (ret >= 0)
		return ret;
	ret = lbd_forward(skb, &p, now);
	if (ret >= 0)
		return ret;
	return lbd_balance(skb, &p, now, internal);
}

int lbd_tc_from_netdev(struct __sk_buff *skb)
{
	return lbd_ingress(skb, 0);
}

int lbd_tc_from_pod(struct __sk_buff *skb)
{
	return lbd_ingress(skb, 1);
}

int lbd_tc_egress(struct __sk_buff *skb)
{
	struct lbd_pkt p = {};
	int ret;

	if (lbd_parse(skb, &p))
		return TC_ACT_OK;
	ret = lbd_reply(skb, &p, bpf_ktime_get_ns(), 0);
	return ret >= 0 ? ret : TC_ACT_OK;
}
