"""Packet-level (tc) load balancing against a real kernel, in a netns mini-cluster.

node-1's EbpfBackend attaches its tc programs to node-1's `eth0` (inside node-1's
namespace; nothing outside the mini-cluster is touched) and pins its maps under
/sys/fs/bpf/lbd/lbdt-tc-xxxx-node-1/. The outside client (192.168.200.100 /
fd00:200::100) reaches node ports on node-1's address and load-balancer IPs routed to
node-1; the echo servers report which pod answered and the client address it saw, which
tells SNAT (node-1's address) from source preservation (the client's).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ebpf_support import EBPF_KERNEL_MARKS

from backends.ebpf import EbpfBackend
from backends.ebpf.cgroups import CgroupSandbox
from backends.ebpf.conntrack import CtTimeouts
from backends.ebpf.plan import BACKENDS, Op
from bpf_lb.maps import CT_FORWARD, PROTO_TCP, PROTO_UDP
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName
from lbd.testing.cluster import MiniCluster, Pod
from lbd.testing.netns import socket_in
from lbd.testing.traffic import RequestRefused, RequestTimeout, spread, tcp_request, udp_request

pytestmark = EBPF_KERNEL_MARKS

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP = Protocol.TCP, Protocol.UDP
VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
LB_IP = "203.0.113.20"
NODE_PORT = 30080
REPO = Path(__file__).resolve().parents[2]

LINE_SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1].encode(), int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(64)
def serve(c):
    f = c.makefile("rwb")
    for line in f:
        f.write(name + b" " + line)
        f.flush()
    c.close()
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[MiniCluster]:
    with MiniCluster(nodes=2, pods_per_node=2) as c:
        c.start_servers(ports_tcp=(8080,), ports_udp=(8080,))
        yield c


@pytest.fixture(scope="module")
def tag() -> str:
    return f"lbdt-tc-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[CgroupSandbox]:
    with CgroupSandbox() as sb:
        yield sb


@pytest.fixture(scope="module")
def node1(cluster: MiniCluster, tag: str, sandbox: CgroupSandbox) -> Iterator[EbpfBackend]:
    # socket LB too (for node-1's cgroup), as on a real node: both datapaths at once
    backend = EbpfBackend(
        netns=cluster.nodes[0].netns,
        cgroup=str(sandbox.node("node-1")),
        bpffs=f"/sys/fs/bpf/lbd/{tag}-node-1",
        devices=["eth0"],
        gc_interval=0,
    )
    try:
        yield backend
    finally:
        backend.cleanup()
    assert not Path(backend.bpffs).exists()
    assert tc_filters(cluster.nodes[0].netns, "eth0", "ingress") == ""
    assert tc_filters(cluster.nodes[0].netns, "eth0", "egress") == ""


# --- helpers ----------------------------------------------------------------------------------


def tc_filters(ns: str, dev: str, direction: str) -> str:
    out = subprocess.run(
        ["tc", "-n", ns, "filter", "show", "dev", dev, direction], capture_output=True, text=True
    )
    return out.stdout.strip()


def endpoints(
    cluster: MiniCluster, node: str, pods: list[Pod] | None = None, *, port: int = 8080, v6=False
) -> tuple[Endpoint, ...]:
    chosen = cluster.pods if pods is None else pods
    return tuple(
        Endpoint(p.ipv6 if v6 else p.ipv4, port, node_name=p.node, is_local=p.node == node)
        for p in chosen
    )


def svc(
    name: str,
    eps: tuple[Endpoint, ...],
    *,
    vip: str = VIP,
    port: int = 80,
    protocol: Protocol = TCP,
    family: IPFamily = V4,
    **kw: object,
) -> ServicePort:
    kw.setdefault("local_endpoints", tuple(e for e in eps if e.is_local))
    return ServicePort(
        name=ServicePortName("default", name, protocol.value.lower(), protocol),
        family=family,
        cluster_ip=vip,
        port=port,
        protocol=protocol,
        cluster_endpoints=eps,
        all_endpoints=eps,
        **kw,  # type: ignore[arg-type]
    )


def both(name: str, eps: tuple[Endpoint, ...], **kw: object) -> list[ServicePort]:
    """The same service port over TCP and UDP."""
    return [svc(name, eps, protocol=TCP, **kw), svc(name, eps, protocol=UDP, **kw)]


def state(cluster: MiniCluster, node: str, *ports: ServicePort) -> ProxyState:
    return ProxyState(
        node_name=node,
        node_ips=cluster.node(node).ips,
        service_ports={(p.name, p.family): p for p in ports},
    )


def pods_on(cluster: MiniCluster, node: str) -> set[str]:
    return {p.name for p in cluster.pods_on(node)}


def all_pods(cluster: MiniCluster) -> set[str]:
    return {p.name for p in cluster.pods}


def from_outside(cluster: MiniCluster, ip: str, port: int, proto: str = "tcp", n: int = 60):
    return spread(cluster.external.netns, ip, port, proto, count=n, timeout=1.0)


def check_spread(cluster: MiniCluster, result, pods: set[str], client_ips: set[str]) -> None:
    assert result.failed == 0, result.failures
    assert set(result.pods) == pods, result.pods
    assert result.client_ips == client_ips


# --- node ports -------------------------------------------------------------------------------


def test_node_port_cluster_policy_reaches_every_pod_with_snat_for_remote_ones(cluster, node1):
    node = cluster.nodes[0]
    node1.sync(
        state(cluster, "node-1", *both("web", endpoints(cluster, "node-1"), node_port=NODE_PORT)),
        True,
    )
    assert "lbd_tc_from_netdev" in tc_filters(node.netns, "eth0", "ingress")
    assert "lbd_tc_egress" in tc_filters(node.netns, "eth0", "egress")
    for proto in ("tcp", "udp"):
        result = from_outside(cluster, node.ipv4, NODE_PORT, proto, 40)
        assert result.failed == 0, result.failures
        assert set(result.pods) == all_pods(cluster)
        # remote pods see node-1 (masquerade), local ones the client itself
        assert result.client_ips == {node.ipv4, cluster.external.ipv4}
    # per pod: exactly one of the two
    for _ in range(20):
        reply = tcp_request(cluster.external.netns, node.ipv4, NODE_PORT)
        want = cluster.external.ipv4 if reply.pod.startswith("pod-1-") else node.ipv4
        assert reply.client_ip == want, reply


def test_node_port_local_policy_keeps_the_client_address(cluster, node1):
    node = cluster.nodes[0]
    ports = both(
        "web", endpoints(cluster, "node-1"), node_port=NODE_PORT, external_policy_local=True
    )
    node1.sync(state(cluster, "node-1", *ports), False)
    # An earlier test's UDP flow whose client port a request here happens to reuse is the
    # same flow, and keeps its (maybe remote) endpoint, as with kube-proxy, which clears UDP
    # conntrack only for removed endpoints: start this test without any flow.
    node1.datapath.ct_delete(list(node1.datapath.ct_entries()))
    for proto in ("tcp", "udp"):
        check_spread(
            cluster,
            from_outside(cluster, node.ipv4, NODE_PORT, proto),
            pods_on(cluster, "node-1"),
            {cluster.external.ipv4},
        )
    # no local endpoint: dropped (a timeout), not refused and not forwarded
    remote_only = endpoints(cluster, "node-1", cluster.pods_on("node-2"))
    ports = both("web", remote_only, node_port=NODE_PORT, external_policy_local=True)
    node1.sync(state(cluster, "node-1", *ports), False)
    with pytest.raises(RequestTimeout):
        tcp_request(cluster.external.netns, node.ipv4, NODE_PORT, timeout=1.0)


def test_no_endpoints_is_refused_at_once(cluster, node1):
    node = cluster.nodes[0]
    node1.sync(
        state(cluster, "node-1", *both("web", (), node_port=NODE_PORT, load_balancer_ips=(LB_IP,))),
        False,
    )
    for ip, port in ((node.ipv4, NODE_PORT), (LB_IP, 80)):
        start = time.monotonic()
        with pytest.raises(RequestRefused):
            tcp_request(cluster.external.netns, ip, port, timeout=3.0)
        with pytest.raises(RequestRefused):
            udp_request(cluster.external.netns, ip, port, timeout=3.0)
        assert time.monotonic() - start < 1.0


def test_load_balancer_ip_and_source_ranges(cluster, node1):
    eps = endpoints(cluster, "node-1")
    allowed = svc(
        "web", eps, load_balancer_ips=(LB_IP,), load_balancer_source_ranges=("192.168.200.0/24",)
    )
    node1.sync(state(cluster, "node-1", allowed), False)
    result = from_outside(cluster, LB_IP, 80, n=40)
    assert result.failed == 0 and set(result.pods) == all_pods(cluster)
    # a reply really comes from the LB IP (the client's connected socket accepted it)
    denied = svc(
        "web", eps, load_balancer_ips=(LB_IP,), load_balancer_source_ranges=("10.0.0.0/8",)
    )
    node1.sync(state(cluster, "node-1", denied), False)
    with pytest.raises(RequestTimeout):
        tcp_request(cluster.external.netns, LB_IP, 80, timeout=1.0)


def test_session_affinity_from_outside(cluster, node1):
    node = cluster.nodes[0]
    web = svc("web", endpoints(cluster, "node-1"), node_port=NODE_PORT, session_affinity_timeout=60)
    node1.sync(state(cluster, "node-1", web), False)
    result = from_outside(cluster, node.ipv4, NODE_PORT, n=20)
    assert result.failed == 0 and len(result.pods) == 1, result.pods


def test_ipv6_node_port(cluster, node1):
    node = cluster.nodes[0]
    eps = endpoints(cluster, "node-1", v6=True)
    ports = both("web6", eps, vip=VIP6, family=V6, node_port=NODE_PORT + 1)
    node1.sync(state(cluster, "node-1", *ports), False)
    for proto in ("tcp", "udp"):
        result = from_outside(cluster, node.ipv6, NODE_PORT + 1, proto, 40)
        assert result.failed == 0, result.failures
        assert set(result.pods) == all_pods(cluster)
        assert result.client_ips == {node.ipv6, cluster.external.ipv6}
    node1.sync(
        state(cluster, "node-1", *both("web6", (), vip=VIP6, family=V6, node_port=NODE_PORT + 1)),
        False,
    )
    with pytest.raises(RequestRefused):
        tcp_request(cluster.external.netns, node.ipv6, NODE_PORT + 1, timeout=3.0)
    with pytest.raises(RequestRefused):
        udp_request(cluster.external.netns, node.ipv6, NODE_PORT + 1, timeout=3.0)


def test_maglev_in_tc(cluster, tag):
    """A second instance on node-2, selecting with Maglev over a 5-tuple hash."""
    node = cluster.nodes[1]
    backend = EbpfBackend(
        netns=node.netns,
        cgroup=None,
        bpffs=f"/sys/fs/bpf/lbd/{tag}-node-2m",
        devices=["eth0"],
        lb_algorithm="maglev",
        maglev_table_size=1021,
        gc_interval=0,
    )
    try:
        backend.sync(
            state(cluster, "node-2", svc("web", endpoints(cluster, "node-2"), node_port=NODE_PORT)),
            True,
        )
        result = spread(cluster.external.netns, node.ipv4, NODE_PORT, "tcp", count=40, timeout=1.0)
        assert result.failed == 0 and set(result.pods) == all_pods(cluster)
        # one 5-tuple, one backend: the same source port always lands on the same pod
        seen = set()
        for _ in range(3):
            s = socket_in(cluster.external.netns)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((cluster.external.ipv4, 40404))
            s.settimeout(2)
            s.connect((node.ipv4, NODE_PORT))
            s.sendall(b"x\n")
            seen.add(s.recv(100).split()[0])
            s.close()
            time.sleep(0.05)
            backend.datapath.ct_delete(list(backend.datapath.ct_entries()))  # forget the flow
        assert len(seen) == 1
    finally:
        backend.cleanup()
    assert tc_filters(node.netns, "eth0", "ingress") == ""


# --- conntrack --------------------------------------------------------------------------------


def test_a_flow_keeps_its_backend_while_the_service_changes(cluster, node1):
    node = cluster.nodes[0]
    target = cluster.pod("pod-2-1")
    cluster.popen(
        target,
        [sys.executable, "-c", LINE_SERVER, target.name, "9000"],
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.readline()
    one = endpoints(cluster, "node-1", [target], port=9000)
    node1.sync(state(cluster, "node-1", svc("lines", one, port=90, node_port=NODE_PORT + 2)), False)
    s = socket_in(cluster.external.netns)
    s.settimeout(3)
    s.connect((node.ipv4, NODE_PORT + 2))
    f = s.makefile("rwb")
    f.write(b"one\n")
    f.flush()
    assert f.readline().split() == [b"pod-2-1", b"one"]
    # the endpoint leaves the service: an established TCP flow still reaches it
    node1.sync(state(cluster, "node-1", svc("lines", (), port=90, node_port=NODE_PORT + 2)), False)
    f.write(b"two\n")
    f.flush()
    assert f.readline().split() == [b"pod-2-1", b"two"]
    # the conntrack pair, witnessed by bpftool
    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", f"{node1.bpffs}/lbd_ct"],
        capture_output=True,
        text=True,
        check=True,
    )
    dports = {e["formatted"]["key"]["dport"] for e in json.loads(out.stdout)}
    assert socket.htons(NODE_PORT + 2) in dports
    s.close()


def test_conntrack_gc_and_udp_cleanup(cluster, node1):
    node = cluster.nodes[0]
    ports = both("web", endpoints(cluster, "node-1"), node_port=NODE_PORT)
    node1.sync(state(cluster, "node-1", *ports), False)
    node1.datapath.ct_delete(list(node1.datapath.ct_entries()))
    # one long-lived UDP "client" talking to whichever pod it got
    u = socket_in(cluster.external.netns, socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect((node.ipv4, NODE_PORT))
    u.send(b"a\n")
    first = u.recv(100).split()[0].decode()
    tcp_request(cluster.external.netns, node.ipv4, NODE_PORT)
    entries = node1.datapath.ct_entries()
    assert {k.proto for k in entries} == {PROTO_TCP, PROTO_UDP}
    assert len(entries) == 4  # a forward + reply pair per flow
    # the UDP client's pod leaves: its conntrack pair goes with the sync, and the client's
    # next datagram lands on a live pod
    survivors = [p for p in cluster.pods if p.name != first]
    ports = both("web", endpoints(cluster, "node-1", survivors), node_port=NODE_PORT)
    result = node1.sync(state(cluster, "node-1", *ports), False)
    assert result.detail["conntrack_deleted"] == 2
    u.send(b"b\n")
    assert u.recv(100).split()[0].decode() != first
    u.close()
    # closed TCP flows expire after the short closing timeout, idle UDP after its own
    now = time.monotonic_ns()
    assert node1.gc(now)["ct_expired"] == 0
    assert node1.gc(now + 11 * 10**9)["ct_expired"] == 2  # the closed TCP pair
    assert node1.gc(now + 61 * 10**9)["ct_expired"] == 2  # the UDP pair
    assert node1.datapath.ct_entries() == {}


def test_gc_keeps_established_flows(cluster, node1):
    node = cluster.nodes[0]
    node1.sync(
        state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"), node_port=NODE_PORT)),
        False,
    )
    node1.datapath.ct_delete(list(node1.datapath.ct_entries()))
    s = socket_in(cluster.external.netns)
    s.settimeout(2)
    s.connect((node.ipv4, NODE_PORT))  # established; the echo server waits for a line
    fwd = [k for k in node1.datapath.ct_entries() if k.dir == CT_FORWARD]
    assert len(fwd) == 1
    assert node1.gc(time.monotonic_ns() + 3600 * 10**9)["ct_expired"] == 0
    assert node1.gc(time.monotonic_ns() + int(CtTimeouts().tcp + 1) * 10**9)["ct_expired"] == 2
    s.close()


# --- hostns-only: pods balanced by tc on their veths -------------------------------------------


def test_hostns_only_pods_are_balanced_by_tc(cluster, tag):
    node = cluster.nodes[1]
    backend = EbpfBackend(
        netns=node.netns,
        cgroup=None,
        bpffs=f"/sys/fs/bpf/lbd/{tag}-node-2h",
        devices=["eth0"],
        pod_devices=["vp*"],
        hostns_only=True,
        gc_interval=0,
    )
    client = cluster.pod("pod-2-1")
    try:
        web = both("web", endpoints(cluster, "node-2"))
        backend.sync(state(cluster, "node-2", *web, *both("none", (), vip="10.96.0.11")), True)
        assert "lbd_tc_from_pod" in tc_filters(node.netns, "vp2-1", "ingress")
        for proto in ("tcp", "udp"):
            # an in-process client in the pod's namespace: no cgroup involved at all
            result = spread(client.netns, VIP, 80, proto, count=40, timeout=1.0)
            assert result.failed == 0, result.failures
            assert set(result.pods) == all_pods(cluster)
            # hairpin (pod-2-1 reaching itself) is masqueraded to the node, the rest not
            assert result.client_ips <= {client.ipv4, node.ipv4}
            assert client.ipv4 in result.client_ips
        with pytest.raises(RequestRefused):
            tcp_request(client.netns, "10.96.0.11", 80, timeout=3.0)
        with pytest.raises(RequestRefused):
            udp_request(client.netns, "10.96.0.11", 80, timeout=3.0)
        # loadBalancerSourceRanges apply to pods as well (kube-proxy's FW chain does)
        eps = endpoints(cluster, "node-2")
        inside = svc(
            "web", eps, load_balancer_ips=(LB_IP,), load_balancer_source_ranges=("10.0.0.0/8",)
        )
        backend.sync(state(cluster, "node-2", inside), False)
        assert tcp_request(client.netns, LB_IP, 80).pod in all_pods(cluster)
        outside = svc(
            "web", eps, load_balancer_ips=(LB_IP,), load_balancer_source_ranges=("192.168.0.0/16",)
        )
        backend.sync(state(cluster, "node-2", outside), False)
        with pytest.raises(RequestTimeout):
            tcp_request(client.netns, LB_IP, 80, timeout=1.0)
        # internalTrafficPolicy: Local without a local endpoint drops
        remote = endpoints(cluster, "node-2", cluster.pods_on("node-1"))
        backend.sync(
            state(cluster, "node-2", svc("web", remote, internal_policy_local=True)), False
        )
        with pytest.raises(RequestTimeout):
            tcp_request(client.netns, VIP, 80, timeout=1.0)
    finally:
        backend.cleanup()
    assert tc_filters(node.netns, "vp2-1", "ingress") == ""
    assert tc_filters(node.netns, "eth0", "ingress") == ""


# --- restart and cleanup ---------------------------------------------------------------------


def test_restart_keeps_established_flows_and_replaces_filters(cluster, tag):
    node = cluster.nodes[1]
    pin = f"/sys/fs/bpf/lbd/{tag}-node-2r"
    target = cluster.pod("pod-1-2")
    cluster.popen(
        target,
        [sys.executable, "-c", LINE_SERVER, target.name, "9001"],
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.readline()
    st = state(
        cluster,
        "node-2",
        svc("lines", endpoints(cluster, "node-2", [target], port=9001), node_port=NODE_PORT + 3),
    )
    first = EbpfBackend(netns=node.netns, cgroup=None, bpffs=pin, devices=["eth0"], gc_interval=0)
    second = None
    try:
        first.sync(st, True)
        s = socket_in(cluster.external.netns)
        s.settimeout(3)
        s.connect((node.ipv4, NODE_PORT + 3))
        f = s.makefile("rwb")
        f.write(b"before\n")
        f.flush()
        assert f.readline().split() == [b"pod-1-2", b"before"]
        first.close()  # the daemon goes away; filters and maps stay
        second = EbpfBackend(
            netns=node.netns, cgroup=None, bpffs=pin, devices=["eth0"], gc_interval=0
        )
        result = second.sync(st, True)
        assert result.changed_service_ports == 0, result.detail
        filters = tc_filters(node.netns, "eth0", "ingress")
        assert filters.count("lbd_tc_from_netdev") == 1  # replaced, not added
        f.write(b"after\n")
        f.flush()
        assert f.readline().split() == [b"pod-1-2", b"after"]
        s.close()
    finally:
        (second or first).cleanup()
    assert tc_filters(node.netns, "eth0", "ingress") == ""
    assert not Path(pin).exists()


def test_status_reads_the_kernel(cluster, node1):
    node = cluster.nodes[0]
    web = svc("web", endpoints(cluster, "node-1"), node_port=NODE_PORT, load_balancer_ips=(LB_IP,))
    node1.sync(state(cluster, "node-1", web), False)
    rows = {(r.kind, r.frontend): r for r in node1.status()}
    assert set(rows) == {
        ("ClusterIP", f"{VIP}:80/TCP"),
        ("NodePort", f"{node.ipv4}:{NODE_PORT}/TCP"),
        ("LoadBalancer", f"{LB_IP}:80/TCP"),
    }
    assert all(r.service == "default/web:tcp" for r in rows.values())
    assert sorted(rows[("ClusterIP", f"{VIP}:80/TCP")].endpoints) == sorted(
        f"{p.ipv4}:8080" for p in cluster.pods
    )
    assert not node1.needs_full_sync()
    # no other mode served this node before: nothing to take over, so a mid-flow segment
    # without a conntrack entry is balanced again (lb_config.takeover_until_ns)
    config = node1.datapath.read_view().config
    assert config is not None and config.takeover_until_ns == 0
    # `lbd status` in another process: reads the pins, compiles nothing, attaches nothing
    reader = EbpfBackend(netns=node.netns, cgroup=None, bpffs=str(node1.bpffs))
    started = time.monotonic()
    assert reader.status() == node1.status()
    assert time.monotonic() - started < 1.0
    assert not reader.datapath.loaded


def test_a_full_sync_restores_what_was_removed(cluster, node1):
    node = cluster.nodes[0]
    st = state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"), node_port=NODE_PORT))
    node1.sync(st, False)
    assert not node1.needs_full_sync()
    # an admin removes lbd's tc filter and unpins a map
    subprocess.run(["tc", "-n", node.netns, "filter", "del", "dev", "eth0", "ingress"], check=True)
    Path(node1.bpffs, "lbd_backends").unlink()
    with pytest.raises((RequestTimeout, RequestRefused)):
        tcp_request(cluster.external.netns, node.ipv4, NODE_PORT, timeout=1.0)
    assert node1.needs_full_sync()
    result = node1.sync(st, True)
    assert result.full
    assert not node1.needs_full_sync()
    assert Path(node1.bpffs, "lbd_backends").exists()
    assert "lbd_tc_from_netdev" in tc_filters(node.netns, "eth0", "ingress")
    result = from_outside(cluster, node.ipv4, NODE_PORT, n=60)
    assert result.failed == 0 and set(result.pods) == all_pods(cluster)


def test_a_full_sync_checks_the_maps_and_repairs_what_another_writer_changed(cluster, node1):
    node = cluster.nodes[0]
    st = state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"), node_port=NODE_PORT))
    node1.sync(st, False)
    # Untouched maps: the full sync finds them as lbd left them, and writes nothing.
    clean = node1.sync(st, True)
    assert "verified_ms" in clean.detail, clean.detail
    assert not [k for k in clean.detail if k.endswith(("_write", "_delete"))], clean.detail
    # Another writer points one backend at a port nothing listens on (written straight
    # into the kernel: lbd's own view of the maps is not told).
    bid, backend = min(node1.datapath.read_view().backends.items())
    node1.datapath.apply_ops([Op(BACKENDS, bid, backend._replace(port=9))])
    broken = from_outside(cluster, node.ipv4, NODE_PORT, n=40)
    assert broken.failed > 0, broken.pods
    repaired = node1.sync(st, True)
    assert "read_ms" in repaired.detail and "verified_ms" not in repaired.detail
    assert repaired.detail.get("lbd_backends_write") == 1, repaired.detail
    result = from_outside(cluster, node.ipv4, NODE_PORT, n=60)
    assert result.failed == 0 and set(result.pods) == all_pods(cluster), result.failures


def test_socket_and_tc_load_balancing_together(cluster, sandbox, node1):
    node = cluster.nodes[0]
    ports = both("web", endpoints(cluster, "node-1"), node_port=NODE_PORT)
    node1.sync(state(cluster, "node-1", *ports), False)
    # from outside: tc
    result = from_outside(cluster, node.ipv4, NODE_PORT, n=60)
    assert result.failed == 0 and set(result.pods) == all_pods(cluster)
    # from a pod in node-1's cgroup, to the cluster IP and to node-1's own node port:
    # socket LB (no SNAT: the pods see the client pod)
    client = cluster.pod("pod-1-1")
    for ip, port in ((VIP, 80), (node.ipv4, NODE_PORT)):
        argv = [sys.executable, "-m", "lbd.testing.traffic", "tcp", ip, str(port)]
        argv += ["--count", "60", "--json"]
        proc = sandbox.run(sandbox.node("node-1"), client.netns, argv, cwd=REPO)
        out = json.loads(proc.stdout)
        assert out["failed"] == 0, out
        assert set(out["pods"]) == all_pods(cluster) and out["client_ips"] == [client.ipv4]


def test_the_gc_thread_expires_idle_flows(cluster, tag):
    node = cluster.nodes[1]
    backend = EbpfBackend(
        netns=node.netns,
        cgroup=None,
        bpffs=f"/sys/fs/bpf/lbd/{tag}-node-2g",
        devices=["eth0"],
        gc_interval=0.2,
        ct_timeouts=CtTimeouts(tcp_closing=0.5, other=0.5),
    )
    try:
        ports = both("web", endpoints(cluster, "node-2"), node_port=NODE_PORT)
        backend.sync(state(cluster, "node-2", *ports), True)
        udp_request(cluster.external.netns, node.ipv4, NODE_PORT)
        tcp_request(cluster.external.netns, node.ipv4, NODE_PORT)
        assert len(backend.datapath.ct_entries()) == 4
        deadline = time.monotonic() + 5
        while backend.datapath.ct_entries() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.datapath.ct_entries() == {}
        assert backend.gc_stats["ct_expired"] == 4
    finally:
        backend.cleanup()
