"""The synthetic cluster the benchmarks program: N Services, each with one EndpointSlice.

Owns the shape of the benchmark's objects and of the single-service changes applied to
them, so the control-plane and (later) data-plane parts measure the same cluster. Objects
are written with lbd.testing.objects, the builders the e2e tests use, so they are what a
real API server would hold, not hand-trimmed minimal dicts.

Shape (fixed on purpose, so numbers from different runs compare):
- Service i: ClusterIP 10.96.0.10+i, one named TCP port 80 -> 8080, spread over 50
  namespaces; every 10th service is a NodePort (while node ports last), because a real
  cluster has some and they add the EXT chains and node-port rules of the iptables mode.
- EndpointSlice of service i: `endpoints_per_service` ready pods with unique addresses in
  10.128.0.0/9, spread over 100 nodes; the benchmarked node is one of them, so about 1% of
  endpoints are node-local.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

from lbd.model.build import ModelConfig
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, node, service

JSON = dict[str, Any]

NODE_NAME = "node-0"
NODE_IP = "192.168.0.10"
CLUSTER_CIDR = "10.128.0.0/9"
NAMESPACES = 50
NODES = 100
NODEPORT_EVERY = 10
NODEPORT_RANGE = (30000, 32767)

_SERVICE_BASE = int(ipaddress.IPv4Address("10.96.0.10"))
_POD_BASE = int(ipaddress.IPv4Address("10.128.0.1"))
# Endpoints added by changes come from their own block, so they never collide with the
# seeded ones whatever the cluster size (10.200.0.0/13 holds 500k addresses).
_EXTRA_POD_BASE = int(ipaddress.IPv4Address("10.200.0.1"))
_PORTS = (PortSpec(80, 8080, name="http"),)


@dataclass(frozen=True, slots=True)
class Workload:
    services: int
    endpoints_per_service: int

    def service_name(self, i: int) -> str:
        return f"svc-{i:06d}"

    def namespace(self, i: int) -> str:
        return f"bench-{i % NAMESPACES:02d}"

    def endpoint_ip(self, i: int, j: int) -> str:
        return str(ipaddress.IPv4Address(_POD_BASE + i * self.endpoints_per_service + j))

    def service_object(self, i: int) -> JSON:
        node_port = NODEPORT_RANGE[0] + i // NODEPORT_EVERY
        is_node_port = i % NODEPORT_EVERY == 0 and node_port <= NODEPORT_RANGE[1]
        ports = [PortSpec(p.port, p.target_port, p.protocol, p.name) for p in _PORTS]
        if is_node_port:
            ports = [PortSpec(p.port, p.target_port, p.protocol, p.name, node_port) for p in _PORTS]
        return service(
            self.service_name(i),
            [str(ipaddress.IPv4Address(_SERVICE_BASE + i))],
            ports,
            namespace=self.namespace(i),
            type="NodePort" if is_node_port else "ClusterIP",
            labels={"app": self.service_name(i)},
        )

    def slice_object(self, i: int) -> JSON:
        endpoints = [
            EndpointSpec(self.endpoint_ip(i, j), f"node-{(i * 7 + j) % NODES}")
            for j in range(self.endpoints_per_service)
        ]
        return endpoint_slice(
            self.service_name(i),
            endpoints,
            _PORTS,
            namespace=self.namespace(i),
            name=f"{self.service_name(i)}-abcde",
        )

    def objects(self) -> tuple[list[JSON], list[JSON], JSON]:
        """(services, endpoint slices, this node's Node object)."""
        services = [self.service_object(i) for i in range(self.services)]
        slices = [self.slice_object(i) for i in range(self.services)]
        return services, slices, node(NODE_NAME, [NODE_IP])


def model_config() -> ModelConfig:
    return ModelConfig(node_name=NODE_NAME, cluster_cidrs=(CLUSTER_CIDR,))


# --------------------------------------------------------------------------------------
# Single-service changes

CHANGE_KINDS = ("add-endpoint", "remove-endpoint", "replace-endpoint")
# Consecutive changes hit services far apart (a prime stride), so no change can ride on
# the caches warmed by the previous one.
_STRIDE = 7919


def change_target(k: int, services: int) -> int:
    """The service index that change number `k` touches."""
    return (k * _STRIDE + 1) % services


def changed_slice(slice_obj: JSON, k: int, resource_version: int) -> tuple[str, JSON]:
    """Change number `k` applied to one EndpointSlice: (kind of change, the new object).

    The kinds rotate through adding a pod, removing one and replacing one (a pod
    restarted with a new address, the commonest change in a real cluster). The input is
    not modified: stores and the parse cache may still hold it.
    """
    kind = CHANGE_KINDS[k % len(CHANGE_KINDS)]
    new = copy.deepcopy(slice_obj)
    endpoints: list[JSON] = new["endpoints"]
    fresh = str(ipaddress.IPv4Address(_EXTRA_POD_BASE + k))
    if kind == "remove-endpoint" and len(endpoints) > 1:
        endpoints.pop()
    elif kind == "replace-endpoint" and endpoints:
        endpoints[0] = {**endpoints[0], "addresses": [fresh]}
    else:
        kind = "add-endpoint"
        template = endpoints[0] if endpoints else _ready_endpoint("node-1")
        endpoints.append({**template, "addresses": [fresh]})
    # The store and the parse cache key objects by resourceVersion, as they would for a
    # watch event: a changed object must carry a newer one.
    new["metadata"]["resourceVersion"] = str(resource_version)
    return kind, new


def _ready_endpoint(node_name: str) -> JSON:
    return {
        "addresses": [],
        "nodeName": node_name,
        "conditions": {"ready": True, "serving": True, "terminating": False},
    }
