"""Render a ProxyState into iptables-restore payloads (pure; no kernel access).

Owns lbd's iptables chain layout. It mirrors kube-proxy's iptables proxier, so an operator
reading `iptables-save` recognises it, under lbd's own prefix:

  nat     LBD-SERVICES     a rule per frontend (cluster IP, external IP, LB IP) to its
                           SVC/SVL/EXT/FW chain; the last rule sends local destinations on
                           to LBD-NODEPORTS
          LBD-NODEPORTS    a rule per node port, to EXT
          LBD-SVC-<hash>   cluster endpoints of a service port (recent/statistic rules)
          LBD-SVL-<hash>   this node's endpoints of a service port
          LBD-EXT-<hash>   external frontends: masquerade, in-cluster short-circuit, SVC/SVL
          LBD-FW-<hash>    loadBalancerSourceRanges: allowed sources to EXT, others fall through
          LBD-SEP-<hash>   one endpoint: hairpin masquerade, DNAT
          LBD-MARK-MASQ, LBD-POSTROUTING (mark 0x4000, then MASQUERADE --random-fully)
  filter  LBD-SERVICES, LBD-EXTERNAL-SERVICES (REJECT/DROP frontends without endpoints),
          LBD-PROXY-FIREWALL (DROP LB traffic its FW chain did not DNAT), LBD-NODEPORTS
          (accept health check node ports), LBD-FORWARD
  all     LBD-PROXY-CANARY (one unreferenced rule: empty or missing means "flushed")

`Renderer` memoises each service port's rules (keyed by the state's own key, validated by
identity, then equality, of the frozen ServicePort), so full and partial renders alike only
format the service ports that changed since the previous call.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbd.model.state import Endpoint, IPFamily, ProxyState, ServicePort, ServicePortName

PREFIX = "LBD-"
SERVICES = "LBD-SERVICES"
EXTERNAL_SERVICES = "LBD-EXTERNAL-SERVICES"
NODEPORTS = "LBD-NODEPORTS"
POSTROUTING = "LBD-POSTROUTING"
MARK_MASQ = "LBD-MARK-MASQ"
FORWARD = "LBD-FORWARD"
PROXY_FIREWALL = "LBD-PROXY-FIREWALL"
CANARY = "LBD-PROXY-CANARY"
# Only used when one family has several cluster CIDRs: "source outside all of them" cannot
# be written as a single `! -s`, so such traffic jumps here and RETURNs for each CIDR.
MASQ_OFF_CLUSTER = "LBD-MASQ-OFF-CLUSTER"

SVC_PREFIX = "LBD-SVC-"
SVL_PREFIX = "LBD-SVL-"
EXT_PREFIX = "LBD-EXT-"
FW_PREFIX = "LBD-FW-"
SEP_PREFIX = "LBD-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)

MASQ_MARK = "0x4000"

NAT_BASE_CHAINS = (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ)
FILTER_BASE_CHAINS = (SERVICES, EXTERNAL_SERVICES, FORWARD, NODEPORTS, PROXY_FIREWALL)
CANARY_TABLES = ("mangle", "filter", "nat")
# The canary chain holds one rule (never traversed: nothing jumps there), so a flushed
# table (-F) shows as an empty canary and a deleted one (-X) as a missing canary.
CANARY_RULE = f"-A {CANARY} -j RETURN"

_LOOPBACK = {IPFamily.V4: "127.0.0.0/8", IPFamily.V6: "::1/128"}
_REJECT = {
    IPFamily.V4: "REJECT --reject-with icmp-port-unreachable",
    IPFamily.V6: "REJECT --reject-with icmp6-port-unreachable",
}
_NODEPORTS_COMMENT = '"lbd service nodeports; NOTE: this must be the last rule in this chain"'


@dataclass(frozen=True, slots=True)
class Jump:
    """One rule lbd installs in a built-in chain, jumping to one of its own chains."""

    table: str
    chain: str  # the built-in chain
    target: str  # lbd's chain
    comment: str
    new_only: bool = False  # match only the first packet of a connection

    def spec(self) -> str:
        """The rule's match + target, as iptables-restore and iptables -D take it."""
        state = "-m conntrack --ctstate NEW " if self.new_only else ""
        return f'{state}-m comment --comment "{self.comment}" -j {self.target}'


# In the order they must appear in each built-in chain (kube-proxy's order).
JUMPS: tuple[Jump, ...] = (
    Jump("nat", "PREROUTING", SERVICES, "lbd service portals"),
    Jump("nat", "OUTPUT", SERVICES, "lbd service portals"),
    Jump("nat", "POSTROUTING", POSTROUTING, "lbd postrouting rules"),
    Jump("filter", "INPUT", PROXY_FIREWALL, "lbd load balancer firewall", True),
    Jump("filter", "INPUT", NODEPORTS, "lbd health check service ports"),
    Jump("filter", "INPUT", EXTERNAL_SERVICES, "lbd externally-visible service portals", True),
    Jump("filter", "FORWARD", PROXY_FIREWALL, "lbd load balancer firewall", True),
    Jump("filter", "FORWARD", FORWARD, "lbd forwarding rules"),
    Jump("filter", "FORWARD", SERVICES, "lbd service portals", True),
    Jump("filter", "FORWARD", EXTERNAL_SERVICES, "lbd externally-visible service portals", True),
    Jump("filter", "OUTPUT", PROXY_FIREWALL, "lbd load balancer firewall", True),
    Jump("filter", "OUTPUT", SERVICES, "lbd service portals", True),
)

_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-")
_ADDR_CHARS = frozenset("0123456789abcdefABCDEF.:/")


def safe_text(text: str) -> str:
    """`text` with anything that could end a line or break quoting replaced by `_`.

    The model validates names, but a payload line is parsed by iptables-restore: one stray
    quote or newline would corrupt every rule after it, so nothing is trusted here.
    """
    if _SAFE_CHARS.issuperset(text):
        return text[:200]
    return "".join(c if c in _SAFE_CHARS else "_" for c in text)[:200]


def _addr(text: str) -> str | None:
    """`text` if it can only be an IP address or CIDR (cheap guard against payload injection)."""
    if text and len(text) <= 49 and _ADDR_CHARS.issuperset(text):
        return text
    return None


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> 2 base32 characters


def chain_hash(text: str) -> str:
    """The first 16 base32 characters of sha256(text), as kube-proxy names its chains.

    16 characters are exactly the first 80 bits; encoding them directly is ~5x faster
    than base64.b32encode, which matters with 100,000 endpoint chains.
    """
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    t = _B32_PAIRS
    return (
        t[n >> 70] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
        + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023]
    )  # fmt: skip


def service_chain_suffix(sp: ServicePort) -> str:
    # sp.key carries namespace/name:port, protocol and family: one hash per service port.
    return chain_hash(sp.key)


def endpoint_chain(sp: ServicePort, ep: Endpoint, key: str | None = None) -> str:
    """LBD-SEP-<hash of service port key and endpoint address>; `key`: sp.key, if known."""
    return SEP_PREFIX + chain_hash(f"{key or sp.key}/{ep.ip}:{ep.port}")


# kube-proxy's largeClusterEndpointsThreshold: above this many endpoints (all service
# ports, both families) per-endpoint rules carry no comment. A cluster in large mode
# leaves it only below 90% of it, so one endpoint coming and going at the threshold
# does not turn every partial sync into a full rewrite.
LARGE_CLUSTER_ENDPOINTS = 1000
_LARGE_CLUSTER_EXIT = LARGE_CLUSTER_ENDPOINTS * 9 // 10


def is_large_cluster(state: ProxyState, was_large: bool = False) -> bool:
    limit = _LARGE_CLUSTER_EXIT if was_large else LARGE_CLUSTER_ENDPOINTS
    total = 0
    for sp in state.service_ports.values():
        total += len(sp.cluster_endpoints)
        if total > limit:
            return True
    return False


_PROBABILITIES: dict[int, str] = {}


def probability(n: int) -> str:
    """1/n formatted for `-m statistic --probability` (10 decimals, as kube-proxy)."""
    p = _PROBABILITIES.get(n)
    if p is None:
        p = _PROBABILITIES[n] = f"{1.0 / n:.10f}"
    return p


@dataclass(frozen=True, slots=True)
class _Context:
    """The parts of the node-wide state that change how one service port renders."""

    family: IPFamily
    cluster_cidrs: tuple[str, ...]
    masquerade_all: bool
    node_ips: tuple[str, ...]
    large_cluster: bool

    @classmethod
    def of(cls, state: ProxyState, family: IPFamily, was_large: bool = False) -> _Context:
        cidrs = tuple(c for c in state.cidrs(family, state.cluster_cidrs) if _addr(c))
        ips = tuple(i for i in state.cidrs(family, state.node_ips) if _addr(i))
        large = is_large_cluster(state, was_large)
        return cls(family, cidrs, state.masquerade_all, ips, large)


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One service port's contribution to the payload; each text ends with a newline or is ''."""

    chains: tuple[str, ...]  # nat chains the service port owns
    nat_chain_rules: str  # rules in those chains
    nat_services: str  # rules in nat LBD-SERVICES
    nat_nodeports: str  # rules in nat LBD-NODEPORTS
    filter_services: str
    filter_external: str
    filter_firewall: str
    filter_nodeports: str


def _render_service_port(sp: ServicePort, ctx: _Context) -> _Rendered:
    name = safe_text(str(sp.name))
    proto = sp.protocol.value.lower()
    pm = f"-p {proto} -m {proto}"
    sp_key = sp.key
    suffix = chain_hash(sp_key)
    svc, svl, ext, fw = (SVC_PREFIX + suffix, SVL_PREFIX + suffix, EXT_PREFIX + suffix,
                         FW_PREFIX + suffix)  # fmt: skip
    cluster_ip = _addr(sp.cluster_ip)
    external_ips = [a for a in sp.external_ips if _addr(a)]
    lb_ips = [a for a in sp.load_balancer_ips if _addr(a)]
    source_ranges = [a for a in sp.load_balancer_source_ranges if _addr(a)]
    cluster_eps = [e for e in sp.cluster_endpoints if _addr(e.ip)]
    local_eps = [e for e in sp.local_endpoints if _addr(e.ip)]
    externally_accessible = bool(sp.node_port or external_ips or lb_ips)

    # Which endpoint chains exist follows kube-proxy: the cluster chain also serves the
    # short-circuit of in-cluster traffic to external frontends under ETP Local.
    uses_cluster = (not sp.internal_policy_local) or externally_accessible
    uses_local = sp.internal_policy_local or (sp.external_policy_local and externally_accessible)
    use_svc = bool(cluster_eps) and uses_cluster
    use_svl = bool(local_eps) and uses_local
    has_endpoints = bool(cluster_eps) or bool(local_eps)
    internal_chain = svl if sp.internal_policy_local else svc
    has_internal = bool(local_eps if sp.internal_policy_local else cluster_eps)
    external_policy_chain = svl if sp.external_policy_local else svc
    has_external = bool(local_eps if sp.external_policy_local else cluster_eps)
    uses_ext = has_endpoints and externally_accessible
    uses_fw = has_endpoints and bool(lb_ips) and bool(source_ranges)

    if not has_endpoints:
        internal_target, internal_why = _REJECT[ctx.family], "has no endpoints"
        external_target, external_why = internal_target, internal_why
    else:
        internal_target, internal_why = "DROP", "has no local endpoints"
        external_target, external_why = "DROP", "has no local endpoints"

    chains: list[str] = []
    rules: list[str] = []
    nat_services: list[str] = []
    nat_nodeports: list[str] = []
    f_services: list[str] = []
    f_external: list[str] = []
    f_firewall: list[str] = []
    f_nodeports: list[str] = []
    port = sp.port

    # --- frontends: nat captures (when something can serve) or filter REJECT/DROP
    if cluster_ip:
        cip = f'-m comment --comment "{name} cluster IP" -d {cluster_ip} {pm} --dport {port}'
        if has_internal:
            nat_services.append(f"-A {SERVICES} {cip} -j {internal_chain}")
        else:
            f_services.append(
                f'-A {SERVICES} -m comment --comment "{name} cluster IP {internal_why}" '
                f"-d {cluster_ip} {pm} --dport {port} -j {internal_target}"
            )
    for ip in external_ips:
        if has_endpoints:
            nat_services.append(
                f'-A {SERVICES} -m comment --comment "{name} external IP" '
                f"-d {ip} {pm} --dport {port} -j {ext}"
            )
        if not has_external:
            f_external.append(
                f'-A {EXTERNAL_SERVICES} -m comment --comment "{name} external IP {external_why}" '
                f"-d {ip} {pm} --dport {port} -j {external_target}"
            )
    for ip in lb_ips:
        if has_endpoints:
            nat_services.append(
                f'-A {SERVICES} -m comment --comment "{name} loadbalancer IP" '
                f"-d {ip} {pm} --dport {port} -j {fw if uses_fw else ext}"
            )
        if uses_fw:
            f_firewall.append(
                f'-A {PROXY_FIREWALL} -m comment --comment "{name} traffic not accepted by {fw}" '
                f"-d {ip} {pm} --dport {port} -j DROP"
            )
        if not has_external:
            f_external.append(
                f"-A {EXTERNAL_SERVICES} -m comment --comment "
                f'"{name} loadbalancer IP {external_why}" '
                f"-d {ip} {pm} --dport {port} -j {external_target}"
            )
    if sp.node_port:
        if has_endpoints:
            nat_nodeports.append(
                f'-A {NODEPORTS} -m comment --comment "{name}" {pm} --dport {sp.node_port} -j {ext}'
            )
        if not has_external:
            f_external.append(
                f'-A {EXTERNAL_SERVICES} -m comment --comment "{name} nodeport {external_why}" '
                f"-m addrtype --dst-type LOCAL {pm} --dport {sp.node_port} -j {external_target}"
            )
    if sp.health_check_node_port:
        f_nodeports.append(
            f'-A {NODEPORTS} -m comment --comment "{name} health check node port" '
            f"-p tcp -m tcp --dport {sp.health_check_node_port} -j ACCEPT"
        )

    # --- the service port's own nat chains
    if use_svc:
        chains.append(svc)
    if use_svl:
        chains.append(svl)
    if uses_ext:
        chains.append(ext)
    if uses_fw:
        chains.append(fw)

    if has_internal and cluster_ip:
        # Off-cluster clients reaching a cluster IP (e.g. via a static route to the service
        # range) may be answered from another node: masquerade them (kube-proxy does).
        masq = None
        if ctx.masquerade_all:
            masq = f"-j {MARK_MASQ}"
        elif len(ctx.cluster_cidrs) == 1:
            masq = f"! -s {ctx.cluster_cidrs[0]} -j {MARK_MASQ}"
        elif ctx.cluster_cidrs:
            masq = f"-j {MASQ_OFF_CLUSTER}"
        if masq:
            # (In a large cluster without the comment: LBD-SERVICES' rule carries it.)
            match = f"-d {cluster_ip} {pm} --dport {port}" if ctx.large_cluster else cip
            rules.append(f"-A {internal_chain} {match} {masq}")

    if uses_ext:
        if not sp.external_policy_local:
            # Cluster policy may forward to another node: SNAT so replies come back here.
            rules.append(
                f"-A {ext} -m comment --comment "
                f'"masquerade traffic for {name} external destinations" -j {MARK_MASQ}'
            )
        else:
            if use_svc:
                # Pods reaching an external frontend are cluster traffic, not subject to
                # externalTrafficPolicy (as if they went out to the LB and came back).
                for cidr in ctx.cluster_cidrs:
                    rules.append(
                        f"-A {ext} -m comment --comment "
                        f'"pod traffic for {name} external destinations" -s {cidr} -j {svc}'
                    )
            # The node itself picks the frontend (a local address) as source: masquerade.
            rules.append(
                f"-A {ext} -m comment --comment "
                f'"masquerade LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {MARK_MASQ}"
            )
            if use_svc:
                rules.append(
                    f"-A {ext} -m comment --comment "
                    f'"route LOCAL traffic for {name} external destinations" '
                    f"-m addrtype --src-type LOCAL -j {svc}"
                )
        if has_external:
            rules.append(f"-A {ext} -j {external_policy_chain}")

    if uses_fw:
        fw_comment = f'-m comment --comment "{name} loadbalancer IP"'
        for cidr in source_ranges:
            rules.append(f"-A {fw} {fw_comment} -s {cidr} -j {ext}")
        if _contains_any(source_ranges, ctx.node_ips):
            # A node reaching a VIP-style LB IP assigned locally loops back with the LB IP
            # as source: allow it when the node itself is inside the allowed ranges.
            for ip in lb_ips:
                rules.append(f"-A {fw} {fw_comment} -s {ip} -j {ext}")
        rules.append(
            f"-A {fw} -m comment --comment "
            f'"other traffic to {name} will be dropped by {PROXY_FIREWALL}"'
        )

    # Endpoint rules. kube-proxy gives every endpoint its own SEP chain (hairpin
    # masquerade, then DNAT). lbd does that only where it is needed, and DNATs straight
    # from the SVC chain otherwise, which at 10k services x 10 endpoints cuts the nat
    # table from ~320k rules in 111k chains to ~125k rules in 11k chains, and the full
    # sync (a legacy restore rewrites the whole table) from 14.3 s to ~1.5 s:
    # - hairpin masquerade is only needed for this node's endpoints: a client pod on this
    #   node can only be the endpoint it is sent to when that endpoint is local;
    # - session affinity needs a per-endpoint `recent` list that the SEP chain sets.
    affinity = sp.session_affinity_timeout
    large = ctx.large_cluster
    # `-p` alone lets DNAT rewrite the port; kube-proxy's extra `-m tcp` match (no options)
    # would add 100k matches to a 10k-service table for nothing (8-15% of a restore).
    dnat = f"-p {proto} -j DNAT --to-destination "
    # One SEP chain per distinct endpoint address, shared by the SVC and SVL chains;
    # an empty chain name means "DNAT directly".
    endpoints: dict[tuple[str, int], tuple[str, str, str]] = {}  # -> (ip, SEP chain, ip:port)
    for eps, used in ((cluster_eps, use_svc), (local_eps, use_svl)):
        if used:
            for ep in eps:
                key = (ep.ip, ep.port)
                if key not in endpoints:
                    dest = f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}"
                    sep = endpoint_chain(sp, ep, sp_key) if affinity or ep.is_local else ""
                    endpoints[key] = (ep.ip, sep, dest)

    for chain, eps, used in ((svc, cluster_eps, use_svc), (svl, local_eps, use_svl)):
        if not used:
            continue
        picked = [endpoints[(ep.ip, ep.port)] for ep in eps]
        if affinity:
            for _, sep, dest in picked:
                rules.append(
                    f'-A {chain} -m comment --comment "{name} -> {dest}" '
                    f"-m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}"
                )
        n = len(picked)
        for i, (_, sep, dest) in enumerate(picked):
            # In a large cluster the per-endpoint comments are left out, as kube-proxy
            # does: they are most of the table's bytes and every restore copies them.
            comment = "" if large else f'-m comment --comment "{name} -> {dest}" '
            pick = (
                f"-m statistic --mode random --probability {probability(n - i)} "
                if i < n - 1
                else ""
            )
            target = f"-j {sep}" if sep else f"{dnat}{dest}"
            rules.append(f"-A {chain} {comment}{pick}{target}")

    recent = ""
    sep_comment = "" if large else f'-m comment --comment "{name}" '
    for ip, sep, dest in endpoints.values():
        if not sep:
            continue
        chains.append(sep)
        if affinity:
            recent = f"-m recent --name {sep} --set "
        # Hairpin: a pod reaching itself through the service must be SNATed, or the
        # reply would bypass conntrack's reverse DNAT.
        rules.append(f"-A {sep} {sep_comment}-s {ip} -j {MARK_MASQ}")
        rules.append(f"-A {sep} {sep_comment}{recent}{dnat}{dest}")

    return _Rendered(
        chains=tuple(chains),
        nat_chain_rules=_lines(rules),
        nat_services=_lines(nat_services),
        nat_nodeports=_lines(nat_nodeports),
        filter_services=_lines(f_services),
        filter_external=_lines(f_external),
        filter_firewall=_lines(f_firewall),
        filter_nodeports=_lines(f_nodeports),
    )


def _lines(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def _contains_any(cidrs: Iterable[str], ips: Iterable[str]) -> bool:
    ips = list(ips)
    if not ips:
        return False
    try:
        nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        addrs = [ipaddress.ip_address(i.split("/")[0]) for i in ips]
    except ValueError:
        return False
    return any(a in n for n in nets for a in addrs if a.version == n.version)


def _nodeport_rules(state: ProxyState, family: IPFamily) -> list[str]:
    """The final rules of LBD-SERVICES, which hand local destinations to LBD-NODEPORTS
    (match and target; the caller adds chain and comment)."""
    loopback = ipaddress.ip_network(_LOOPBACK[family])
    given = state.cidrs(family, state.nodeport_addresses)
    everywhere = [f"-m addrtype --dst-type LOCAL ! -d {loopback} -j {NODEPORTS}"]
    nets = []
    for c in given:
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError:
            continue
        if net.prefixlen == 0:
            return everywhere  # a zero CIDR selects every address, like no selection
        nets.append(net)
    if not given:
        return everywhere
    out = []
    # Loopback never serves node ports; a CIDR reaching into it gets a guard first
    # (these are the chain's last rules, so RETURN just means "not a node port").
    if any(n.overlaps(loopback) and not n.subnet_of(loopback) for n in nets):
        out.append(f"-d {loopback} -j RETURN")
    for net in nets:
        if not net.subnet_of(loopback):
            out.append(f"-d {net} -m addrtype --dst-type LOCAL -j {NODEPORTS}")
    return out


def _sort_key(key: tuple[ServicePortName, IPFamily]) -> tuple[str, str, str, str]:
    # ServicePortName's generated ordering builds tuples per comparison (slow at 10k ports);
    # Protocol is a str, so these tuples compare in C.
    n = key[0]
    return (n.namespace, n.name, n.port, n.protocol)


@dataclass(frozen=True, slots=True)
class Payload:
    """One family's iptables-restore input and what it does to lbd's nat chains."""

    text: str
    full: bool
    changed_service_ports: int  # service ports whose chains this payload (re)writes
    chains: frozenset[str]  # lbd's per-service nat chains after it is applied
    deleted_chains: frozenset[str]


_Key = tuple[ServicePortName, IPFamily]


class Renderer:
    """Renders payloads, memoising each service port's rules between calls.

    The memo is keyed by the state's own mapping key and validated by identity, then
    equality, of the (frozen) ServicePort: an unchanged service port costs a dictionary
    lookup per render, and nothing at all when the model hands over the same object again.
    """

    def __init__(self) -> None:
        self._memo: dict[_Key, tuple[ServicePort, _Context, _Rendered]] = {}
        self._contexts: dict[IPFamily, _Context] = {}

    def _context(self, state: ProxyState, family: IPFamily) -> _Context:
        # One object per distinct context, so memo hits compare it by identity.
        known = self._contexts.get(family)
        ctx = _Context.of(state, family, known is not None and known.large_cluster)
        if known == ctx:
            return known
        self._contexts[family] = ctx
        return ctx

    def _get(self, key: _Key, sp: ServicePort, ctx: _Context) -> _Rendered:
        hit = self._memo.get(key)
        if hit is not None and hit[1] is ctx and (hit[0] is sp or hit[0] == sp):
            if hit[0] is not sp:
                # Re-point at the newest object so the next check is an identity check.
                self._memo[key] = (sp, ctx, hit[2])
            return hit[2]
        rendered = _render_service_port(sp, ctx)
        self._memo[key] = (sp, ctx, rendered)
        return rendered

    @staticmethod
    def _ports(state: ProxyState, family: IPFamily) -> list[tuple[_Key, ServicePort]]:
        ports = state.service_ports
        return [(k, ports[k]) for k in sorted(ports, key=_sort_key) if k[1] == family]

    def full(
        self,
        state: ProxyState,
        family: IPFamily,
        *,
        existing_chains: Iterable[str] = (),
        jumps: Iterable[Jump] | None = None,
    ) -> Payload:
        """Everything for `family`. `existing_chains`: lbd nat chains the kernel holds now
        (stale ones are deleted). `jumps`: built-in chain jumps to insert (None: all)."""
        ctx = self._context(state, family)
        ports = self._ports(state, family)
        keep = {k for k, _ in ports}
        for k in [k for k in self._memo if k[1] == family and k not in keep]:
            del self._memo[k]
        jumps = list(JUMPS) if jumps is None else list(jumps)
        rendered = [self._get(k, sp, ctx) for k, sp in ports]
        chains = frozenset().union(*(r.chains for r in rendered))
        if _uses_masq_helper(ctx):
            chains |= {MASQ_OFF_CLUSTER}
        stale = {c for c in existing_chains if _is_owned_service_chain(c) and c not in chains}
        text = self._assemble(state, family, ctx, rendered, None, stale, jumps, True)
        return Payload(text, True, len(ports), chains, frozenset(stale))

    def partial(
        self, prev: ProxyState, state: ProxyState, family: IPFamily, prev_chains: frozenset[str]
    ) -> Payload | None:
        """Only what changed since `prev` (which the kernel is known to hold).

        None when node-wide settings changed and every service port must be rewritten.
        """
        # What `prev` was rendered with (the large-cluster mode depends on history).
        prev_ctx = self._contexts.get(family)
        if prev_ctx is None:
            return None
        ctx = self._context(state, family)
        if ctx != prev_ctx or _nodeport_rules(prev, family) != _nodeport_rules(state, family):
            return None
        ports = self._ports(state, family)
        old = prev.service_ports
        rendered: list[_Rendered] = []
        rewrite: dict[_Key, _Rendered] = {}
        gone_chains: set[str] = set()
        kept = 0
        memo = self._memo
        for k, sp in ports:
            before = old.get(k)
            same = before is not None and (before is sp or before == sp)
            hit = memo.get(k)
            if same and hit is not None and hit[1] is ctx and (hit[0] is sp or hit[0] is before):
                # Equal to what the kernel holds, and already rendered: no second comparison.
                if hit[0] is not sp:
                    memo[k] = (sp, ctx, hit[2])
                r = hit[2]
            else:
                r = self._get(k, sp, ctx)
            rendered.append(r)
            if before is not None:
                kept += 1
                if same:
                    continue
                gone_chains.update(_render_service_port(before, prev_ctx).chains)
            rewrite[k] = r
        deleted_ports = 0
        if kept != sum(1 for k in old if k[1] == family):
            now = state.service_ports
            for k, before in old.items():
                if k[1] == family and k not in now:
                    deleted_ports += 1
                    gone_chains.update(_render_service_port(before, prev_ctx).chains)
                    self._memo.pop(k, None)
        created = frozenset().union(*(r.chains for r in rewrite.values()))
        stale = gone_chains - created
        text = self._assemble(state, family, ctx, rendered, rewrite, stale, (), False)
        chains = (prev_chains - stale) | created
        return Payload(text, False, len(rewrite) + deleted_ports, chains, frozenset(stale))

    def _assemble(
        self,
        state: ProxyState,
        family: IPFamily,
        ctx: _Context,
        rendered: list[_Rendered],
        rewrite: Mapping[_Key, _Rendered] | None,
        delete: Iterable[str],
        jumps: Iterable[Jump],
        canary: bool,
    ) -> str:
        """Build the payload text from every service port's rendering.

        `rewrite` None: every service port's chains are declared and filled (full sync);
        else only those in `rewrite` (by key). `delete`: chains to flush and remove.
        """
        parts: list[str] = []
        canary_decl = f":{CANARY} - [0:0]\n" if canary else ""
        canary_rule = f"{CANARY_RULE}\n" if canary else ""
        if canary:
            parts.append(f"*mangle\n{canary_decl}{canary_rule}COMMIT\n")

        parts.append("*nat\n")
        base = list(NAT_BASE_CHAINS)
        if _uses_masq_helper(ctx):
            base.append(MASQ_OFF_CLUSTER)
        for chain in base:
            parts.append(f":{chain} - [0:0]\n")
        parts.append(canary_decl)
        if rewrite is None:
            for r in rendered:
                for chain in r.chains:
                    parts.append(f":{chain} - [0:0]\n")
        else:
            for r in rewrite.values():
                for chain in r.chains:
                    parts.append(f":{chain} - [0:0]\n")
        delete = sorted(delete)
        for chain in delete:
            parts.append(f":{chain} - [0:0]\n")
        _jump_lines(parts, jumps, "nat")
        parts.append(canary_rule)
        if not canary:
            # A partial sync trusts the nat table to hold what lbd last wrote. Instead of
            # reading the table first (legacy copies all of it: 0.4 s at 10k services),
            # the payload proves it: removing and re-adding the canary rule fails, and
            # with it the whole restore, when someone flushed or deleted lbd's chains.
            # nat is written first so that such a failure commits nothing.
            parts.append(f"-D {CANARY_RULE[3:]}\n{CANARY_RULE}\n")
        parts.append(
            f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n"
            # Clear the mark so a packet re-entering the stack is not masqueraded twice.
            f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}\n"
            f'-A {POSTROUTING} -m comment --comment "lbd service traffic requiring SNAT" '
            f"-j MASQUERADE --random-fully\n"
            f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}\n"
        )
        if MASQ_OFF_CLUSTER in base:
            for cidr in ctx.cluster_cidrs:
                parts.append(f"-A {MASQ_OFF_CLUSTER} -s {cidr} -j RETURN\n")
            parts.append(f"-A {MASQ_OFF_CLUSTER} -j {MARK_MASQ}\n")
        parts.extend(r.nat_services for r in rendered)
        for rule in _nodeport_rules(state, family):
            parts.append(f"-A {SERVICES} -m comment --comment {_NODEPORTS_COMMENT} {rule}\n")
        parts.extend(r.nat_nodeports for r in rendered)
        if rewrite is None:
            parts.extend(r.nat_chain_rules for r in rendered)
        else:
            parts.extend(r.nat_chain_rules for r in rewrite.values())
        for chain in delete:
            parts.append(f"-X {chain}\n")
        parts.append("COMMIT\n")

        # filter: small, always rewritten whole.
        parts.append("*filter\n")
        for chain in FILTER_BASE_CHAINS:
            parts.append(f":{chain} - [0:0]\n")
        parts.append(canary_decl)
        _jump_lines(parts, jumps, "filter")
        parts.append(canary_rule)
        parts.append(
            f"-A {FORWARD} -m conntrack --ctstate INVALID -j DROP\n"
            f'-A {FORWARD} -m comment --comment "lbd forwarding rules" '
            f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n"
            f'-A {FORWARD} -m comment --comment "lbd forwarding conntrack rule" '
            f"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        )
        parts.extend(r.filter_services for r in rendered)
        parts.extend(r.filter_external for r in rendered)
        parts.extend(r.filter_firewall for r in rendered)
        parts.extend(r.filter_nodeports for r in rendered)
        parts.append("COMMIT\n")
        return "".join(parts)


def _uses_masq_helper(ctx: _Context) -> bool:
    return len(ctx.cluster_cidrs) > 1 and not ctx.masquerade_all


def _is_owned_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES) or chain == MASQ_OFF_CLUSTER


def _jump_lines(parts: list[str], jumps: Iterable[Jump], table: str) -> None:
    # Inserted at the top (kube-proxy prepends too), in reverse so they end up in JUMPS order.
    for jump in reversed([j for j in jumps if j.table == table]):
        parts.append(f"-I {jump.chain} 1 {jump.spec()}\n")


_default = Renderer()


def render_full(
    state: ProxyState,
    family: IPFamily,
    *,
    existing_chains: Iterable[str] = (),
    jumps: Iterable[Jump] | None = None,
) -> str:
    """The iptables-restore payload (for `iptables-restore --noflush`) implementing `state`.

    Includes the built-in chain jumps (`jumps`; default all of JUMPS) and deletes the
    per-service chains in `existing_chains` that the new state no longer needs.
    """
    return _default.full(state, family, existing_chains=existing_chains, jumps=jumps).text


def render_partial(
    prev_state: ProxyState | None, state: ProxyState, family: IPFamily
) -> str | None:
    """A payload that turns a kernel holding `prev_state` into one holding `state`.

    Rewrites LBD-SERVICES, LBD-NODEPORTS and lbd's filter chains, flushes and refills the
    chains of service ports that changed, deletes those of removed service ports and
    endpoints, and does not mention any other chain. None: a full render is required.
    """
    if prev_state is None:
        return None
    # A renderer of its own, that rendered `prev_state` last: partial renders are relative
    # to what the renderer wrote before.
    renderer = Renderer()
    renderer.full(prev_state, family)
    payload = renderer.partial(prev_state, state, family, frozenset())
    return None if payload is None else payload.text
