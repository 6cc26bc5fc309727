"""Endpoint selection: which endpoints serve cluster traffic and node-local traffic.

This is the one place where endpoint eligibility is decided (kube-proxy's
pkg/proxy/topology.go rules); every backend consumes the result unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lbd.model.state import Endpoint


def merge_endpoints(copies: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """De-duplicate endpoints listed in several slices: one per ip:port, ready wins.

    The choice between copies does not depend on the order of the slices (ties are
    broken on the copies' own fields), so incremental and full builds agree.
    """
    best: dict[tuple[str, int], Endpoint] = {}
    for ep in copies:
        key = (ep.ip, ep.port)
        have = best.get(key)
        if have is None or _rank(ep) > _rank(have):
            best[key] = ep
    return tuple(best[key] for key in sorted(best))


def _rank(ep: Endpoint) -> tuple[bool, bool, bool, str, tuple[str, ...]]:
    return (ep.ready, ep.serving, not ep.terminating, ep.node_name, tuple(sorted(ep.zone_hints)))


def _ready_else_terminating(
    endpoints: tuple[Endpoint, ...], keep: Callable[[Endpoint], bool]
) -> tuple[Endpoint, ...]:
    """Ready endpoints; when none is ready, the serving+terminating ones (graceful drain)."""
    ready = tuple(ep for ep in endpoints if ep.ready and keep(ep))
    if ready:
        return ready
    return tuple(ep for ep in endpoints if ep.serving and ep.terminating and keep(ep))


def can_use_topology(endpoints: tuple[Endpoint, ...], prefer_close: bool, zone: str) -> bool:
    """Hints are honoured only when asked for, complete, and useful for this zone."""
    if not prefer_close or not zone:
        return False
    has_zone_endpoint = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.zone_hints:
            # One ready endpoint without hints means the hints are incomplete: ignore all.
            return False
        if zone in ep.zone_hints:
            has_zone_endpoint = True
    return has_zone_endpoint


def categorize(
    endpoints: tuple[Endpoint, ...], *, prefer_close: bool, zone: str
) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]:
    """(cluster endpoints, node-local endpoints) for one service port."""
    if not prefer_close and all(ep.ready for ep in endpoints):
        # The common case, kept cheap: every endpoint is ready and no topology applies.
        return endpoints, tuple(ep for ep in endpoints if ep.is_local)
    if can_use_topology(endpoints, prefer_close, zone):
        cluster = _ready_else_terminating(endpoints, lambda ep: zone in ep.zone_hints)
    else:
        cluster = _ready_else_terminating(endpoints, lambda ep: True)
    local = _ready_else_terminating(endpoints, lambda ep: ep.is_local)
    return cluster, local
