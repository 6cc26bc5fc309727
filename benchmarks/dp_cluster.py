"""The data-plane benchmark's cluster: one node, a client pod, a server pod, an outsider.

Owns the topology the traffic runs through and everything started in it. It is the
e2e tests' `LbdEnv` (mini-cluster in network namespaces, the test API server in the
fabric, `lbd run` as a real process in the node's namespace), shrunk to what a fair
comparison needs and with the C servers instead of the Python echo server:

    external (192.168.200.100) --fabric-- node-1 (192.168.200.11, lbd)
                                            |-- vp1-1 -- pod-1-1 10.244.1.11 (clients)
                                            `-- vp1-2 -- pod-1-2 10.244.1.12 (servers)

The benchmark Service has exactly one endpoint, the server pod, so a request through
the ClusterIP or the NodePort ends at the same socket as one sent to the pod IP
directly: the only difference between the paths is the load balancer. The server pod
runs nginx (HTTP on 8080, one worker), `iperf3 -s` (5201) and `sockperf server` (UDP
11111). Clients run in pod-1-1 (in-cluster) or in the external namespace (for the
NodePort), which gets a route to the pod network through node-1 so that it can also
reach the pod directly: its reference path crosses the same node.

In ebpf mode every process of the pods (clients and servers) is placed in the node's
cgroup, as every process of a real node is: with socket LB the client's connect() is
translated there; with socket LB limited to the host's namespace (Cilium's
hostns-only) the hook runs and declines, and tc on the pod's veth balances the packets.
The external client is never in the cgroup: it is not on the node.

Nothing here touches the namespace the benchmark was started in; all of it is deleted
on close (LbdEnv's guarantees), also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import traffic_tools as tools
from benchmarks.workload import Workload
from lbd.testing import netns
from lbd.testing.env import LbdEnv
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service

NODE = "node-1"
CLIENT_POD = "pod-1-1"
SERVER_POD = "pod-1-2"
VIP = "10.96.250.10"  # outside the workload's 10.96.0.10 + i range for any size
SERVICE_NAME = "bench-target"
HTTP = PortSpec(80, tools.HTTP_PORT, "TCP", "http", 32080)
IPERF = PortSpec(tools.IPERF_PORT, tools.IPERF_PORT, "TCP", "iperf", 32201)
SOCKPERF = PortSpec(tools.SOCKPERF_PORT, tools.SOCKPERF_PORT, "UDP", "sockperf", 32111)
PORTS = (HTTP, IPERF, SOCKPERF)
# The workload's node ports are 30000 + i/10, below 31000 up to 10,000 services.
assert all(p.node_port >= 32000 for p in PORTS)

SYNC_TIMEOUT_S = 1800.0
SERVER_START_TIMEOUT_S = 10.0

# Many short connections from one client to one server: use the whole port range and
# let TIME_WAIT ports be reused, or the client runs out of ports, not the datapath.
_CLIENT_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": 1}
# ...split in two, one half for the direct paths and one for the load-balanced ones
# (keyed by Path_.via_lb; run_client switches before every run). A balanced path and its
# reference end at the same server socket, and nginx, which closes first, keeps each
# connection in TIME_WAIT for 60 s. A NAT that keeps the client's port (tc DNAT does)
# makes a ClusterIP connection reach the server with the very 4-tuple of an earlier
# direct one from that port, but the client's TCP timestamps carry an offset hashed from
# the tuple *it* sees (VIP:80, not pod:8080; per connection on this kernel): about half
# of those SYNs look older than the TIME_WAIT's last timestamp and PAWS rejects them
# (server ACK, client RST, SYN again ~10 ms later: nstat TcpExtPAWSTimewait on the server,
# TcpExtTCPSynRetrans on the client). With a whole port range cycled every few seconds
# that halved the rate of whichever path ran second, direct or not. Socket LB (it
# translates before the connection exists) and conntrack's NAT (it moves the source port
# off a clashing tuple) are not exposed; a workload that mixes both addresses of one pod
# at this rate is, on the tc path. Disjoint ranges measure each path against its own
# history only, as a steady workload of one kind would run.
CLIENT_PORT_RANGES = {False: "1024 33279", True: "33280 65535"}
_SERVER_SYSCTLS = {"net.core.somaxconn": 4096, "net.ipv4.tcp_max_syn_backlog": 4096}

_NGINX_CONF = """\
# Written by benchmarks/dp_cluster.py: a minimal HTTP server for wrk.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class DataTarget:
    """One datapath to measure: a proxy mode and how it is configured."""

    label: str  # "iptables-legacy", "ebpf-socket", "ebpf-tc"
    mode: str
    variant: str | None = None  # iptables: legacy / nft
    socket_lb: bool | None = None  # ebpf: socket LB for pods (else hostns-only + tc)
    max_services: int | None = None


@dataclass(frozen=True, slots=True)
class Path_:
    """Where a measurement's client runs and which address it targets."""

    name: str  # "clusterip", "pod", "nodeport", "pod-from-external"
    client: str  # "pod" or "external"
    via_lb: bool


PATHS = (
    Path_("pod", "pod", False),
    Path_("clusterip", "pod", True),
    Path_("pod-from-external", "external", False),
    Path_("nodeport", "external", True),
)
# The reference each load-balanced path is compared with: same client, same server.
REFERENCE = {"clusterip": "pod", "nodeport": "pod-from-external"}


def ebpf_map_max(services: int, endpoints_per_service: int) -> int:
    """--bpf-lb-map-max for `services` other services plus the benchmark's: each service
    port takes 1 + its endpoints entries; a quarter spare, and never below lbd's default."""
    needed = (services + len(PORTS)) * (endpoints_per_service + 1)
    return max(65536, needed + needed // 4)


class BenchCluster(LbdEnv):
    """LbdEnv with one node, the benchmark Service, the C servers and the clients."""

    def __init__(self, target: DataTarget, *, map_max: int = 65536, pin_cpus: bool = False):
        daemon_args = ["--sync-period", "1h"]  # no periodic full resync while measuring
        if target.mode == "iptables" and target.variant:
            daemon_args += ["--iptables-variant", target.variant]
        if target.mode == "ebpf":
            daemon_args += ["--bpf-lb-map-max", str(map_max)]
        super().__init__(
            target.mode,
            nodes=1,
            pods_per_node=2,
            ipv6=False,
            tcp_ports=(),
            udp_ports=(),
            daemon_args=daemon_args,
            start_daemons=False,
        )
        self.target = target
        self.pin_cpus = pin_cpus and (os.cpu_count() or 1) >= 2
        self.seeded = 0
        self.http_server = "nginx" if shutil.which("nginx") else "python-echo"
        self.server_procs: list[subprocess.Popen[Any]] = []

    # -- daemon flags ------------------------------------------------------------------

    def mode_args(self, node: str) -> list[str]:
        args = super().mode_args(node)
        if self.target.socket_lb:
            # Socket LB for every process of the node's cgroup, pods included.
            args = [a for a in args if a != "--bpf-lb-sock-hostns-only"]
        return args

    # -- set-up ------------------------------------------------------------------------

    def up(self) -> None:
        super().up()
        c = self.cluster
        netns.set_sysctls(self.netns_of("pod"), _CLIENT_SYSCTLS)
        netns.set_sysctls(self.netns_of("external"), _CLIENT_SYSCTLS)
        netns.set_sysctls(c.pod(SERVER_POD).netns, _SERVER_SYSCTLS)
        # The outside client reaches pods through node-1 (as a router on the fabric
        # would send it), so that its direct path crosses the node like the NodePort's.
        node = c.node(NODE)
        netns.ip_batch(c.external.netns, [f"route add {node.pod_cidr_v4} via {node.ipv4}"])
        self.start_c_servers()
        server = c.pod(SERVER_POD)
        self.apply(service(SERVICE_NAME, [VIP], list(PORTS), type="NodePort"))
        self.apply(endpoint_slice(SERVICE_NAME, [EndpointSpec(server.ipv4, NODE)], list(PORTS)))

    def start_c_servers(self) -> None:
        pod = self.cluster.pod(SERVER_POD)
        if self.http_server == "nginx":
            conf_dir = self.workdir / "nginx"
            conf_dir.mkdir()
            conf = conf_dir / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(dir=conf_dir, port=tools.HTTP_PORT))
            http = ["nginx", "-c", str(conf), "-p", str(conf_dir), "-e", str(conf_dir / "e.log")]
        else:
            http = [sys.executable, "-m", "lbd.testing.echo", "--name", SERVER_POD, "--no-ipv6"]
            http += ["--tcp", str(tools.HTTP_PORT)]
        servers = [
            http,
            ["iperf3", "-s", "-p", str(tools.IPERF_PORT)],
            tools.sockperf_server_argv(tools.SOCKPERF_PORT),
        ]
        for argv in servers:
            self.server_procs.append(self._popen_in_pod(pod.netns, self._pinned(argv, 1)))
        self._wait_listening(pod.netns)

    def _wait_listening(self, ns: str) -> None:
        wanted = {f":{tools.HTTP_PORT}", f":{tools.IPERF_PORT}"}
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            for proc in self.server_procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a server in {SERVER_POD} exited ({proc.args})")
            listening = netns.run(ns, ["ss", "-Htln"], check=False).stdout
            udp = netns.run(ns, ["ss", "-Huln"], check=False).stdout
            if all(w in listening for w in wanted) and f":{tools.SOCKPERF_PORT}" in udp:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the servers in {SERVER_POD} are not listening: {listening}")
            time.sleep(0.1)

    # -- the other services --------------------------------------------------------------

    def seed(self, workload: Workload, services: int) -> None:
        """Grow the cluster to `services` other services (the workload's first ones)."""
        if services < self.seeded:
            raise ValueError("the other services only grow")
        assert self.api is not None
        idx = range(self.seeded, services)
        self.api.server.put_objects("services", [workload.service_object(i) for i in idx])
        self.api.server.put_objects("endpointslices", [workload.slice_object(i) for i in idx])
        self.seeded = services

    def restart_daemon(self) -> float:
        """(Re)start lbd and wait until it programmed everything; returns the wait.

        A restart per size gives every size the same history (one full sync from the
        objects the API server holds) instead of a long tail of partial syncs."""
        self.stop_daemon(NODE)
        start = time.monotonic()
        self.start_daemon(NODE, wait=False)
        self.wait_healthy(NODE, timeout=SYNC_TIMEOUT_S)
        self._wait_programmed()
        return time.monotonic() - start

    def _wait_programmed(self) -> None:
        """Until the daemon's datapath holds every object written so far; a failed sync
        (a full map, a rejected restore) ends the wait at once with the daemon's log."""
        assert self.api is not None
        wanted = int(self.api.server.resource_version)
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            proc = self.daemons.get(NODE)
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"lbd exited while syncing:\n{self.logs(NODE, 20)}")
            try:
                metrics = self.metrics(NODE)
            except OSError:
                metrics = {}
            errors = sum(v for k, v in metrics.items() if k.startswith("lbd_sync_errors_total"))
            if errors:
                raise RuntimeError(f"lbd's sync failed:\n{self.logs(NODE, 20)}")
            if metrics.get("lbd_synced_resource_version", 0.0) >= wanted:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"lbd did not sync in {SYNC_TIMEOUT_S:.0f} s")
            time.sleep(0.5)

    def daemon_cpu_s(self) -> float | None:
        """User + system CPU of the running lbd process so far."""
        proc = self.daemons.get(NODE)
        if proc is None:
            return None
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def daemon_rss_bytes(self) -> int | None:
        proc = self.daemons.get(NODE)
        if proc is None:
            return None
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def ebpf_map_counts(self) -> dict[str, int]:
        """Entries in the socket-LB reverse map and the tc conntrack (ebpf mode only).

        The witness of which path carried the pod's traffic: socket LB records every
        translated socket in lbd_sockrev and creates no conntrack entry, the tc path the
        other way round. Read-only map lookups through the pinned files."""
        if self.target.mode != "ebpf":
            return {}
        from bpf_lb import bpfsys

        pins = Path(self.ebpf_options(NODE)["bpffs"])
        counts = {}
        for name in ("lbd_sockrev", "lbd_ct"):
            fd = bpfsys.obj_get(str(pins / name))
            try:
                info = bpfsys.map_info(fd)
                keys, _ = bpfsys.map_dump(fd, info.key_size, info.value_size)
                counts[name] = len(keys) // info.key_size
            finally:
                os.close(fd)
        return counts

    def tcp_counters(self) -> dict[str, int]:
        """Counters that tell a slow connection rate from a datapath's own cost: SYNs the
        clients sent again (client namespaces) and SYNs the server's TIME_WAIT sockets
        rejected by PAWS (server pod). Cumulative; run_test records the difference."""
        out = {"syn_retrans": 0, "paws_rejected": 0}
        for ns in (self.netns_of("pod"), self.netns_of("external")):
            out["syn_retrans"] += _netstat(ns).get("TCPSynRetrans", 0)
        out["paws_rejected"] = _netstat(self.cluster.pod(SERVER_POD).netns).get("PAWSTimewait", 0)
        return out

    # -- addresses and clients -----------------------------------------------------------

    def netns_of(self, client: str) -> str:
        if client == "pod":
            return self.cluster.pod(CLIENT_POD).netns
        if client == "external":
            return self.cluster.external.netns
        return self.cluster.netns_of(client)

    def address(self, path: Path_, port: PortSpec) -> tuple[str, int]:
        """(host, port) a client on `path` sends to for the service port `port`."""
        if path.name == "clusterip":
            return VIP, port.port
        if path.name == "nodeport":
            return self.cluster.node(NODE).ipv4, port.node_port
        return self.cluster.pod(SERVER_POD).ipv4, port.target_port

    def run_client(
        self, path: Path_, argv: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        ns = self.netns_of(path.client)
        netns.set_sysctls(ns, {"net.ipv4.ip_local_port_range": CLIENT_PORT_RANGES[path.via_lb]})
        argv = self._pinned(argv, 0)
        if path.client == "pod" and self.cgroups is not None:
            return self.cgroups.run(self.cgroups.node(NODE), ns, argv, timeout=timeout)
        return netns.run(ns, argv, check=False, timeout=timeout)

    def _popen_in_pod(self, ns: str, argv: list[str]) -> subprocess.Popen[Any]:
        kwargs: dict[str, Any] = {
            "stdout": subprocess.DEVNULL,
            "stderr": subprocess.DEVNULL,
            "cwd": str(Path(__file__).resolve().parent.parent),
        }
        if self.cgroups is not None:
            return self.cgroups.popen(self.cgroups.node(NODE), ns, argv, **kwargs)
        return self.cluster.popen(ns, argv, **kwargs)

    def _pinned(self, argv: Sequence[str], cpu: int) -> list[str]:
        # Optional: client on CPU 0, servers on CPU 1. Off by default, because on a
        # shared machine a pinned process cannot flee a neighbour's busy core.
        return ["taskset", "-c", str(cpu), *argv] if self.pin_cpus else list(argv)


def _netstat(ns: str) -> dict[str, int]:
    """TcpExt counters of namespace `ns` (/proc/thread-self: the thread's namespace)."""
    with netns.entered(ns), open("/proc/thread-self/net/netstat") as f:
        lines = f.read().splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            out.update(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
    return out
