"""A client port reused for a direct connection right after a load-balanced one.

A flow client:p -> VIP:80 that the tc datapath DNATs to pod:8080 leaves a conntrack pair
behind, whose reply entry (pod:8080 -> client:p) rewrites the pod's answers back to VIP:80.
When the same client then talks to pod:8080 directly from the same port (wrk with
`Connection: close` recycles ports fast), the pod's answers match that leftover entry,
reach the client from VIP:80 and are dropped: the connection stalls. These tests reuse the
port on purpose, in both directions, for pods balanced by tc on their veths (hostns-only
socket LB) and for an outside client reaching a node port.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from ebpf_support import EBPF_KERNEL_MARKS

from backends.ebpf import EbpfBackend
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName
from lbd.testing.cluster import MiniCluster, Pod
from lbd.testing.netns import socket_in
from lbd.testing.traffic import Reply

pytestmark = EBPF_KERNEL_MARKS

VIP = "10.96.0.10"
NODE_PORT = 30080
TARGET = 8080


@pytest.fixture(scope="module")
def cluster() -> Iterator[MiniCluster]:
    with MiniCluster(nodes=2, pods_per_node=2) as c:
        c.start_servers(ports_tcp=(TARGET,), ports_udp=(TARGET,))
        yield c


@pytest.fixture(scope="module")
def node2(cluster: MiniCluster) -> Iterator[EbpfBackend]:
    """node-2 with socket LB for its own namespace only, so its pods go through tc."""
    backend = EbpfBackend(
        netns=cluster.nodes[1].netns,
        cgroup=None,
        bpffs=f"/sys/fs/bpf/lbd/lbdt-reuse-{secrets.token_hex(3)}-node-2",
        devices=["eth0"],
        pod_devices=["vp*"],
        hostns_only=True,
        gc_interval=0,
    )
    try:
        yield backend
    finally:
        backend.cleanup()


@pytest.fixture(scope="module")
def node1(cluster: MiniCluster) -> Iterator[EbpfBackend]:
    """node-1 with tc on its uplink only: the outside client's node ports."""
    backend = EbpfBackend(
        netns=cluster.nodes[0].netns,
        cgroup=None,
        bpffs=f"/sys/fs/bpf/lbd/lbdt-reuse-{secrets.token_hex(3)}-node-1",
        devices=["eth0"],
        gc_interval=0,
    )
    try:
        yield backend
    finally:
        backend.cleanup()


def one_endpoint_state(
    cluster: MiniCluster, node: str, pod: Pod, protocol: Protocol, **kw: object
) -> ProxyState:
    ep = (Endpoint(pod.ipv4, TARGET, node_name=pod.node, is_local=pod.node == node),)
    port = ServicePort(
        name=ServicePortName("default", "web", protocol.value.lower(), protocol),
        family=IPFamily.V4,
        cluster_ip=VIP,
        port=80,
        protocol=protocol,
        cluster_endpoints=ep,
        all_endpoints=ep,
        local_endpoints=tuple(e for e in ep if e.is_local),
        **kw,  # type: ignore[arg-type]
    )
    return ProxyState(
        node_name=node,
        node_ips=cluster.node(node).ips,
        service_ports={(port.name, port.family): port},
    )


def free_port() -> int:
    # High and random, away from the ephemeral range the other requests draw from.
    return 20000 + secrets.randbelow(9000)


def tcp_from(ns: str, sport: int, ip: str, port: int, timeout: float = 2.0) -> Reply:
    """One request/response over TCP from the fixed source port `sport`."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        s.connect((ip, port))
        s.sendall(b"ping\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    finally:
        s.close()
    return Reply.parse(data)


def udp_from(ns: str, sport: int, ip: str, port: int, timeout: float = 2.0) -> Reply:
    """One datagram each way over a UDP socket bound to `sport`, connected to ip:port (so
    an answer from any other address is not delivered)."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(b"ping\n")
        data = s.recv(4096)
    finally:
        s.close()
    return Reply.parse(data)


def reuse(ns: str, first: tuple[str, int], then: tuple[str, int], proto: str) -> list[Reply]:
    """Two exchanges from one source port: `first`, then `then`. A server that closed
    first leaves its TIME_WAIT, which accepts a new SYN; the client side is free."""
    call = tcp_from if proto == "tcp" else udp_from
    sport = free_port()
    out = [call(ns, sport, *first)]
    time.sleep(0.2)
    out.append(call(ns, sport, *then))
    return out


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("where", ["local", "remote"])
def test_pod_reuses_a_port_from_a_service_flow_for_a_direct_one(cluster, node2, proto, where):
    client = cluster.pod("pod-2-1")
    server = cluster.pod("pod-2-2" if where == "local" else "pod-1-1")
    p = Protocol.TCP if proto == "tcp" else Protocol.UDP
    node2.sync(one_endpoint_state(cluster, "node-2", server, p), True)
    via_vip, direct = reuse(client.netns, (VIP, 80), (server.ipv4, TARGET), proto)
    assert via_vip.pod == direct.pod == server.name
    assert direct.client_ip == client.ipv4
    # and back: direct first, then through the service
    direct, via_vip = reuse(client.netns, (server.ipv4, TARGET), (VIP, 80), proto)
    assert via_vip.pod == direct.pod == server.name


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_outside_client_reuses_a_port_from_a_node_port_flow(cluster, node1, proto):
    node = cluster.nodes[0]
    server = cluster.pod("pod-1-1")
    ext = cluster.external.netns
    # The outside client normally has no route to pods; give it one through node-1 (in
    # its own namespace), as a flat network would.
    subprocess.run(
        ["ip", "-n", ext, "route", "replace", f"{server.ipv4}/32", "via", node.ipv4], check=True
    )
    p = Protocol.TCP if proto == "tcp" else Protocol.UDP
    node1.sync(one_endpoint_state(cluster, "node-1", server, p, node_port=NODE_PORT), True)
    via_np, direct = reuse(ext, (node.ipv4, NODE_PORT), (server.ipv4, TARGET), proto)
    assert via_np.pod == direct.pod == server.name
    assert direct.client_ip == cluster.external.ipv4
