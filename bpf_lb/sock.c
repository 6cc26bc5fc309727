/* Socket-level load balancing: cgroup/sock_addr programs.
 *
 * connect() and unconnected sendmsg() to a frontend are rewritten to a backend before any
 * packet exists, so the datapath below never sees the frontend address (no per-packet
 * NAT, no conntrack). The frontend is remembered per socket (lbd_sockrev, keyed by the
 * socket cookie and the backend), so recvmsg() and getpeername() report the address the
 * application asked for. A frontend without endpoints makes connect()/sendmsg() fail at
 * once with ECONNREFUSED (bpf_set_retval: returning 0 alone would give EPERM).
 *
 * The programs act for every process of the cgroup they are attached to (and its
 * descendants), whatever network namespace those processes are in; with
 * LBD_CFG_HOSTNS_ONLY they act only for sockets of the host's namespace, and pods are
 * served by the tc programs instead.
 */
#include "lb.h"

/* Stops the compiler from reusing a computed ctx field address for a later store: the
 * verifier only accepts ctx accesses of the form *(ctx + constant). */
#define lbd_ctx_barrier(ctx) asm volatile("" : "+r"(ctx))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define LBD_V4MAPPED_PREFIX 0xffff0000U /* htonl(0x0000ffff) */
#else
#define LBD_V4MAPPED_PREFIX 0x0000ffffU
#endif

static __always_inline int lbd_sock_in_scope(struct bpf_sock_addr *ctx)
{
	struct lb_config *cfg = lbd_get_config();

	if (cfg && (cfg->flags & LBD_CFG_HOSTNS_ONLY))
		return bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
	return 1;
}

/* Translate the destination (family, addr, port) of the socket `ctx` in place.
 * Returns 1 to let the call proceed (translated or not), 0 to fail it (retval set).
 * `sticky`: unconnected UDP (sendmsg), where every datagram is balanced on its own: the
 * socket cookie picks the slot, so one socket keeps talking to one backend, as a
 * conntrack entry would keep it. */
static __always_inline int lbd_sock_xlate(struct bpf_sock_addr *ctx, __u8 family, __be32 *addr,
					  __be16 *port, int sticky)
{
	struct lb_svc_key key = {};
	struct lb_affinity_key akey = {};
	struct lb_sock_rev_key rkey = {};
	struct lb_sock_rev_val rval = {};
	struct lb_backend_val *be = 0;
	struct lb_svc_val *fe;
	__u64 cookie, now;
	__u32 id = 0;
	__u16 flags;

	if (!lbd_sock_in_scope(ctx))
		return 1;
	key.addr[0] = addr[0];
	key.addr[1] = addr[1];
	key.addr[2] = addr[2];
	key.addr[3] = addr[3];
	key.dport = *port;
	key.proto = ctx->protocol;
	key.family = family;
	/* Sockets of this node are in-cluster clients: external frontends with
	 * externalTrafficPolicy: Local still use every endpoint (kube-proxy short-circuits). */
	fe = lbd_lookup_frontend(&key, 1);
	if (!fe) {
		/* A UDP socket that sent to a frontend may now talk to the backend it was
		 * given directly: from here on, that backend's datagrams read as its own,
		 * not as the frontend's (TCP sockets connect once, so never get here). */
		if (ctx->protocol == IPPROTO_UDP) {
			rkey.cookie = bpf_get_socket_cookie(ctx);
			rkey.addr[0] = addr[0];
			rkey.addr[1] = addr[1];
			rkey.addr[2] = addr[2];
			rkey.addr[3] = addr[3];
			rkey.port = *port;
			rkey.family = family;
			lbd_sockrev.delete(&rkey);
		}
		return 1;
	}
	flags = fe->flags;
	if (fe->count == 0) {
		if (flags & LBD_SVC_REJECT) {
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		/* Local policy without local endpoints means drop: leave the address alone so
		 * the packet-level datapath (or the lack of a route) deals with it. */
		return 1;
	}
	cookie = bpf_get_socket_cookie(ctx);
	now = bpf_ktime_get_ns();
	if (flags & LBD_SVC_AFFINITY) {
		/* The client address is not known before connect() picks a source: stick per
		 * network namespace, which is per pod. */
		__u64 ns = bpf_get_netns_cookie(ctx);

		akey.client[0] = (__u32)ns;
		akey.client[1] = (__u32)(ns >> 32);
		akey.svc_id = fe->svc_id;
		be = lbd_affinity_backend(&akey, fe, now, &id);
	}
	if (!be)
		be = lbd_select_backend(&key, fe, lbd_mix32((__u32)cookie ^ lbd_mix32(cookie >> 32)),
					sticky, &id);
	if (!be || be->family != family)
		return 1;
	if (flags & LBD_SVC_AFFINITY)
		lbd_remember_affinity(&akey, id, now);

	rkey.cookie = cookie;
	rkey.addr[0] = be->addr[0];
	rkey.addr[1] = be->addr[1];
	rkey.addr[2] = be->addr[2];
	rkey.addr[3] = be->addr[3];
	rkey.port = be->port;
	rkey.family = family;
	rval.addr[0] = addr[0];
	rval.addr[1] = addr[1];
	rval.addr[2] = addr[2];
	rval.addr[3] = addr[3];
	rval.port = *port;
	rval.family = family;
	rval.rev_nat_id = fe->rev_nat_id;
	lbd_sockrev.update(&rkey, &rval);

	addr[0] = be->addr[0];
	addr[1] = be->addr[1];
	addr[2] = be->addr[2];
	addr[3] = be->addr[3];
	*port = be->port;
	return 1;
}

static __always_inline int lbd_sock4_fwd(struct bpf_sock_addr *ctx, int sticky)
{
	__be32 addr[4] = {ctx->user_ip4, 0, 0, 0};
	__be16 port = (__be16)ctx->user_port;
	int ret = lbd_sock_xlate(ctx, LBD_FAMILY_V4, addr, &port, sticky);

	if (ret && (addr[0] != ctx->user_ip4 || port != (__be16)ctx->user_port)) {
		lbd_ctx_barrier(ctx);
		ctx->user_ip4 = addr[0];
		ctx->user_port = (__u32)port;
	}
	return ret;
}

static __always_inline int lbd_is_v4mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == LBD_V4MAPPED_PREFIX;
}

static __always_inline int lbd_sock6_fwd(struct bpf_sock_addr *ctx, int sticky)
{
	__be32 addr[4];
	__be16 port = (__be16)ctx->user_port;
	int ret;

	if (lbd_is_v4mapped(ctx)) {
		/* An IPv6 socket talking IPv4 (::ffff:a.b.c.d): the IPv4 frontends apply. */
		addr[0] = ctx->user_ip6[3];
		addr[1] = addr[2] = addr[3] = 0;
		ret = lbd_sock_xlate(ctx, LBD_FAMILY_V4, addr, &port, sticky);
		if (ret && (addr[0] != ctx->user_ip6[3] || port != (__be16)ctx->user_port)) {
			lbd_ctx_barrier(ctx);
			ctx->user_ip6[3] = addr[0];
			ctx->user_port = (__u32)port;
		}
		return ret;
	}
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	ret = lbd_sock_xlate(ctx, LBD_FAMILY_V6, addr, &port, sticky);
	if (ret && (addr[0] != ctx->user_ip6[0] || addr[1] != ctx->user_ip6[1] ||
		    addr[2] != ctx->user_ip6[2] || addr[3] != ctx->user_ip6[3] ||
		    port != (__be16)ctx->user_port)) {
		lbd_ctx_barrier(ctx);
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
		ctx->user_port = (__u32)port;
	}
	return ret;
}

/* recvmsg/getpeername: a backend address this socket was sent to reads as the frontend. */
static __always_inline struct lb_sock_rev_val *lbd_sock_rev(struct bpf_sock_addr *ctx, __u8 family,
							     __be32 a0, __be32 a1, __be32 a2,
							     __be32 a3)
{
	struct lb_sock_rev_key rkey = {};

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.addr[0] = a0;
	rkey.addr[1] = a1;
	rkey.addr[2] = a2;
	rkey.addr[3] = a3;
	rkey.port = (__be16)ctx->user_port;
	rkey.family = family;
	return lbd_sockrev.lookup(&rkey);
}

static __always_inline int lbd_sock4_rev(struct bpf_sock_addr *ctx)
{
	struct lb_sock_rev_val *v = lbd_sock_rev(ctx, LBD_FAMILY_V4, ctx->user_ip4, 0, 0, 0);

	if (v) {
		lbd_ctx_barrier(ctx);
		ctx->user_ip4 = v->addr[0];
		ctx->user_port = (__u32)v->port;
	}
	return 1;
}

static __always_inline int lbd_sock6_rev(struct bpf_sock_addr *ctx)
{
	struct lb_sock_rev_val *v;

	if (lbd_is_v4mapped(ctx)) {
		v = lbd_sock_rev(ctx, LBD_FAMILY_V4, ctx->user_ip6[3], 0, 0, 0);
		if (v) {
			lbd_ctx_barrier(ctx);
			ctx->user_ip6[3] = v->addr[0];
			ctx->user_port = (__u32)v->port;
		}
		return 1;
	}
	v = lbd_sock_rev(ctx, LBD_FAMILY_V6, ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
			 ctx->user_ip6[3]);
	if (v) {
		lbd_ctx_barrier(ctx);
		ctx->user_ip6[0] = v->addr[0];
		ctx->user_ip6[1] = v->addr[1];
		ctx->user_ip6[2] = v->addr[2];
		ctx->user_ip6[3] = v->addr[3];
		ctx->user_port = (__u32)v->port;
	}
	return 1;
}

int lbd_sock_connect4(struct bpf_sock_addr *ctx)
{
	return lbd_sock4_fwd(ctx, 0);
}

int lbd_sock_connect6(struct bpf_sock_addr *ctx)
{
	return lbd_sock6_fwd(ctx, 0);
}

int lbd_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return lbd_sock4_fwd(ctx, 1);
}

int lbd_sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return lbd_sock6_fwd(ctx, 1);
}

int lbd_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return lbd_sock4_rev(ctx);
}

int lbd_sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return lbd_sock6_rev(ctx);
}

int lbd_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return lbd_sock4_rev(ctx);
}

int lbd_sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return lbd_sock6_rev(ctx);
}
