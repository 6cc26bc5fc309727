"""`lbd demo`: a two-node cluster in network namespaces, four kinds of service, real traffic.

It builds the mini-cluster, starts the test API server and one `lbd run` per node, creates
a ClusterIP (dual-stack), a NodePort, a LoadBalancer (externalTrafficPolicy: Local) and an
externalIPs service, sends real TCP and UDP requests from a pod, a node and an outside
client, and prints which pod answered how often and which client address it saw. It
touches nothing outside the namespaces it creates and removes them on exit or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from lbd.testing.env import LbdEnv, eventually
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service

WEB = [PortSpec(80, 8080, "TCP", "http"), PortSpec(53, 8080, "UDP", "dns")]


@dataclass(frozen=True)
class Probe:
    service: str
    kind: str
    client: str  # node/pod/external name
    target: str
    port: int
    proto: str


def objects(env: LbdEnv) -> list[dict[str, Any]]:
    pods = env.cluster.pods
    v4 = [EndpointSpec(p.ipv4, p.node) for p in pods]
    v6 = [EndpointSpec(p.ipv6, p.node) for p in pods if p.ipv6]
    node_port = PortSpec(80, 8080, "TCP", "http", node_port=30080)
    out = [
        service("web", ["10.96.0.10", "fd00:96::10"], WEB),
        endpoint_slice("web", v4, WEB),
        endpoint_slice("web", v6, WEB, family=6),
        service("web-nodeport", ["10.96.0.20"], [node_port], type="NodePort"),
        endpoint_slice("web-nodeport", v4, [node_port]),
        service(
            "web-lb",
            ["10.96.0.30"],
            [PortSpec(80, 8080, "TCP", "http", 30081)],
            type="LoadBalancer",
            lb_ips=["203.0.113.10"],
            external_traffic_policy="Local",
            health_check_node_port=32100,
        ),
        endpoint_slice("web-lb", v4, [node_port]),
        service(
            "web-external",
            ["10.96.0.40"],
            [PortSpec(80, 8080, "TCP", "http")],
            external_ips=["203.0.113.20"],
        ),
        endpoint_slice("web-external", v4, [PortSpec(80, 8080, "TCP", "http")]),
    ]
    return out


def probes(env: LbdEnv) -> list[Probe]:
    pod = env.cluster.pods[0].name
    n1, n2 = env.cluster.nodes[0], env.cluster.nodes[1]
    out = [
        Probe("default/web", "ClusterIP", pod, "10.96.0.10", 80, "tcp"),
        Probe("default/web", "ClusterIP", pod, "10.96.0.10", 53, "udp"),
        Probe("default/web", "ClusterIP", n2.name, "10.96.0.10", 80, "tcp"),
        Probe("default/web-nodeport", "NodePort", "external", n1.ipv4, 30080, "tcp"),
        Probe("default/web-lb", "LoadBalancer", "external", "203.0.113.10", 80, "tcp"),
        Probe("default/web-external", "ExternalIP", "external", "203.0.113.20", 80, "tcp"),
    ]
    if env.cluster.ipv6:
        out.insert(2, Probe("default/web", "ClusterIP", pod, "fd00:96::10", 80, "tcp"))
    return out


def answered(env: LbdEnv, p: Probe) -> None:
    result = env.spread_from(p.client, p.target, p.port, p.proto, 1)
    assert result.ok, result.failures


def run_demo(mode: str, requests: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with LbdEnv(mode) as env:
        for obj in objects(env):
            env.apply(obj)
        env.wait_synced()
        for p in probes(env):
            # The first answer proves the path is programmed; then measure the spread.
            eventually(lambda p=p: answered(env, p), timeout=10)
            result = env.spread_from(p.client, p.target, p.port, p.proto, requests)
            rows.append(
                {
                    "service": p.service,
                    "kind": p.kind,
                    "client": p.client,
                    "frontend": f"{p.target}:{p.port}/{p.proto}",
                    **result.to_json(),
                }
            )
    return rows


LEGEND = """
How to read it: a pod calling a ClusterIP keeps its own source address, except when the
service sends it to itself (hairpin), which is masqueraded to its node's address. External
traffic with externalTrafficPolicy Cluster (NodePort, externalIP) may go to a pod on another
node and is masqueraded to the node it entered (the ebpf mode, like Cilium, leaves the
client's address on pods of the entry node itself); the LoadBalancer service uses
externalTrafficPolicy Local, so only node-1's pods answer and they see the real client
(192.168.200.100)."""


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (
        "SERVICE",
        "KIND",
        "CLIENT",
        "FRONTEND",
        "ANSWERED BY (requests)",
        "CLIENT IP SEEN",
        "FAILED",
    )
    table = [head]
    for r in rows:
        pods = ", ".join(f"{pod}×{n}" for pod, n in r["pods"].items()) or "-"
        table.append(
            (
                r["service"],
                r["kind"],
                r["client"],
                r["frontend"],
                pods,
                ", ".join(r["client_ips"]) or "-",
                str(r["failed"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def main(mode: str = "iptables", requests: int = 40, as_json: bool = False) -> int:
    if os.geteuid() != 0:
        print("lbd: the demo needs root (it creates network namespaces).", file=sys.stderr)
        return 2
    print(f"lbd demo: building a 2-node mini-cluster, proxy mode {mode} …", file=sys.stderr)
    try:
        rows = run_demo(mode, requests)
    except KeyboardInterrupt:
        print("lbd demo: interrupted; namespaces removed.", file=sys.stderr)
        return 130
    if as_json:
        print(json.dumps({"mode": mode, "results": rows}, indent=2))
    else:
        print(format_rows(rows))
        print(LEGEND)
    failed = sum(r["failed"] for r in rows)
    return 1 if failed else 0
