"""Socket-level load balancing against a real kernel: cgroup programs + a netns mini-cluster.

node-1's EbpfBackend attaches its socket-LB programs to a child cgroup of a private subtree
(`CgroupSandbox`: /run/lbd/cgroupv2/lbdt-xxxx/node-1) and pins its maps under
/sys/fs/bpf/lbd/lbdt-xxxx-node-1/. Clients are subprocesses started inside that cgroup and
inside a pod's (or the node's) network namespace; the echo servers in the pods say who
answered and which client address they saw. Nothing is attached anywhere else, and every
test module removes what it attached (asserted at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ebpf_support import EBPF_KERNEL_MARKS

from backends.ebpf import EbpfBackend
from backends.ebpf.cgroups import CgroupSandbox
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName
from lbd.testing.cluster import MiniCluster, Pod

pytestmark = EBPF_KERNEL_MARKS

# The VM runs (scripts/vm-test) stretch waits by this factor (see tests/vm/timeouts.py).
TIMEOUT_SCALE = float(os.environ.get("LBD_TEST_TIMEOUT_SCALE", "1") or 1)

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP = Protocol.TCP, Protocol.UDP
VIP = "10.96.0.10"
VIP6 = "fd00:96::10"
REPO = Path(__file__).resolve().parents[2]

# Connects to a frontend over TCP and UDP (unconnected sendto/recvfrom) and reports what
# getpeername()/recvfrom() say, plus the echo replies.
PEER_SCRIPT = r"""
import json, socket, sys
ip, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
s = socket.socket(fam)
s.settimeout(3)
s.connect((ip, tport))
peer = list(s.getpeername()[:2])
s.sendall(b"ping\n")
tcp_reply = s.recv(200).decode().split()
u = socket.socket(fam, socket.SOCK_DGRAM)
u.settimeout(3)
u.sendto(b"ping\n", (ip, uport))
data, src = u.recvfrom(200)
print(json.dumps({"peer": peer, "tcp": tcp_reply, "udp": data.decode().split(),
                  "udp_from": list(src[:2])}))
"""

# A TCP server answering every line of every connection until the client closes: an
# "established connection" that outlives a daemon restart.
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

# Reads lines from stdin, sends each over one connection to the frontend, prints the reply
# and what getpeername() says.
LINE_CLIENT = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((ip, port), timeout=5)
f = s.makefile("rwb")
for line in sys.stdin:
    f.write(line.encode())
    f.flush()
    reply = f.readline().decode().strip()
    print(reply, s.getpeername()[0], s.getpeername()[1], flush=True)
"""


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[MiniCluster]:
    with MiniCluster(nodes=2, pods_per_node=2) as c:
        c.start_servers(ports_tcp=(8080,), ports_udp=(8080,))
        yield c


@pytest.fixture(scope="module")
def sandbox() -> Iterator[CgroupSandbox]:
    with CgroupSandbox() as sb:
        yield sb


def bpffs_dir(sandbox: CgroupSandbox, node: str) -> str:
    return f"/sys/fs/bpf/lbd/{sandbox.name}-{node}"


@pytest.fixture(scope="module")
def node1(cluster: MiniCluster, sandbox: CgroupSandbox) -> Iterator[EbpfBackend]:
    backend = EbpfBackend(
        netns=cluster.nodes[0].netns,
        cgroup=str(sandbox.node("node-1")),
        bpffs=bpffs_dir(sandbox, "node-1"),
        gc_interval=0,
    )
    try:
        yield backend
    finally:
        backend.cleanup()
    assert not Path(bpffs_dir(sandbox, "node-1")).exists()
    assert bpftool_cgroup(sandbox.node("node-1")) == []


# --- helpers ----------------------------------------------------------------------------------


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
        name=ServicePortName("default", name, "p", protocol),
        family=family,
        cluster_ip=vip,
        port=port,
        protocol=protocol,
        cluster_endpoints=eps,
        all_endpoints=eps,
        **kw,  # type: ignore[arg-type]
    )


def state(cluster: MiniCluster, node: str, *ports: ServicePort) -> ProxyState:
    return ProxyState(
        node_name=node,
        node_ips=cluster.node(node).ips,
        service_ports={(p.name, p.family): p for p in ports},
    )


def probe(
    sandbox: CgroupSandbox,
    cgroup: Path | None,
    netns: str,
    ip: str,
    port: int,
    proto: str = "tcp",
    count: int = 20,
    timeout: float = 1.0,
) -> dict:
    """`python -m lbd.testing.traffic` as a subprocess in `cgroup` (None: outside)."""
    argv = [sys.executable, "-m", "lbd.testing.traffic", proto, ip, str(port)]
    argv += ["--count", str(count), "--json", "--timeout", str(timeout)]
    if cgroup is None:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, cwd=REPO
        )
    else:
        proc = sandbox.run(cgroup, netns, argv, cwd=REPO)
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def bpftool_cgroup(cgroup: Path) -> list[dict]:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True
    )
    return json.loads(out.stdout.strip() or "[]")


def bpftool_dump(path: str) -> list[dict]:
    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", path], capture_output=True, text=True, check=True
    )
    # with BTF, bpftool adds the decoded entry under "formatted"
    return [e.get("formatted", e) for e in json.loads(out.stdout)]


# --- tests ------------------------------------------------------------------------------------


def test_cluster_ip_spreads_over_every_pod(cluster, sandbox, node1):
    result = node1.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), True)
    assert result.full and result.changed_service_ports == 1
    client = cluster.pod("pod-1-1")
    out = probe(sandbox, sandbox.node("node-1"), client.netns, VIP, 80, count=60)
    assert out["failed"] == 0, out
    assert set(out["pods"]) == {p.name for p in cluster.pods}
    # no NAT on the packets: the pods see the client pod itself
    assert out["client_ips"] == [client.ipv4]
    # from the node's own namespace (a hostNetwork process) too
    out = probe(sandbox, sandbox.node("node-1"), cluster.nodes[0].netns, VIP, 80, count=20)
    assert out["failed"] == 0 and set(out["pods"]) <= {p.name for p in cluster.pods}


def test_processes_outside_the_cgroup_are_not_balanced(cluster, sandbox, node1):
    node1.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), False)
    out = probe(sandbox, None, cluster.pod("pod-1-1").netns, VIP, 80, count=3)
    assert out["ok"] == 0 and out["failed"] == 3


def test_programs_are_visible_to_bpftool(cluster, sandbox, node1):
    node1.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), False)
    attached = {(p["name"], p["attach_type"]) for p in bpftool_cgroup(sandbox.node("node-1"))}
    assert ("lbd_sock_connect4", "cgroup_inet4_connect") in attached
    assert ("lbd_sock_getpeername6", "cgroup_inet6_getpeername") in attached
    assert len(attached) == 8
    # the services map, read by an independent tool: one head + four slots for the VIP
    entries = bpftool_dump(f"{node1.bpffs}/lbd_services")
    vip_key = [10, 96, 0, 10]
    mine = [e for e in entries if _addr_bytes(e["key"]["addr"])[:4] == vip_key]
    assert sorted(e["key"]["slot"] for e in mine) == [0, 1, 2, 3, 4]
    head = next(e for e in mine if e["key"]["slot"] == 0)
    assert head["value"]["count"] == 4


def _addr_bytes(addr: list) -> list[int]:
    # bpftool prints __be32 addr[4] as four host-order integers
    out: list[int] = []
    for word in addr:
        out += list(int(word).to_bytes(4, "little"))
    return out


def test_getpeername_and_recvfrom_report_the_frontend(cluster, sandbox, node1):
    ports = (
        svc("web", endpoints(cluster, "node-1")),
        svc("dns", endpoints(cluster, "node-1"), port=53, protocol=UDP),
    )
    node1.sync(state(cluster, "node-1", *ports), False)
    argv = [sys.executable, "-c", PEER_SCRIPT, VIP, "80", "53"]
    proc = sandbox.run(sandbox.node("node-1"), cluster.pod("pod-1-2").netns, argv, check=True)
    out = json.loads(proc.stdout)
    assert out["peer"] == [VIP, 80]
    assert out["udp_from"] == [VIP, 53]
    assert out["tcp"][0].startswith("pod-") and out["udp"][0].startswith("pod-")
    assert out["tcp"][1] == cluster.pod("pod-1-2").ipv4


def test_udp_cluster_ip(cluster, sandbox, node1):
    dns = svc("dns", endpoints(cluster, "node-1"), port=53, protocol=UDP)
    node1.sync(state(cluster, "node-1", dns), False)
    out = probe(sandbox, sandbox.node("node-1"), cluster.pod("pod-1-1").netns, VIP, 53, "udp", 40)
    assert out["failed"] == 0, out
    assert set(out["pods"]) == {p.name for p in cluster.pods}


def test_ipv6_cluster_ip(cluster, sandbox, node1):
    web6 = svc("web6", endpoints(cluster, "node-1", v6=True), vip=VIP6, family=V6)
    node1.sync(state(cluster, "node-1", web6), False)
    client = cluster.pod("pod-1-1")
    out = probe(sandbox, sandbox.node("node-1"), client.netns, VIP6, 80, count=40)
    assert out["failed"] == 0, out
    assert set(out["pods"]) == {p.name for p in cluster.pods}
    assert out["client_ips"] == [client.ipv6]
    argv = [sys.executable, "-c", PEER_SCRIPT, VIP6, "80", "80"]
    udp6 = svc("udp6", endpoints(cluster, "node-1", v6=True), vip=VIP6, family=V6, protocol=UDP)
    node1.sync(state(cluster, "node-1", web6, udp6), False)
    proc = sandbox.run(sandbox.node("node-1"), client.netns, argv, check=True)
    out = json.loads(proc.stdout)
    assert out["peer"] == [VIP6, 80] and out["udp_from"] == [VIP6, 80]


def test_no_endpoints_is_refused_at_once(cluster, sandbox, node1):
    ports = (svc("web", ()), svc("dns", (), port=53, protocol=UDP))
    node1.sync(state(cluster, "node-1", *ports), False)
    client = cluster.pod("pod-1-1").netns
    start = time.monotonic()
    out = probe(sandbox, sandbox.node("node-1"), client, VIP, 80, count=3, timeout=3)
    assert out["failures"] == {"refused": 3}
    out = probe(sandbox, sandbox.node("node-1"), client, VIP, 53, "udp", count=3, timeout=3)
    assert out["failures"] == {"refused": 3}
    # a refusal, not a timeout (the whole run includes three interpreter starts, which
    # emulation slows down: the bound stretches with LBD_TEST_TIMEOUT_SCALE; the probe
    # itself already tells a refusal from its 3 s timeout)
    assert time.monotonic() - start < 5 * TIMEOUT_SCALE
    # and the first endpoint makes it work
    node1.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), False)
    assert probe(sandbox, sandbox.node("node-1"), client, VIP, 80, count=5)["ok"] == 5


def test_session_affinity_pins_a_client(cluster, sandbox, node1):
    web = svc("web", endpoints(cluster, "node-1"), session_affinity_timeout=60)
    node1.sync(state(cluster, "node-1", web), False)
    out = probe(sandbox, sandbox.node("node-1"), cluster.pod("pod-1-1").netns, VIP, 80, count=30)
    assert out["failed"] == 0 and len(out["pods"]) == 1, out
    # without affinity the same client spreads again
    node1.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), False)
    out = probe(sandbox, sandbox.node("node-1"), cluster.pod("pod-1-1").netns, VIP, 80, count=40)
    assert len(out["pods"]) > 1


def test_internal_traffic_policy_local(cluster, sandbox, node1):
    web = svc("web", endpoints(cluster, "node-1"), internal_policy_local=True)
    node1.sync(state(cluster, "node-1", web), False)
    out = probe(sandbox, sandbox.node("node-1"), cluster.pod("pod-1-1").netns, VIP, 80, count=30)
    assert out["failed"] == 0
    assert set(out["pods"]) == {"pod-1-1", "pod-1-2"}


def test_external_frontends_from_inside_use_every_endpoint(cluster, sandbox, node1):
    node = cluster.nodes[0]
    web = svc(
        "web",
        endpoints(cluster, "node-1"),
        node_port=30080,
        load_balancer_ips=("203.0.113.20",),
        external_policy_local=True,
    )
    node1.sync(state(cluster, "node-1", web), False)
    for ip, port in ((node.ipv4, 30080), ("203.0.113.20", 80)):
        out = probe(
            sandbox, sandbox.node("node-1"), cluster.pod("pod-1-1").netns, ip, port, count=40
        )
        assert out["failed"] == 0, out
        # in-cluster clients are not subject to externalTrafficPolicy: Local
        assert set(out["pods"]) == {p.name for p in cluster.pods}


def test_maglev_selection(cluster, sandbox):
    backend = EbpfBackend(
        netns=cluster.nodes[1].netns,
        cgroup=str(sandbox.node("node-2")),
        bpffs=bpffs_dir(sandbox, "node-2"),
        lb_algorithm="maglev",
        maglev_table_size=1021,
        gc_interval=0,
    )
    try:
        backend.sync(state(cluster, "node-2", svc("web", endpoints(cluster, "node-2"))), True)
        client = cluster.pod("pod-2-1").netns
        out = probe(sandbox, sandbox.node("node-2"), client, VIP, 80, count=60)
        assert out["failed"] == 0, out
        # the socket cookie is hashed: different sockets land on different backends
        assert set(out["pods"]) == {p.name for p in cluster.pods}
        tables = bpftool_dump(f"{backend.bpffs}/lbd_maglev")
        assert len(tables) == 1 and len(tables[0]["value"]["backend_ids"]) == 1021
        assert len(set(tables[0]["value"]["backend_ids"])) == 4
    finally:
        backend.cleanup()
    assert bpftool_cgroup(sandbox.node("node-2")) == []
    out = probe(sandbox, sandbox.node("node-2"), cluster.pod("pod-2-1").netns, VIP, 80, count=2)
    assert out["ok"] == 0


def test_restart_readopts_pinned_maps_and_keeps_connections(cluster, sandbox):
    server_pod = cluster.pod("pod-2-1")
    cluster.popen(
        server_pod,
        [sys.executable, "-c", LINE_SERVER, server_pod.name, "9000"],
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.readline()
    cg = sandbox.node("node-1r")
    pin = bpffs_dir(sandbox, "node-1r")
    long_lived = svc("long", endpoints(cluster, "node-1", [server_pod], port=9000), port=90)
    web = svc("web", endpoints(cluster, "node-1"))
    st = state(cluster, "node-1", long_lived, web)
    first = EbpfBackend(netns=cluster.nodes[0].netns, cgroup=str(cg), bpffs=pin, gc_interval=0)
    second = None
    client = None
    try:
        first.sync(st, True)
        client = sandbox.popen(
            cg,
            cluster.pod("pod-1-1").netns,
            [sys.executable, "-c", LINE_CLIENT, VIP, "90"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        client.stdin.write("before\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["pod-2-1", "before", VIP, "90"]

        # the daemon exits (programs and maps stay): new connections still work
        first.close()
        out = probe(sandbox, cg, cluster.pod("pod-1-2").netns, VIP, 80, count=10)
        assert out["failed"] == 0, out

        # a new daemon re-adopts the pinned maps: nothing to rewrite
        second = EbpfBackend(netns=cluster.nodes[0].netns, cgroup=str(cg), bpffs=pin, gc_interval=0)
        result = second.sync(st, True)
        assert result.changed_service_ports == 0, result.detail
        assert not any(k.endswith(("_write", "_delete")) for k in result.detail), result.detail
        assert len(bpftool_cgroup(cg)) == 8  # replaced in place, not doubled

        client.stdin.write("after\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["pod-2-1", "after", VIP, "90"]
        out = probe(sandbox, cg, cluster.pod("pod-1-2").netns, VIP, 80, count=20)
        assert out["failed"] == 0 and len(out["pods"]) > 1
    finally:
        if client is not None:
            client.kill()
            client.wait()
        (second or first).cleanup()
    assert not Path(pin).exists()
    assert bpftool_cgroup(cg) == []


def test_cleanup_removes_programs_and_pins(cluster, sandbox):
    cg = sandbox.node("node-1c")
    pin = bpffs_dir(sandbox, "node-1c")
    backend = EbpfBackend(netns=cluster.nodes[0].netns, cgroup=str(cg), bpffs=pin, gc_interval=0)
    try:
        backend.sync(state(cluster, "node-1", svc("web", endpoints(cluster, "node-1"))), True)
        assert len(bpftool_cgroup(cg)) == 8 and Path(pin, "lbd_services").exists()
        assert probe(sandbox, cg, cluster.pod("pod-1-1").netns, VIP, 80, count=3)["ok"] == 3
    finally:
        backend.cleanup()
    assert bpftool_cgroup(cg) == []
    assert not Path(pin).exists()
    assert probe(sandbox, cg, cluster.pod("pod-1-1").netns, VIP, 80, count=2)["ok"] == 0
    # a second cleanup (e.g. `lbd cleanup` after a crash) is harmless
    EbpfBackend(netns=cluster.nodes[0].netns, cgroup=str(cg), bpffs=pin).cleanup()


def test_a_full_sync_reattaches_a_removed_link(cluster, sandbox, node1):
    st = state(cluster, "node-1", svc("web", endpoints(cluster, "node-1")))
    node1.sync(st, False)
    assert not node1.needs_full_sync()
    # unpinning a link (lbd holds no other reference) detaches its program
    Path(node1.bpffs, "links", "lbd_sock_connect4").unlink()
    cg = sandbox.node("node-1")
    assert probe(sandbox, cg, cluster.pod("pod-1-1").netns, VIP, 80, count=2)["ok"] == 0
    assert node1.needs_full_sync()
    node1.sync(st, True)
    assert not node1.needs_full_sync()
    assert probe(sandbox, cg, cluster.pod("pod-1-1").netns, VIP, 80, count=5)["ok"] == 5


# Unconnected UDP: several sockets, several datagrams each (sendto + recvfrom).
UDP_SOCKETS = r"""
import json, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(12):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    pods = set()
    for _ in range(5):
        u.sendto(b"ping\n", (ip, port))
        data, src = u.recvfrom(200)
        assert src[:2] == (ip, port), src
        pods.add(data.split()[0].decode())
    out.append(sorted(pods))
    u.close()
print(json.dumps(out))
"""


def test_unconnected_udp_sticks_per_socket(cluster, sandbox, node1):
    dns = svc("dns", endpoints(cluster, "node-1"), port=53, protocol=UDP)
    node1.sync(state(cluster, "node-1", dns), False)
    argv = [sys.executable, "-c", UDP_SOCKETS, VIP, "53"]
    proc = sandbox.run(sandbox.node("node-1"), cluster.pod("pod-1-1").netns, argv, check=True)
    per_socket = json.loads(proc.stdout)
    # every datagram of one socket reaches the same pod (as a conntrack entry would)...
    assert all(len(pods) == 1 for pods in per_socket), per_socket
    # ...and different sockets spread
    assert len({pods[0] for pods in per_socket}) > 1


# One UDP socket: to the frontend, then straight to the backend it was given, then back.
UDP_THEN_DIRECT = r"""
import json, socket, sys
vip, vport, pod, pport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
out = []
for dst in ((vip, vport), (pod, pport), (vip, vport)):
    u.sendto(b"ping\n", dst)
    data, src = u.recvfrom(200)
    out.append([data.split()[0].decode(), list(src[:2])])
print(json.dumps(out))
"""


def test_udp_socket_talking_to_its_backend_directly_sees_the_backend(cluster, sandbox, node1):
    pod = cluster.pod("pod-1-2")
    only = svc("dns", endpoints(cluster, "node-1", [pod]), port=53, protocol=UDP)
    node1.sync(state(cluster, "node-1", only), False)
    argv = [sys.executable, "-c", UDP_THEN_DIRECT, VIP, "53", pod.ipv4, "8080"]
    proc = sandbox.run(sandbox.node("node-1"), cluster.pod("pod-1-1").netns, argv, check=True)
    assert json.loads(proc.stdout) == [
        [pod.name, [VIP, 53]],
        [pod.name, [pod.ipv4, 8080]],
        [pod.name, [VIP, 53]],
    ]
