"""ProxyState: the frozen, backend-neutral contract between the control plane and backends.

Everything a backend needs to program a node is here, already decided: which frontends a
service port has, and which endpoints serve cluster traffic and node-local traffic.
Backends translate this; they never look at Kubernetes objects and never re-decide
endpoint eligibility (that lives once, in lbd.model.endpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import NamedTuple


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(IntEnum):
    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """Identifies one port of one service (kube-proxy's ServicePortName)."""

    namespace: str
    name: str
    port: str  # the port's name ("" for an unnamed single port)
    protocol: Protocol

    def __str__(self) -> str:
        suffix = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{suffix}"


class Endpoint(NamedTuple):
    """One backend address:port of a service port, with its EndpointSlice conditions.

    A NamedTuple rather than a frozen dataclass: a 10k-service state holds 100k of these,
    and tuple construction and ordering are several times cheaper.
    """

    ip: str
    port: int
    node_name: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone_hints: frozenset[str] = frozenset()
    is_local: bool = False  # node_name == this node

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One service port in one IP family, with its frontends and chosen endpoints.

    A dual-stack service yields two ServicePorts (one per family) with the same name.
    """

    name: ServicePortName
    family: IPFamily
    cluster_ip: str
    port: int
    protocol: Protocol
    node_port: int = 0  # 0: no node port
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()  # CIDRs of this family; () = all
    session_affinity_timeout: int = 0  # seconds; 0: no ClientIP affinity
    external_policy_local: bool = False  # externalTrafficPolicy: Local
    internal_policy_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: int = 0
    # Endpoints chosen by lbd.model.endpoints (topology + terminating fallback applied).
    # All three tuples hold valid, canonical addresses of `family` (lbd.model.parse),
    # one endpoint per ip:port, sorted (merge_endpoints): backends build on this as is.
    cluster_endpoints: tuple[Endpoint, ...] = ()
    local_endpoints: tuple[Endpoint, ...] = ()
    # Every endpoint of this port in the slices, eligible or not (for conntrack hygiene).
    all_endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> str:
        """A stable identifier (used to name chains, map keys, log lines)."""
        return f"{self.name}/{self.protocol.value.lower()}/v{int(self.family)}"

    @property
    def has_external_frontends(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def internal_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for traffic to the ClusterIP (internalTrafficPolicy applied)."""
        return self.local_endpoints if self.internal_policy_local else self.cluster_endpoints

    @property
    def external_endpoints(self) -> tuple[Endpoint, ...]:
        """Endpoints for NodePort/LB/externalIP traffic (externalTrafficPolicy applied)."""
        return self.local_endpoints if self.external_policy_local else self.cluster_endpoints

    @property
    def used_endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint some frontend of this port can send to, de-duplicated, sorted."""
        seen = {*self.internal_endpoints}
        if self.has_external_frontends:
            seen.update(self.external_endpoints)
        return tuple(sorted(seen))


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything one node's datapath must implement, for every family."""

    node_name: str
    node_ips: tuple[str, ...] = ()
    zone: str = ""
    cluster_cidrs: tuple[str, ...] = ()  # empty: cannot tell pod traffic; masquerade none
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; empty: every local address
    service_ports: Mapping[tuple[ServicePortName, IPFamily], ServicePort] = field(
        default_factory=dict
    )
    # Bookkeeping, not part of the state's value: a builder that knows what changed since
    # the state it built before (revision `changed_from`) lists the service-port keys it
    # rebuilt or removed in `changed`, so a backend that holds that previous state can plan
    # just those instead of comparing every service port. Revisions are unique within the
    # process; changed_from -1 means "unknown: compare everything".
    revision: int = field(default=0, compare=False)
    changed_from: int = field(default=-1, compare=False)
    changed: frozenset[tuple[ServicePortName, IPFamily]] = field(default=frozenset(), compare=False)

    def changes_since(self, revision: int) -> frozenset[tuple[ServicePortName, IPFamily]] | None:
        """The service-port keys that changed since the state of `revision`; None when
        that is unknown (then every service port may have changed)."""
        if self.changed_from < 0 or revision != self.changed_from:
            return None
        return self.changed

    def ports(self, family: IPFamily | None = None) -> Iterator[ServicePort]:
        """Service ports in a stable order (optionally of one family)."""
        for key in sorted(self.service_ports):
            sp = self.service_ports[key]
            if family is None or sp.family == family:
                yield sp

    def cidrs(self, family: IPFamily, cidrs: tuple[str, ...]) -> tuple[str, ...]:
        want_v6 = family == IPFamily.V6
        return tuple(c for c in cidrs if (":" in c) == want_v6)


def endpoint_to_json(ep: Endpoint) -> dict[str, object]:
    return {
        "address": str(ep),
        "node": ep.node_name,
        "ready": ep.ready,
        "serving": ep.serving,
        "terminating": ep.terminating,
        "local": ep.is_local,
    }


def service_port_to_json(sp: ServicePort) -> dict[str, object]:
    """A stable JSON view (for /state, `lbd status`-style tools and tests)."""
    return {
        "service": str(sp.name),
        "protocol": sp.protocol.value,
        "family": f"IPv{int(sp.family)}",
        "clusterIP": sp.cluster_ip,
        "port": sp.port,
        "nodePort": sp.node_port,
        "externalIPs": list(sp.external_ips),
        "loadBalancerIPs": list(sp.load_balancer_ips),
        "loadBalancerSourceRanges": list(sp.load_balancer_source_ranges),
        "sessionAffinityTimeout": sp.session_affinity_timeout,
        "externalPolicyLocal": sp.external_policy_local,
        "internalPolicyLocal": sp.internal_policy_local,
        "healthCheckNodePort": sp.health_check_node_port,
        "clusterEndpoints": [str(ep) for ep in sp.cluster_endpoints],
        "localEndpoints": [str(ep) for ep in sp.local_endpoints],
        "allEndpoints": [endpoint_to_json(ep) for ep in sp.all_endpoints],
    }


def state_to_json(state: ProxyState) -> dict[str, object]:
    return {
        "node": state.node_name,
        "zone": state.zone,
        "servicePorts": [service_port_to_json(sp) for sp in state.ports()],
    }
