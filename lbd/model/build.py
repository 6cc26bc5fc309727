"""build_state: from the stores' raw objects to one frozen ProxyState (pure).

Parsing results are cached per (kind, namespace/name, resourceVersion), so rebuilding the
state after one change re-parses one object, not ten thousand. Rejected objects are
reported back (with a reason) for logging and metrics; they never affect other services.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lbd.model.endpoints import categorize, merge_endpoints
from lbd.model.parse import (
    ZONE_LABEL,
    InvalidObject,
    ParsedEndpointSlice,
    ParsedService,
    family_of,
    object_ref,
    parse_endpoint_slice,
    parse_ip,
    parse_service,
)
from lbd.model.state import Endpoint, IPFamily, ProxyState, ServicePort, ServicePortName


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: str  # Service | EndpointSlice | Node
    ref: str  # namespace/name, log-safe
    reason: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    ips: tuple[str, ...] = ()
    zone: str = ""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    node_name: str
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()


@dataclass(slots=True)
class ParseCache:
    """Parsed objects by (kind, key, resourceVersion); rebuilt each build to drop the dead."""

    entries: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    # Service ports by (service, its slices, node), compared by identity: the parsed
    # objects are cached per resourceVersion, so an unchanged service yields the very
    # same ServicePort objects. That keeps a rebuild after one change cheap, and lets
    # backends skip unchanged ports with an identity check.
    ports: dict[tuple[str, str], tuple[Any, tuple[Any, ...], NodeInfo, list[Any]]] = field(
        default_factory=dict
    )

    def parse(self, kind: str, obj: dict[str, Any], parser: Any, fresh: dict) -> Any:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(rv, str) or not rv:
            return _parse_one(kind, obj, parser)  # uncacheable
        key = (kind, f"{meta.get('namespace')}/{meta.get('name')}", rv)
        hit = self.entries.get(key, _MISS)
        if hit is _MISS:
            hit = _parse_one(kind, obj, parser)
        fresh[key] = hit
        return hit


_MISS = object()


def _parse_one(kind: str, obj: dict[str, Any], parser: Any) -> Any:
    try:
        return parser(obj)
    except InvalidObject as err:
        return Rejection(kind, object_ref(obj), str(err))
    except (TypeError, AttributeError, KeyError, ValueError) as err:
        # Shapes the validators did not foresee: still a rejection, never a crash.
        return Rejection(kind, object_ref(obj), f"malformed: {type(err).__name__}")


def parse_node(obj: dict[str, Any] | None, name: str) -> NodeInfo:
    if not isinstance(obj, dict):
        return NodeInfo(name)
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    zone = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
    ips: list[str] = []
    status = obj.get("status") or {}
    for addr in status.get("addresses") or () if isinstance(status, dict) else ():
        if isinstance(addr, dict) and addr.get("type") in ("InternalIP", "ExternalIP"):
            try:
                ips.append(parse_ip(addr.get("address"), "status.addresses[].address"))
            except InvalidObject:
                continue
    return NodeInfo(name, tuple(dict.fromkeys(ips)), zone if isinstance(zone, str) else "")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: a 10k-service build allocates ~10^6 acyclic objects, and the
    collections they trigger (each scanning everything alive) doubled the build's CPU.
    Refcounting still frees all garbage; nothing here makes cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_state(
    services: Iterable[dict[str, Any]],
    slices: Iterable[dict[str, Any]],
    node: NodeInfo,
    config: ModelConfig,
    cache: ParseCache | None = None,
) -> tuple[ProxyState, list[Rejection]]:
    with _gc_paused():
        return _build_state(services, slices, node, config, cache)


def _build_state(
    services: Iterable[dict[str, Any]],
    slices: Iterable[dict[str, Any]],
    node: NodeInfo,
    config: ModelConfig,
    cache: ParseCache | None,
) -> tuple[ProxyState, list[Rejection]]:
    cache = cache if cache is not None else ParseCache()
    fresh: dict[tuple[str, str, str], Any] = {}
    rejected: list[Rejection] = []

    by_service: dict[tuple[str, str], list[ParsedEndpointSlice]] = defaultdict(list)
    for obj in slices:
        parsed = cache.parse("EndpointSlice", obj, parse_endpoint_slice, fresh)
        if isinstance(parsed, Rejection):
            rejected.append(parsed)
        elif parsed is not None:
            by_service[(parsed.namespace, parsed.service_name)].append(parsed)

    ports: dict[tuple[ServicePortName, IPFamily], ServicePort] = {}
    fresh_ports: dict[tuple[str, str], Any] = {}
    for obj in services:
        parsed = cache.parse("Service", obj, parse_service, fresh)
        if isinstance(parsed, Rejection):
            rejected.append(parsed)
        elif parsed is not None:
            key = (parsed.namespace, parsed.name)
            its_slices = tuple(by_service.get(key, ()))
            hit = cache.ports.get(key)
            if (
                hit is not None
                and hit[0] is parsed
                and hit[2] == node
                and len(hit[1]) == len(its_slices)
                and all(a is b for a, b in zip(hit[1], its_slices, strict=True))
            ):
                built = hit[3]
            else:
                built = service_ports(parsed, its_slices, node)
            fresh_ports[key] = (parsed, its_slices, node, built)
            for sp in built:
                ports[(sp.name, sp.family)] = sp
    cache.entries = fresh
    cache.ports = fresh_ports
    state = ProxyState(
        node_name=config.node_name,
        node_ips=node.ips,
        zone=node.zone,
        cluster_cidrs=config.cluster_cidrs,
        masquerade_all=config.masquerade_all,
        nodeport_addresses=config.nodeport_addresses,
        service_ports=ports,
    )
    return state, rejected


_NO_ZONES: frozenset[str] = frozenset()


def service_ports(
    svc: ParsedService, slices: Iterable[ParsedEndpointSlice], node: NodeInfo
) -> list[ServicePort]:
    """One ServicePort per (port, family) of a parsed service, with endpoints chosen."""
    out: list[ServicePort] = []
    slices = tuple(slices)
    for cluster_ip in svc.cluster_ips:
        family = family_of(cluster_ip)
        # Frontends of another family than a cluster IP cannot be served by this
        # family's datapath; kube-proxy's per-family proxiers drop them the same way.
        external_ips = tuple(ip for ip in svc.external_ips if family_of(ip) == family)
        lb_ips = tuple(ip for ip in svc.load_balancer_ips if family_of(ip) == family)
        ranges = tuple(c for c in svc.load_balancer_source_ranges if family_of(c) == family)
        for port in svc.ports:
            copies: list[Endpoint] = []
            for sl in slices:
                if sl.family != family:
                    continue
                target = next(
                    (
                        p.port
                        for p in sl.ports
                        if p.name == port.name and p.protocol == port.protocol
                    ),
                    None,
                )
                if target is None:
                    continue
                copies.extend(
                    Endpoint(
                        ep.ip,
                        target,
                        ep.node_name,
                        ep.ready,
                        ep.serving,
                        ep.terminating,
                        ep.zone_hints or _NO_ZONES,
                        bool(ep.node_name) and ep.node_name == node.name,
                    )
                    for ep in sl.endpoints
                )
            endpoints = merge_endpoints(copies)
            cluster, local = categorize(endpoints, prefer_close=svc.prefer_close, zone=node.zone)
            out.append(
                ServicePort(
                    name=ServicePortName(svc.namespace, svc.name, port.name, port.protocol),
                    family=family,
                    cluster_ip=cluster_ip,
                    port=port.port,
                    protocol=port.protocol,
                    node_port=port.node_port,
                    external_ips=external_ips,
                    load_balancer_ips=lb_ips,
                    load_balancer_source_ranges=ranges,
                    session_affinity_timeout=svc.session_affinity_timeout,
                    external_policy_local=svc.external_policy_local,
                    internal_policy_local=svc.internal_policy_local,
                    health_check_node_port=svc.health_check_node_port,
                    cluster_endpoints=cluster,
                    local_endpoints=local,
                    all_endpoints=endpoints,
                )
            )
    return out
