"""Read lbd's IPVS frontends back from a KernelView (pure), for `lbd status`.

IPVS virtual servers carry no names, so the service behind each one comes from the ipset
entry lbd wrote for the same frontend (its comment); node ports come from the node-port
bitmap sets. Endpoints are the real servers that take new connections (weight > 0):
draining ones are not reported.
"""

from __future__ import annotations

from backends.base import FrontendStatus
from backends.ipvs.plan import (
    NODE_PORT_SET,
    PROTO_NAME,
    KernelView,
    Member,
    SetBase,
    VSKey,
    set_name,
)

_KINDS = (
    (SetBase.CLUSTER_IP, "ClusterIP"),
    (SetBase.LOAD_BALANCER, "LoadBalancer"),
    (SetBase.EXTERNAL_IP, "ExternalIP"),
)


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _named(view: KernelView, key: VSKey) -> tuple[str, str] | None:
    member = Member(key.addr, key.protocol, key.port)
    for base, kind in _KINDS:
        ext = view.sets.get(set_name(base, key.family), {}).get(member)
        if ext is not None:
            return ext.comment, kind
    proto = PROTO_NAME.get(key.protocol)
    if proto is not None and key.addr in view.node_addresses:
        ext = view.sets.get(set_name(NODE_PORT_SET[proto]), {}).get(Member(port=key.port))
        if ext is not None:
            return ext.comment, "NodePort"
    return None


def frontends(view: KernelView) -> list[FrontendStatus]:
    """Every frontend lbd programmed, with the endpoints its new connections can reach."""
    out = []
    for key, svc in view.services.items():
        if key.fwmark or not view.owns(key):
            continue  # short-circuit servers are not frontends; others are not lbd's
        named = _named(view, key)
        if named is None:
            continue
        service, kind = named
        endpoints = tuple(
            _hostport(rs.ip, rs.port)
            for rs in sorted(svc.dests.values(), key=lambda r: (r.ip, r.port))
            if rs.weight > 0
        )
        frontend = f"{_hostport(key.addr, key.port)}/{PROTO_NAME[key.protocol].value}"
        out.append(FrontendStatus(service, kind, frontend, endpoints))
    return sorted(out, key=lambda f: (f.service, f.kind, f.frontend))
