"""Builders for Service and EndpointSlice objects, as the API server would hold them.

Used by the e2e tests, the demo and the benchmarks so that every caller writes objects
the same (valid) way; tests that want a malformed object start from these and break it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class PortSpec:
    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""
    node_port: int = 0


@dataclass(frozen=True)
class EndpointSpec:
    ip: str
    node_name: str
    ready: bool = True
    serving: bool | None = None
    terminating: bool = False
    zones: tuple[str, ...] | None = None


def service(
    name: str,
    cluster_ips: Sequence[str],
    ports: Sequence[PortSpec],
    *,
    namespace: str = "default",
    type: str = "ClusterIP",
    external_ips: Sequence[str] = (),
    lb_ips: Sequence[str] = (),
    source_ranges: Sequence[str] = (),
    external_traffic_policy: str | None = None,
    internal_traffic_policy: str | None = None,
    health_check_node_port: int = 0,
    affinity_timeout: int = 0,
    labels: dict[str, str] | None = None,
    traffic_distribution: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": type,
        "clusterIP": cluster_ips[0],
        "clusterIPs": list(cluster_ips),
        "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips],
        "ports": [],
    }
    for p in ports:
        entry: dict[str, Any] = {
            "port": p.port,
            "targetPort": p.target_port,
            "protocol": p.protocol,
        }
        if p.name:
            entry["name"] = p.name
        if p.node_port and type in ("NodePort", "LoadBalancer"):
            entry["nodePort"] = p.node_port
        spec["ports"].append(entry)
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if source_ranges:
        spec["loadBalancerSourceRanges"] = list(source_ranges)
    if external_traffic_policy:
        spec["externalTrafficPolicy"] = external_traffic_policy
    if internal_traffic_policy:
        spec["internalTrafficPolicy"] = internal_traffic_policy
    if health_check_node_port:
        spec["healthCheckNodePort"] = health_check_node_port
    if affinity_timeout:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    if traffic_distribution:
        spec["trafficDistribution"] = traffic_distribution
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
    }
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def endpoint_slice(
    service_name: str,
    endpoints: Iterable[EndpointSpec],
    ports: Sequence[PortSpec],
    *,
    family: int = 4,
    namespace: str = "default",
    name: str | None = None,
) -> dict[str, Any]:
    eps = []
    for ep in endpoints:
        entry: dict[str, Any] = {
            "addresses": [ep.ip],
            "nodeName": ep.node_name,
            "conditions": {
                "ready": ep.ready,
                "serving": ep.ready if ep.serving is None else ep.serving,
                "terminating": ep.terminating,
            },
        }
        if ep.zones is not None:
            entry["hints"] = {"forZones": [{"name": z} for z in ep.zones]}
        eps.append(entry)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-v{family}",
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service_name,
                "endpointslice.kubernetes.io/managed-by": "lbd-testing",
            },
        },
        "addressType": f"IPv{family}",
        "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol} for p in ports],
        "endpoints": eps,
    }


def node(name: str, ips: Sequence[str], zone: str | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip} for ip in ips]
            + [{"type": "Hostname", "address": name}]
        },
    }
