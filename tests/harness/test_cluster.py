"""The netns mini-cluster behaves like a cluster network and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lbd.testing import netns
from lbd.testing.cluster import MiniCluster
from lbd.testing.traffic import (
    RequestRefused,
    RequestTimeout,
    RequestUnreachable,
    SteadyTraffic,
    spread,
    tcp_request,
    udp_request,
)

pytestmark = pytest.mark.kernel

PORT = 8080
CLOSED_PORT = 8099
NODE_PORT = 9000
REQUEST = {"tcp": tcp_request, "udp": udp_request}


@pytest.fixture(scope="module")
def cluster() -> Iterator[MiniCluster]:
    with MiniCluster(nodes=2, pods_per_node=2) as c:
        c.start_servers(ports_tcp=(PORT,), ports_udp=(PORT,))
        for node in c.nodes:
            c.serve_on(node, ports_tcp=(NODE_PORT,), ports_udp=(NODE_PORT,))
        yield c


def _root_network_view() -> dict[str, str]:
    views = {
        "link": ["ip", "-o", "link"],
        "addr": ["ip", "-o", "addr"],
        "route4": ["ip", "route"],
        "route6": ["ip", "-6", "route"],
    }
    return {k: subprocess.run(v, capture_output=True, text=True).stdout for k, v in views.items()}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize(
    "client,server", [("pod-1-1", "pod-1-2"), ("pod-1-1", "pod-2-1"), ("pod-2-2", "pod-1-1")]
)
def test_pods_reach_pods_with_their_own_source_address(
    cluster: MiniCluster, client: str, server: str, family: str, proto: str
) -> None:
    src, dst = cluster.pod(client), cluster.pod(server)
    reply = REQUEST[proto](src.netns, getattr(dst, family), PORT)
    assert reply.pod == server
    assert reply.client_ip == getattr(src, family)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_external_client_and_pods_reach_a_node(cluster: MiniCluster, family: str) -> None:
    node = cluster.node("node-2")
    ext = cluster.external
    reply = tcp_request(ext.netns, getattr(node, family), NODE_PORT)
    assert (reply.pod, reply.client_ip) == ("node-2", getattr(ext, family))
    reply = udp_request(ext.netns, getattr(node, family), NODE_PORT)
    assert (reply.pod, reply.client_ip) == ("node-2", getattr(ext, family))
    pod = cluster.pod("pod-1-1")
    reply = tcp_request(pod.netns, getattr(node, family), NODE_PORT)
    assert (reply.pod, reply.client_ip) == ("node-2", getattr(pod, family))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_external_client_has_no_route_to_pods(cluster: MiniCluster, family: str) -> None:
    start = time.monotonic()
    with pytest.raises((RequestUnreachable, RequestTimeout)):
        tcp_request(cluster.external.netns, getattr(cluster.pods[0], family), PORT, timeout=0.5)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_closed_port_is_reported_as_refused(cluster: MiniCluster, proto: str, family: str) -> None:
    src, dst = cluster.pod("pod-1-1"), cluster.pod("pod-2-1")
    with pytest.raises(RequestRefused):
        REQUEST[proto](src.netns, getattr(dst, family), CLOSED_PORT, timeout=1.0)


def test_external_ranges_follow_route_external_via(cluster: MiniCluster) -> None:
    # Both nodes own the same "load balancer" address; which one answers shows
    # where the external client's route points.
    vip4, vip6 = "203.0.113.10", "2001:db8:1b::10"
    for node in cluster.nodes:
        cluster.exec(node, ["ip", "addr", "add", f"{vip4}/32", "dev", "lo"])
        cluster.exec(node, ["ip", "addr", "add", f"{vip6}/128", "dev", "lo", "nodad"])
    ext = cluster.external.netns
    try:
        assert tcp_request(ext, vip4, NODE_PORT).pod == "node-1"
        assert tcp_request(ext, vip6, NODE_PORT).pod == "node-1"
        cluster.route_external_via("node-2")
        assert tcp_request(ext, vip4, NODE_PORT).pod == "node-2"
        assert udp_request(ext, vip6, NODE_PORT).pod == "node-2"
    finally:
        cluster.route_external_via("node-1")
        for node in cluster.nodes:
            cluster.exec(node, ["ip", "addr", "del", f"{vip4}/32", "dev", "lo"], check=False)
            cluster.exec(node, ["ip", "addr", "del", f"{vip6}/128", "dev", "lo"], check=False)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("ab") is None, reason="no curl/ab")
def test_http_clients_get_the_echo_line(cluster: MiniCluster) -> None:
    dst = cluster.pod("pod-2-2")
    out = cluster.exec("pod-1-1", ["curl", "-sf", f"http://[{dst.ipv6}]:{PORT}/"]).stdout
    assert out.split()[:2] == ["pod-2-2", cluster.pod("pod-1-1").ipv6]
    # ab speaks HTTP/1.0 and expects the server to close each connection.
    ab = cluster.exec("pod-1-2", ["ab", "-n", "300", "-c", "20", f"http://{dst.ipv4}:{PORT}/"])
    assert "Complete requests:      300" in ab.stdout
    assert "Failed requests:        0" in ab.stdout
    # ab -k keeps connections open (HTTP/1.0 keep-alive), as wrk does with 1.1.
    ab = cluster.exec(
        "pod-1-2", ["ab", "-k", "-n", "300", "-c", "10", f"http://{dst.ipv4}:{PORT}/"]
    )
    assert "Keep-Alive requests:    300" in ab.stdout
    assert "Failed requests:        0" in ab.stdout


def test_echo_and_probe_run_as_processes(cluster: MiniCluster) -> None:
    proc = cluster.start_server_process("pod-2-2", ports_tcp=(7000,), ports_udp=(7001,))
    try:
        probe = [sys.executable, "-m", "lbd.testing.traffic"]
        dst = cluster.pod("pod-2-2")
        tcp = cluster.exec("pod-1-1", [*probe, "tcp", dst.ipv4, "7000", "--count", "5", "--json"])
        udp = cluster.exec("pod-1-1", [*probe, "udp", dst.ipv6, "7001", "--count", "5", "--json"])
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    assert json.loads(tcp.stdout) == {
        "ok": 5,
        "failed": 0,
        "pods": {"pod-2-2": 5},
        "client_ips": ["10.244.1.11"],
        "failures": {},
    }
    assert json.loads(udp.stdout)["client_ips"] == ["fd00:244:1::11"]
    refused = cluster.exec(
        "pod-1-1", [*probe, "tcp", dst.ipv4, str(CLOSED_PORT), "--json"], check=False
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["failures"] == {"refused": 1}


def test_steady_traffic_records_every_outcome(cluster: MiniCluster) -> None:
    src, dst = cluster.pod("pod-1-1"), cluster.pod("pod-2-1")
    with SteadyTraffic(src.netns, dst.ipv4, PORT, rate=50) as good:
        assert good.wait_for(10)
    assert good.failures == [] and good.pods() == {"pod-2-1": len(good.samples)}
    with SteadyTraffic(src.netns, dst.ipv4, CLOSED_PORT, proto="udp", rate=50) as bad:
        assert bad.wait_for(5)
    assert {s.error for s in bad.failures} == {"refused"} and bad.successes == []


def test_spread_counts_answers_and_failures(cluster: MiniCluster) -> None:
    src, dst = cluster.pod("pod-2-2"), cluster.pod("pod-1-2")
    result = spread(src.netns, dst.ipv6, PORT, proto="udp", count=20)
    assert result.pods == {"pod-1-2": 20} and result.client_ips == {src.ipv6}
    result = spread(src.netns, dst.ipv4, CLOSED_PORT, count=3)
    assert result.ok == 0 and result.failures == {"refused": 3}


def test_cleanup_removes_everything_even_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), MiniCluster(nodes=1, pods_per_node=1) as c:
        names = c.namespaces
        assert all(netns.exists(n) for n in names)
        c.start_servers()
        sleeper = c.popen("node-1", ["sleep", "60"])
        raise RuntimeError("boom")
    assert not any(netns.exists(n) for n in names)
    assert sleeper.poll() is not None
    assert not netns.owner_alive(c.prefix)


def test_a_cluster_lifetime_leaves_the_root_namespace_unchanged() -> None:
    before = _root_network_view()
    with MiniCluster(nodes=2, pods_per_node=1) as c:
        c.start_servers()
        c.route_external_via("node-2")
        assert tcp_request(c.pods[0].netns, c.pods[1].ipv6, PORT).pod == "pod-2-1"
    assert _root_network_view() == before


def test_sweep_removes_leftovers_but_not_live_clusters() -> None:
    leftover = f"{netns.DEFAULT_PREFIX}x{os.getpid() % 1000:03d}-n1"
    netns.create(leftover)
    try:
        orphan = netns.popen(leftover, ["sleep", "60"])
        with MiniCluster(nodes=1, pods_per_node=1) as live:
            deadline = time.monotonic() + 5
            while netns.exists(leftover) and not netns.pids(leftover):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            netns.sweep(netns.DEFAULT_PREFIX)
            # (A concurrent test session's sweep may have got there first.)
            assert not netns.exists(leftover)
            assert orphan.wait(timeout=5) is not None
            assert all(netns.exists(n) for n in live.namespaces)
    finally:
        netns.delete(leftover)


def test_build_and_teardown_are_fast() -> None:
    with MiniCluster(nodes=2, pods_per_node=2) as c:
        pass
    assert c.build_seconds is not None and c.build_seconds < 5
    assert c.teardown_seconds is not None and c.teardown_seconds < 5
