"""LbdEnv: a whole cluster under test — mini-cluster, test API server, one lbd per node.

The API server listens inside the fabric namespace (on 192.168.200.1, the "control
plane" address), so the daemons, which run as real `lbd run` processes inside their node
namespaces, reach it over the simulated network exactly as kube-proxy reaches a real
API server. The test process drives it in-process (objects are written straight into
the server, which emits the same watch events an HTTP write would).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lbd.testing import netns
from lbd.testing.apiserver import ApiServer
from lbd.testing.cluster import MiniCluster, Node
from lbd.testing.objects import node as node_object
from lbd.testing.traffic import Spread, spread

CONTROL_PLANE_V4 = "192.168.200.1"
CONTROL_PLANE_V6 = "fd00:200::1"
API_PORT = 6443
CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/32"
SERVICE_CIDR_V4 = "10.96.0.0/16"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
TOKEN = "lbd-test-token"
BPFFS_TEST_ROOT = Path("/run/lbd/bpffs")

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.1) -> T:
    """Retry `check` until it returns without raising (its value), or re-raise at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError, Exception):
            if time.monotonic() >= deadline:
                raise
            time.sleep(interval)


def http_get(
    ns: str | None, host: str, port: int, path: str, timeout: float = 2.0
) -> tuple[int, str]:
    """GET from inside a namespace; (status, body)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = netns.socket_in(ns, family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        sock.close()


class ApiServerThread:
    """The test API server on its own event loop thread, listening in a namespace."""

    def __init__(self, ns: str, host: str, port: int, **server_kwargs: Any) -> None:
        self.ns, self.host, self.port = ns, host, port
        self.server = ApiServer(token=TOKEN, **server_kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="apiserver")
        self._thread.start()

    def _socket(self) -> socket.socket:
        sock = netns.socket_in(self.ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        return sock

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.call(self.server.start_on_socket(self._socket()))

    def stop(self, keep_data: bool = True) -> None:
        self.call(self.server.stop(keep_data=keep_data))

    def close(self) -> None:
        if self.server.running:
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class LbdEnv:
    """Mini-cluster + API server + lbd daemons. Use as a context manager."""

    def __init__(
        self,
        mode: str = "iptables",
        *,
        nodes: int = 2,
        pods_per_node: int = 2,
        ipv6: bool = True,
        tcp_ports: Sequence[int] = (8080, 9090),
        udp_ports: Sequence[int] = (8080,),
        daemon_args: Sequence[str] = (),
        start_daemons: bool = True,
        zones: Sequence[str] | None = None,
    ) -> None:
        self.mode = mode
        self.cluster = MiniCluster(nodes=nodes, pods_per_node=pods_per_node, ipv6=ipv6)
        self.tcp_ports, self.udp_ports = tuple(tcp_ports), tuple(udp_ports)
        self.daemon_args = list(daemon_args)
        self._start_daemons = start_daemons
        self.zones = zones
        self.workdir = Path(tempfile.mkdtemp(prefix="lbd-env-"))
        os.chmod(self.workdir, 0o700)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.api: ApiServerThread | None = None
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        # ebpf mode: socket LB acts on a cgroup, so each simulated node gets its own
        # (never the hierarchy's root: that would balance every process of the kernel).
        self.cgroups: Any = None

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LbdEnv:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> None:
        c = self.cluster.up()
        if self.mode == "ebpf":
            from backends.ebpf.cgroups import CgroupSandbox
            from backends.ebpf.loader import ensure_bpffs

            self.cgroups = CgroupSandbox(name=f"{c.prefix}-cg").open()
            # `ip netns exec` gives the daemon a private /sys, so a bpffs it mounted at
            # /sys/fs/bpf would die with it, pins and all; one mounted here, in this
            # process's mount namespace, is shared by every daemon and outlives them.
            BPFFS_TEST_ROOT.mkdir(parents=True, exist_ok=True)
            ensure_bpffs(BPFFS_TEST_ROOT)
        c.start_servers(ports_tcp=self.tcp_ports, ports_udp=self.udp_ports)
        # The fabric's own address is the control plane's and every node's default
        # gateway: real nodes have a default route, and locally originated traffic to a
        # ClusterIP needs one (routing happens before the OUTPUT chain's DNAT).
        netns.ip_batch(
            c.fabric_netns,
            [f"addr add {CONTROL_PLANE_V4}/24 dev br0"]
            + ([f"addr add {CONTROL_PLANE_V6}/64 dev br0 nodad"] if c.ipv6 else []),
        )
        for n in c.nodes:
            # REJECT answers with ICMP, which the kernel rate-limits per destination;
            # the tests send many refused requests from one pod in a row.
            netns.set_sysctls(n.netns, {"net.ipv4.icmp_ratelimit": 0, "net.ipv6.icmp.ratelimit": 0})
            netns.ip_batch(
                n.netns,
                [f"route add default via {CONTROL_PLANE_V4}"]
                + ([f"route add default via {CONTROL_PLANE_V6}"] if c.ipv6 else []),
            )
        self.api = ApiServerThread(
            c.fabric_netns,
            CONTROL_PLANE_V4,
            API_PORT,
            bookmark_interval=2.0,
            service_cidr=SERVICE_CIDR_V4,
        )
        self.api.start()
        for i, n in enumerate(c.nodes):
            zone = self.zones[i % len(self.zones)] if self.zones else None
            self.apply(node_object(n.name, n.ips, zone))
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "test", "cluster": {"server": self.api.url}}],
                    "users": [{"name": "lbd", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "lbd"}}],
                    "current-context": "test",
                }
            )
        )
        os.chmod(self.kubeconfig, 0o600)
        if self._start_daemons:
            for n in c.nodes:
                self.start_daemon(n.name, wait=False)
            for n in c.nodes:
                self.wait_healthy(n.name)

    def close(self) -> None:
        for name in list(self.daemons):
            self.stop_daemon(name)
        if self.cgroups is not None:
            # The datapath outlives the daemon by design; a test run must not.
            for n in self.cluster.nodes:
                try:
                    self._ebpf_backend(n.name).cleanup()
                except Exception:  # noqa: BLE001 - best effort, keep tearing down
                    pass
            self.cgroups.close()
            self.cgroups = None
        if self.api is not None:
            self.api.close()
            self.api = None
        self.cluster.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- daemons -----------------------------------------------------------------------

    def daemon_argv(self, node: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "lbd",
            "run",
            "--proxy-mode",
            self.mode,
            "--kubeconfig",
            str(self.kubeconfig),
            "--hostname-override",
            node,
            "--cluster-cidr",
            CLUSTER_CIDRS,
            "--min-sync-period",
            "100ms",
            "--sync-period",
            "30s",
            *self.mode_args(node),
            *self.daemon_args,
        ]

    def ebpf_options(self, node: str) -> dict[str, Any]:
        return {
            "cgroup": str(self.cgroups.node(node)),
            "bpffs": str(BPFFS_TEST_ROOT / f"{self.cluster.prefix}-{node}"),
            # Pods are namespaces of this test process's threads, not processes in a
            # cgroup: they are balanced by tc on their veths (Cilium's hostns-only).
            "hostns_only": True,
            "devices": ["eth0"],
            "pod_devices": ["vp*"],
        }

    def mode_args(self, node: str) -> list[str]:
        if self.mode != "ebpf":
            return []
        o = self.ebpf_options(node)
        return [
            "--cgroup-root",
            o["cgroup"],
            "--bpffs-root",
            o["bpffs"],
            "--bpf-lb-sock-hostns-only",
            "--devices",
            ",".join(o["devices"]),
            "--pod-devices",
            ",".join(o["pod_devices"]),
        ]

    def location_args(self, node: str) -> list[str]:
        """Flags telling `lbd status`/`lbd cleanup` where this node's datapath lives."""
        if self.mode != "ebpf":
            return []
        o = self.ebpf_options(node)
        # The tc filters are part of the datapath too: cleanup only touches the devices
        # it is told about (it never guesses which interfaces lbd may have used).
        return [
            "--cgroup-root",
            o["cgroup"],
            "--bpffs-root",
            o["bpffs"],
            "--devices",
            ",".join(o["devices"]),
            "--pod-devices",
            ",".join(o["pod_devices"]),
        ]

    def _ebpf_backend(self, node: str) -> Any:
        from backends.ebpf import from_config
        from lbd.config import ProxyConfig

        cfg = ProxyConfig(mode="ebpf", extra={"ebpf": self.ebpf_options(node)})
        return from_config(cfg, self.cluster.netns_of(node))

    def log_path(self, node: str) -> Path:
        return self.workdir / f"lbd-{node}.log"

    def start_daemon(
        self, node: str, *, wait: bool = True, argv: Sequence[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_path(node), "ab")  # noqa: SIM115 - owned by the child process
        proc = self.cluster.popen(
            node, list(argv or self.daemon_argv(node)), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.daemons[node] = proc
        if wait:
            self.wait_healthy(node)
        return proc

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM) -> int | None:
        proc = self.daemons.pop(node, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)
        return proc.returncode

    def wait_healthy(self, node: str, timeout: float = 30.0) -> None:
        ns = self.cluster.netns_of(node)

        def check() -> None:
            proc = self.daemons.get(node)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"lbd on {node} exited {proc.returncode}:\n{self.logs(node)}")
            status, body = http_get(ns, "127.0.0.1", HEALTHZ_PORT, "/healthz")
            assert status == 200, body

        try:
            eventually(check, timeout)
        except RuntimeError:
            raise
        except Exception as err:
            raise RuntimeError(f"lbd on {node} not healthy: {err}\n{self.logs(node)}") from None

    def logs(self, node: str, tail: int = 60) -> str:
        try:
            lines = self.log_path(node).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def metrics(self, node: str) -> dict[str, float]:
        _, body = http_get(self.cluster.netns_of(node), "127.0.0.1", METRICS_PORT, "/metrics")
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
        return out

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until every daemon's datapath reflects every write made so far."""
        assert self.api is not None
        target = int(self.api.server.resource_version)

        def check() -> None:
            for node in self.daemons:
                synced = self.metrics(node).get("lbd_synced_resource_version", 0.0)
                assert synced >= target, (node, synced, target)

        eventually(check, timeout)

    # -- objects -----------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.api is not None
        return self.api.server.put_object(obj["kind"], obj)

    def delete(self, kind: str, name: str, namespace: str | None = "default") -> None:
        assert self.api is not None
        self.api.server.delete_object(kind, namespace, name)

    # -- traffic -----------------------------------------------------------------------

    def spread_from(
        self,
        client: str,
        ip: str,
        port: int,
        proto: str = "tcp",
        count: int = 30,
        timeout: float = 1.0,
    ) -> Spread:
        """Requests from a pod, a node (host network) or "external".

        In ebpf mode a node's own processes are balanced by socket LB, which sees only
        processes in the node's cgroup: the probe then runs as a process placed there.
        """
        ns = self.cluster.netns_of(client)
        is_node = any(client in (n.name, n.netns) for n in self.cluster.nodes)
        if not (self.mode == "ebpf" and is_node):
            return spread(ns, ip, port, proto, count, timeout=timeout)  # type: ignore[arg-type]
        node = self.cluster.node(client).name
        argv = [
            sys.executable,
            "-m",
            "lbd.testing.traffic",
            proto,
            ip,
            str(port),
            "--count",
            str(count),
            "--timeout",
            str(timeout),
            "--json",
        ]
        proc = self.cgroups.run(self.cgroups.node(node), ns, argv, timeout=60 + count * timeout)
        data = json.loads(proc.stdout)
        return Spread(Counter(data["pods"]), set(data["client_ips"]), Counter(data["failures"]))

    # -- helpers -----------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return self.cluster.node(name)

    def exec_in(
        self, target: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("check", False)
        return self.cluster.exec(target, argv, **kwargs)

    def ipvs_dummy_addresses(self, node: str) -> list[str] | None:
        """lbd's addresses on ipvs mode's dummy interface in `node` ("ip/len", sorted);
        None when the interface is absent. The kernel's own IPv6 link-local address
        (random per interface) is not lbd's and is left out."""
        from backends.ipvs.plan import DUMMY

        proc = self.exec_in(node, ["ip", "-j", "addr", "show", "dev", DUMMY])
        if proc.returncode != 0:
            return None
        return sorted(
            f"{a['local']}/{a['prefixlen']}"
            for link in json.loads(proc.stdout)
            for a in link["addr_info"]
            if a.get("scope") != "link"
        )
