"""`lbd status` and `lbd cleanup` as an operator runs them on a node (inside its netns)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backends.base import HostUnsupported
from backends.registry import check_host
from lbd.testing.env import LbdEnv
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service
from lbd.testing.traffic import RequestRefused, RequestTimeout, tcp_request

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

HTTP = PortSpec(80, 8080, "TCP", "http", node_port=30555)


@pytest.fixture(scope="module", params=["iptables", "ebpf", "ipvs"])
def env(request):
    try:
        check_host(request.param)
    except HostUnsupported as err:
        pytest.skip(str(err))
    with LbdEnv(request.param) as e:
        e.apply(service("web", ["10.96.7.7"], [HTTP], type="NodePort"))
        e.apply(
            endpoint_slice("web", [EndpointSpec(p.ipv4, p.node) for p in e.cluster.pods], [HTTP])
        )
        e.wait_synced()
        yield e


def lbd(env: LbdEnv, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    # status/cleanup must look where this node's daemon keeps its datapath (ebpf: pins)
    argv = [sys.executable, "-m", "lbd", *args]
    if args[0] in ("status", "cleanup"):
        argv += env.location_args(node)
    return env.exec_in(node, argv, timeout=60)


def test_status_reads_the_kernel(env):
    proc = lbd(env, "node-1", "status", "--proxy-mode", env.mode, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    cluster_ip = [r for r in rows if r["frontend"].startswith("10.96.7.7:80")]
    assert len(cluster_ip) == 1 and cluster_ip[0]["service"].startswith("default/web")
    assert sorted(e.split(":")[0] for e in cluster_ip[0]["endpoints"]) == sorted(
        p.ipv4 for p in env.cluster.pods
    )
    assert any(r["kind"] == "NodePort" and "30555" in r["frontend"] for r in rows)
    table = lbd(env, "node-1", "status", "--proxy-mode", env.mode)
    assert "10.96.7.7:80" in table.stdout and "default/web" in table.stdout


def test_cleanup_removes_the_datapath_and_nothing_else(env):
    pod = env.cluster.pod("pod-2-1").netns
    assert tcp_request(pod, "10.96.7.7", 80).pod
    env.stop_daemon("node-2")
    proc = lbd(env, "node-2", "cleanup", "--proxy-mode", "all")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises((RequestTimeout, RequestRefused)):
        tcp_request(pod, "10.96.7.7", 80, timeout=1.0)
    after = lbd(env, "node-2", "status", "--proxy-mode", env.mode, "--json")
    assert json.loads(after.stdout) == []
    # node-1 is untouched
    assert tcp_request(env.cluster.pod("pod-1-1").netns, "10.96.7.7", 80).pod
