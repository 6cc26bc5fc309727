"""Security posture, as far as it can be observed from outside the daemon.

- The HTTP endpoints are read-only (any write method: 405) and listen only where
  configured: metrics (which include /state, the full service → endpoint map) on
  loopback only; healthz on its configured address; nothing else listens on the node.
- A health-check node port, reachable by anyone who can reach the node, answers every
  path with kube-proxy's small JSON document and leaks nothing else (no metrics, no
  state, no software versions).
- Files the daemon creates are not world-writable even under a umask of 0.
- No subprocess goes through a shell (static check of lbd/ and backends/).
- loadBalancerSourceRanges: kube-proxy applies them to the LoadBalancer IPs only (its
  KUBE-FW chain hangs off the LB IP rules; node ports, cluster IPs and external IPs jump
  straight to the service), to every client including pods. lbd must do the same.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from reliability_support import (
    STABLE_PORT,
    STABLE_VIP,
    all_endpoints,
    daemon_pid,
    ensure_running,
    http_request,
)

from lbd.testing.env import HEALTHZ_PORT, METRICS_PORT, LbdEnv, eventually
from lbd.testing.objects import PortSpec, endpoint_slice, service
from lbd.testing.traffic import RequestError, RequestRefused, RequestTimeout, tcp_request

pytestmark = [pytest.mark.reliability, pytest.mark.kernel]

REPO = Path(__file__).resolve().parents[2]
WRITE_METHODS = ("POST", "PUT", "DELETE", "PATCH")
HC_PORT = 32555
LOCAL_PORT = PortSpec(80, 8080, "TCP", "http", node_port=30555)
LB_IP = "203.0.113.77"
EXTERNAL_IP = "203.0.113.78"
RANGED_PORT = PortSpec(80, 8080, "TCP", "http", node_port=30556)
RANGED_LB_IP = "203.0.113.79"
RANGED_EXTERNAL_IP = "203.0.113.80"


def listeners(env: LbdEnv, node: str) -> set[tuple[str, int, str]]:
    """Every listening TCP socket and bound UDP socket in the node's namespace."""
    out = set()
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        text = env.exec_in(node, ["cat", f"/proc/net/{name}"]).stdout
        for line in text.splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            # TCP: LISTEN (0A). UDP: unconnected sockets show as state 07.
            if (proto == "tcp" and state != "0A") or (proto == "udp" and state != "07"):
                continue
            addr_hex, port_hex = local.split(":")
            out.add((_addr(addr_hex), int(port_hex, 16), proto))
    return out


def _addr(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6 prints four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


@pytest.fixture(scope="module")
def local_service(env: LbdEnv) -> None:
    """An externalTrafficPolicy: Local LoadBalancer with endpoints on node-1 only, so that
    every node runs a health-check server for it."""
    env.apply(
        service(
            "local",
            ["10.96.0.81"],
            [LOCAL_PORT],
            type="LoadBalancer",
            lb_ips=[LB_IP],
            external_ips=[EXTERNAL_IP],
            external_traffic_policy="Local",
            health_check_node_port=HC_PORT,
        )
    )
    on_node_1 = [e for e in all_endpoints(env) if e.node_name == "node-1"]
    env.apply(endpoint_slice("local", on_node_1, [LOCAL_PORT]))
    env.wait_synced(timeout=30)


def test_http_endpoints_are_read_only(env: LbdEnv, local_service: None) -> None:
    """Every write method on every daemon endpoint (and a health-check node port) is
    refused with 405, and changes nothing."""
    ns = env.cluster.netns_of("node-1")
    ext = env.cluster.external.netns
    node_ip = env.node("node-1").ipv4
    targets = [
        (ns, "127.0.0.1", HEALTHZ_PORT, "/healthz"),
        (ns, "127.0.0.1", HEALTHZ_PORT, "/livez"),
        (ns, "127.0.0.1", METRICS_PORT, "/metrics"),
        (ns, "127.0.0.1", METRICS_PORT, "/state"),
        (ns, "127.0.0.1", METRICS_PORT, "/proxyMode"),
        (ext, node_ip, HC_PORT, "/"),
    ]
    state_before = http_request(ns, "127.0.0.1", METRICS_PORT, "GET", "/state")[2]
    for where, host, port, path in targets:
        # A GET works (the endpoint exists), so a 405 is a refusal, not a 404.
        assert http_request(where, host, port, "GET", path)[0] == 200, (port, path)
        for method in WRITE_METHODS:
            status, headers, _ = http_request(where, host, port, method, path)
            assert status == 405, (method, port, path, status)
            assert set(headers["Allow"].split(",")) <= {"GET", "HEAD"}, headers
    assert http_request(ns, "127.0.0.1", METRICS_PORT, "GET", "/state")[2] == state_before


def test_listeners_are_only_where_configured(env: LbdEnv, local_service: None) -> None:
    """Metrics and /state on loopback only; healthz on its (default or configured)
    address; health-check node ports; nothing else listens on the node."""
    node1, node2 = env.node("node-1"), env.node("node-2")
    ext = env.cluster.external.netns
    expected = {
        ("0.0.0.0", HEALTHZ_PORT, "tcp"),
        ("127.0.0.1", METRICS_PORT, "tcp"),
        ("0.0.0.0", HC_PORT, "tcp"),
        ("::", HC_PORT, "tcp"),
    }
    assert listeners(env, "node-1") == expected
    # /state and /metrics are out of reach from the network, also from the node's own
    # fabric address; healthz (0.0.0.0 by default, as kube-proxy) is reachable.
    for where in (ext, env.cluster.netns_of("node-1")):
        with pytest.raises(RequestRefused):
            tcp_request(where, node1.ipv4, METRICS_PORT, timeout=1.0)
    assert http_request(ext, node1.ipv4, HEALTHZ_PORT, "GET", "/healthz")[0] == 200

    # Configured to loopback, healthz leaves the network too.
    env.stop_daemon("node-2")
    try:
        argv = env.daemon_argv("node-2") + ["--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}"]
        env.start_daemon("node-2", argv=argv)
        env.wait_synced(timeout=30)
        assert listeners(env, "node-2") == (expected - {("0.0.0.0", HEALTHZ_PORT, "tcp")}) | {
            ("127.0.0.1", HEALTHZ_PORT, "tcp")
        }
        with pytest.raises(RequestRefused):
            tcp_request(ext, node2.ipv4, HEALTHZ_PORT, timeout=1.0)
    finally:
        env.stop_daemon("node-2")
        env.start_daemon("node-2")


def test_health_check_node_port_serves_only_its_json(env: LbdEnv, local_service: None) -> None:
    """Whatever the path, a health-check node port answers kube-proxy's document for its
    own service and nothing else: no metrics, no state, no software versions."""
    ext = env.cluster.external.netns
    want = {
        "node-1": (200, {"namespace": "default", "name": "local"}, 2),
        "node-2": (503, {"namespace": "default", "name": "local"}, 0),
    }
    paths = ["/", "/healthz", "/metrics", "/state", "/proxyMode", "/../../etc/passwd", "/?a=b"]
    for node, (code, svc, count) in want.items():
        ip = env.node(node).ipv4
        eventually(lambda ip=ip, code=code: _status(ext, ip, code), timeout=10)
        for path in paths:
            status, headers, body = http_request(ext, ip, HC_PORT, "GET", path)
            assert status == code, (node, path, status)
            doc = json.loads(body)
            assert doc == {"service": svc, "localEndpoints": count, "serviceProxyHealthy": True}
            assert headers["Content-Type"].startswith("application/json")
            _no_versions(headers)
    # The daemon's own endpoints reachable from outside (healthz) do not advertise
    # versions either.
    _no_versions(http_request(ext, env.node("node-1").ipv4, HEALTHZ_PORT, "GET", "/healthz")[1])
    _no_versions(http_request(ext, env.node("node-1").ipv4, HEALTHZ_PORT, "POST", "/healthz")[1])


def _status(ns: str, ip: str, code: int) -> None:
    assert http_request(ns, ip, HC_PORT, "GET", "/")[0] == code


def _no_versions(headers: dict[str, str]) -> None:
    # aiohttp's default Server header names Python's and aiohttp's exact versions, which
    # tells anyone who can reach a node port which CVEs apply. kube-proxy sends none.
    server = headers.get("Server", "")
    assert "Python" not in server and "aiohttp" not in server, headers


RUNTIME_DIRS = ("/run", "/var/run", "/var/lib", "/tmp", "/dev/shm", "/sys/fs/bpf", "/etc")


def _new_world_writable(since: float) -> list[str]:
    """lbd-named files or directories created since `since` in the places a daemon
    keeps runtime state, that anyone may write (sticky directories excepted)."""
    found = []
    todo = [Path(d) for d in RUNTIME_DIRS if os.path.isdir(d)]
    while todo:
        top = todo.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            if "lbd" not in entry.name.lower():
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode) or st.st_ctime < since:
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append(Path(entry.path))
                if st.st_mode & stat.S_ISVTX:
                    continue
            if st.st_mode & stat.S_IWOTH:
                found.append(f"{entry.path} {stat.filemode(st.st_mode)}")
    return found


def test_runtime_files_are_not_world_writable(env: LbdEnv, local_service: None) -> None:
    """Under a umask of 0 (the worst an init system could hand it), nothing the daemon
    creates or holds open is writable by every user."""
    node = "node-2"
    env.stop_daemon(node)
    started = time.time() - 1.0
    log = open(env.log_path(node), "ab")  # noqa: SIM115 - handed to the child
    try:
        env.daemons[node] = env.cluster.popen(
            node, env.daemon_argv(node), stdout=log, stderr=subprocess.STDOUT, umask=0
        )
    finally:
        log.close()
    try:
        env.wait_healthy(node)
        env.wait_synced(timeout=30)
        pid = daemon_pid(env, node)
        with open(f"/proc/{pid}/status") as f:
            assert "Umask:\t0000" in f.read()  # the test really runs it under umask 0
        held = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if int(fd) <= 2:
                continue  # stdin/out/err belong to the supervisor (here: the harness)
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not target.startswith("/"):
                    continue  # sockets, pipes, event fds
                st = os.stat(target)
            except FileNotFoundError:
                # The daemon keeps working while we look: a periodic sync's subprocess
                # pipes or a temporary file can close between listdir and readlink.
                continue
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and st.st_mode & 0o002:
                held.append(f"{target} {stat.filemode(st.st_mode)}")
        assert held == []
        assert _new_world_writable(started) == []
    finally:
        env.stop_daemon(node)
        env.start_daemon(node)


# Calls that run a command line through /bin/sh (or equivalent).
_SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}


def _shell_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    # Names bound by `from os import system` and the like, and module aliases.
    direct: dict[str, tuple[str, str]] = {}
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                direct[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = alias.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called: tuple[str, str] | None = None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            called = (modules.get(func.value.id, func.value.id), func.attr)
        elif isinstance(func, ast.Name):
            called = direct.get(func.id)
        if called in _SHELL_CALLS or (called and called[1] == "create_subprocess_shell"):
            found.append(f"{path}:{node.lineno} {'.'.join(called)}")
        for kw in node.keywords:
            # shell=<anything but a literal False> may hand object data to a shell.
            if kw.arg == "shell" and not (
                isinstance(kw.value, ast.Constant) and kw.value.value is False
            ):
                found.append(f"{path}:{node.lineno} shell=")
    return found


def test_no_subprocess_goes_through_a_shell() -> None:
    """Object data (names, IPs, ports) reaches iptables and friends as argv or stdin,
    never through a shell: no shell=True, os.system, os.popen or the like anywhere in
    lbd/ or backends/. (Static, so not repeated per proxy mode.)"""
    files = sorted(p for d in ("lbd", "backends") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20, files  # the tree was found
    found = [hit for path in files for hit in _shell_uses(path)]
    assert found == []


def test_load_balancer_source_ranges_apply_to_lb_ips_only(env: LbdEnv) -> None:
    """Sources outside loadBalancerSourceRanges are dropped at the LB IP (pods too);
    the node port, cluster IP and external IP of the same service stay open, as with
    kube-proxy."""
    ensure_running(env, "node-2")
    env.apply(
        service(
            "ranged",
            ["10.96.0.82"],
            [RANGED_PORT],
            type="LoadBalancer",
            lb_ips=[RANGED_LB_IP],
            external_ips=[RANGED_EXTERNAL_IP],
            # node-2's pods are allowed; the external client and node-1's pods are not.
            source_ranges=["198.51.100.0/24", env.node("node-2").pod_cidr_v4],
        )
    )
    env.apply(endpoint_slice("ranged", all_endpoints(env), [RANGED_PORT]))
    env.wait_synced(timeout=30)
    ext = env.cluster.external.netns
    pod1 = env.cluster.pod("pod-1-1").netns
    pod2 = env.cluster.pod("pod-2-1").netns

    def reaches(ns: str, ip: str, port: int) -> bool:
        try:
            tcp_request(ns, ip, port, timeout=1.0)
        except RequestTimeout:
            return False  # dropped: a firewall, not a missing service (that refuses)
        return True

    # The LB IP: only sources inside the ranges.
    assert not reaches(ext, RANGED_LB_IP, 80)
    assert not reaches(pod1, RANGED_LB_IP, 80)
    assert reaches(pod2, RANGED_LB_IP, 80)
    # Every other frontend of the service ignores the ranges (kube-proxy's behaviour).
    assert reaches(ext, env.node("node-1").ipv4, RANGED_PORT.node_port)
    assert reaches(ext, env.node("node-2").ipv4, RANGED_PORT.node_port)
    assert reaches(ext, RANGED_EXTERNAL_IP, 80)
    assert reaches(pod1, "10.96.0.82", 80)
    # The stable service next to it is not affected at all.
    try:
        tcp_request(ext, env.node("node-1").ipv4, STABLE_PORT.node_port, timeout=1.0)
        tcp_request(pod1, STABLE_VIP, 80, timeout=1.0)
    except RequestError as err:
        raise AssertionError(err) from None
