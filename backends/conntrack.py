"""UDP conntrack hygiene, shared by every proxy mode.

UDP has no connection teardown: a conntrack entry that DNATs a client to an endpoint that
is gone (or that was created while the service had no endpoints) keeps matching the
client's packets until it times out, and a client that keeps sending never lets it time
out. kube-proxy deletes such entries after each sync; so does lbd.

`stale_udp_flows` decides what is stale from two ProxyStates (pure); `delete_stale_udp_flows`
deletes the matching entries through ctnetlink (pyroute2), from the current network
namespace or, for tests and benchmarks, from a named one.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from lbd.model.state import IPFamily, Protocol, ProxyState, ServicePort

log = structlog.get_logger("lbd.backends.conntrack")

_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}


@dataclass(frozen=True, slots=True)
class StaleUDPFlows:
    """The UDP conntrack entries of one service port that would send clients nowhere.

    An entry is stale when its original destination is one of `frontends` and its reply
    source (where it was DNATed to) is not one of `keep`. That covers both cases kube-proxy
    cleans: entries DNATed to endpoints that went away, and entries to a frontend created
    while it had no endpoints (never DNATed: their reply source is the frontend itself).
    """

    service: str  # "namespace/name:port", for logs
    family: IPFamily
    frontends: frozenset[tuple[str, int]]  # (ip, port); ip "" = any address (node port)
    keep: frozenset[tuple[str, int]]  # endpoints the frontends may still be DNATed to
    reason: str  # "endpoints removed" | "first endpoints" | "service port deleted" | "resync"

    def matches(self, orig_dst: str, orig_dport: int, reply_src: str, reply_sport: int) -> bool:
        if (orig_dst, orig_dport) not in self.frontends and ("", orig_dport) not in self.frontends:
            return False
        return (reply_src, reply_sport) not in self.keep


def _norm(ip: str) -> str:
    # The kernel reports canonical text; the model may hold any valid spelling.
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _frontends(sp: ServicePort) -> set[tuple[str, int]]:
    out = {(_norm(ip), sp.port) for ip in (sp.cluster_ip, *sp.external_ips, *sp.load_balancer_ips)}
    if sp.node_port:
        out.add(("", sp.node_port))
    return out


def _reachable(sp: ServicePort) -> set[tuple[str, int]]:
    """Endpoints some frontend can DNAT to (the cluster ones serve ETP Local short-circuits)."""
    eps = set(sp.used_endpoints)
    if sp.has_external_frontends:
        eps.update(sp.cluster_endpoints)
    return {(_norm(e.ip), e.port) for e in eps}


def stale_udp_flows(prev: ProxyState | None, new: ProxyState) -> list[StaleUDPFlows]:
    """What to delete after the datapath moved from `prev` to `new`.

    `prev` None (first sync since start): every UDP service port with endpoints is checked,
    since entries may predate lbd; entries already DNATed to a current endpoint are kept.
    """
    old = prev.service_ports if prev is not None else {}
    out: list[StaleUDPFlows] = []
    listed = new.changes_since(prev.revision) if prev is not None else None
    if listed is not None:
        # Only what the model builder rebuilt can have changed: no walk over every port.
        ports = [(k, new.service_ports[k]) for k in listed if k in new.service_ports]
        removed = [k for k in listed if k not in new.service_ports]
    else:
        ports = list(new.service_ports.items())
        removed = [k for k in old if k not in new.service_ports]
    for key, sp in ports:
        if sp.protocol != Protocol.UDP:
            continue
        before = old.get(key)
        if before is not None and (before is sp or before == sp):
            continue
        now = _reachable(sp)
        if prev is None:
            if not now:
                continue
            reason = "resync"
        else:
            was = _reachable(before) if before is not None else set()
            if was - now:
                reason = "endpoints removed"
            elif now and not was:
                reason = "first endpoints"
            else:
                continue
        fronts = _frontends(sp) | (_frontends(before) if before is not None else set())
        out.append(
            StaleUDPFlows(str(sp.name), sp.family, frozenset(fronts), frozenset(now), reason)
        )
    for key in removed:
        before = old.get(key)
        if before is not None and before.protocol == Protocol.UDP:
            out.append(
                StaleUDPFlows(
                    str(before.name),
                    before.family,
                    frozenset(_frontends(before)),
                    frozenset(),
                    "service port deleted",
                )
            )
    return out


def delete_stale_udp_flows(flows: Iterable[StaleUDPFlows], *, netns: str | None = None) -> int:
    """Delete the conntrack entries `flows` describe; returns how many were deleted.

    One dump of the UDP entries per family, matched in Python, then one delete request per
    stale entry. `netns`: a named network namespace (/run/netns/NAME) instead of ours.
    """
    by_family: dict[IPFamily, list[StaleUDPFlows]] = {}
    for f in flows:
        by_family.setdefault(f.family, []).append(f)
    deleted = 0
    for family, group in by_family.items():
        deleted += _delete_family(family, group, netns)
    return deleted


def _delete_family(family: IPFamily, flows: list[StaleUDPFlows], netns: str | None) -> int:
    by_dst: dict[tuple[str, int], list[StaleUDPFlows]] = {}
    by_port: dict[int, list[StaleUDPFlows]] = {}
    for f in flows:
        for ip, port in f.frontends:
            if ip:
                by_dst.setdefault((ip, port), []).append(f)
            else:
                by_port.setdefault(port, []).append(f)
    # pyroute2 speaks netlink through asyncio, and its synchronous wrappers ask the global
    # policy for a fresh loop per call: under the daemon's uvloop that loop cannot carry an
    # AF_NETLINK socket. A private selector loop works under any policy and in any thread.
    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(_delete(family, by_dst, by_port, netns))
    finally:
        loop.close()


async def _delete(
    family: IPFamily,
    by_dst: dict[tuple[str, int], list[StaleUDPFlows]],
    by_port: dict[int, list[StaleUDPFlows]],
    netns: str | None,
) -> int:
    # Imported here: only needed once something is stale.
    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    af = _AF[family]
    kwargs = {"netns": netns} if netns else {}
    async with AsyncConntrack(nfgen_family=af, **kwargs) as ct:
        doomed = []
        only_udp = NFCTAttrTuple(family=af, proto=socket.IPPROTO_UDP)
        async for entry in await ct.dump_entries(tuple_orig=only_udp):
            orig, reply = entry.tuple_orig, entry.tuple_reply
            if orig.proto != socket.IPPROTO_UDP:
                continue
            candidates = by_dst.get((orig.daddr, orig.dport), []) + by_port.get(orig.dport, [])
            for f in candidates:
                if f.matches(orig.daddr, orig.dport, reply.saddr, reply.sport):
                    doomed.append((orig, f))
                    break
        deleted = 0
        for orig, f in doomed:
            try:
                await ct.entry("del", tuple_orig=orig)
            except NetlinkError as e:
                if e.code != errno.ENOENT:  # gone meanwhile: fine
                    raise
                continue
            deleted += 1
            log.debug(
                "conntrack.stale_udp_entry_deleted",
                service=f.service,
                reason=f.reason,
                orig=f"{orig.saddr}:{orig.sport}->{orig.daddr}:{orig.dport}",
            )
        return deleted
