"""A Kubernetes-shaped network built from network namespaces.

Owns `MiniCluster`: nodes, pods and an outside client, wired like a real
cluster with a routed pod network and no NAT anywhere, so a proxy under test
is the only thing that rewrites addresses and the echo servers can report
the true client source. Everything lives in namespaces named
``<prefix>-...`` (prefix ``lbdt`` + 4 random hex digits, unique per
cluster); the namespace the process started in is never touched.

Layout (node i = 1..N, pod j = 1..M, ``<p>`` the prefix)::

    <p>-ext  eth0 192.168.200.100/24 fd00:200::100/64
             203.0.113.0/24, 2001:db8:1b::/64 via node-1 (route_external_via)
       |
    <p>-fab  br0 (bridge; ports n1..nN, ext)
       |
    <p>-n<i> eth0 192.168.200.(10+i)/24 fd00:200::(10+i)/64, forwarding on
             other nodes' pod CIDRs via their fabric addresses
             vp<i>-<j>: veth to pod j; /32 and /128 routes to the pod
       |
    <p>-n<i>p<j>  eth0 10.244.i.(10+j)/32 fd00:244:i::(10+j)/128
                  default via 169.254.1.1 (v4) and fe80::1 (v6), both the node's veth

The pod side uses the point-to-point scheme of routed CNIs: a /32 with a
gateway the node answers for, so every pod's traffic, even to a pod on the
same node, is routed (and therefore seen by netfilter and tc) on the node.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType

from lbd.testing import netns
from lbd.testing.echo import EchoServer

# Addresses reuse the decimal digits of the v4 ones (node-1 is .11 and ::11)
# so the two families read alike in test output.
FABRIC_V4 = "192.168.200.0/24"
FABRIC_V6 = "fd00:200::/64"
EXTERNAL_V4 = "192.168.200.100"
EXTERNAL_V6 = "fd00:200::100"
LB_RANGE_V4 = "203.0.113.0/24"
# "1b" stands in for "lb", which is not hex.
LB_RANGE_V6 = "2001:db8:1b::/64"
# Pod-side gateway addresses, answered by the node end of every pod veth
# (a fixed MAC for v4, an fe80::1 link-local for v6), as routed CNIs do.
POD_GATEWAY_V4 = "169.254.1.1"
POD_GATEWAY_V6 = "fe80::1"
POD_GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"

_DAD_OFF = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0}
_FORWARDING = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}


@dataclass(frozen=True)
class Node:
    """A simulated Kubernetes node: one namespace with a fabric interface."""

    name: str  # Kubernetes node name, "node-1"
    index: int
    netns: str
    ipv4: str  # fabric (InternalIP) address
    ipv6: str | None
    pod_cidr_v4: str
    pod_cidr_v6: str | None
    interface: str = "eth0"

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in (self.ipv4, self.ipv6) if ip)


@dataclass(frozen=True)
class Pod:
    """A pod: its own namespace with eth0, routed through its node."""

    name: str  # "pod-<node>-<j>"
    netns: str
    node: str  # node name
    ipv4: str
    ipv6: str | None
    host_veth: str  # node-side interface name, inside the node's namespace

    @property
    def ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in (self.ipv4, self.ipv6) if ip)


@dataclass(frozen=True)
class External:
    """A client outside the cluster: on the fabric, with no route to pod CIDRs."""

    name: str
    netns: str
    ipv4: str
    ipv6: str | None
    lb_range_v4: str = LB_RANGE_V4
    lb_range_v6: str | None = LB_RANGE_V6


# Clusters not yet torn down, for the atexit/SIGTERM safety net. Strong
# references on purpose: a cluster nobody closed is exactly what it is for.
_live: set[MiniCluster] = set()
_handlers_lock = threading.Lock()
_atexit_registered = False
_sigterm_installed = False
_previous_sigterm: object = None


# The process that builds clusters; a forked child (pyroute2's NetNS helper, a
# preexec_fn) inherits our handlers and must never tear the clusters down.
_owner_pid = os.getpid()


def _cleanup_all() -> None:
    if os.getpid() != _owner_pid:
        return
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:
        # Die of the signal as if we had never caught it: a SystemExit could be
        # swallowed (pytest records it as a test failure and carries on).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _atexit_registered, _sigterm_installed, _previous_sigterm, _owner_pid
    with _handlers_lock:
        _owner_pid = os.getpid()
        if not _atexit_registered:
            atexit.register(_cleanup_all)
            _atexit_registered = True
        # Signal handlers can only be set from the main thread; elsewhere the
        # `with` block and atexit still cover us.
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            _previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True


def _claim_new_prefix() -> str:
    existing = {n.split("-", 1)[0] for n in netns.list_netns()}
    while True:
        prefix = netns.DEFAULT_PREFIX + secrets.token_hex(2)
        if prefix not in existing and netns.claim(prefix):
            return prefix


class MiniCluster:
    """Nodes, pods and an external client in namespaces; see the module docstring.

    ::

        with MiniCluster(nodes=2, pods_per_node=2) as c:
            c.start_servers(ports_tcp=(8080,), ports_udp=(8080,))
            pod = c.pods[0]
            reply = tcp_request(c.pods[1].netns, pod.ipv4, 8080)
    """

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 2,
        prefix: str | None = None,
        ipv6: bool = True,
    ) -> None:
        if not 1 <= nodes <= 80:
            raise ValueError("nodes must be between 1 and 80 (fabric addresses .11-.90)")
        if not 0 <= pods_per_node <= 200:
            raise ValueError("pods_per_node must be between 0 and 200")
        if prefix is not None and (len(prefix) > 10 or "-" in prefix):
            raise ValueError("prefix must be at most 10 characters, without '-'")
        # The prefix is claimed only in `up`; until then it is just a name, and
        # a random one may still change if another live process holds it.
        self._prefix_given = prefix is not None
        self.ipv6 = ipv6
        self._size = (nodes, pods_per_node)
        self._layout(prefix or netns.DEFAULT_PREFIX + secrets.token_hex(2))
        self.echo: EchoServer | None = None
        self.build_seconds: float | None = None
        self.teardown_seconds: float | None = None
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        # Re-entrant: the SIGTERM handler may close the cluster on the main
        # thread while that thread is inside a locked section.
        self._lock = threading.RLock()

    def _layout(self, prefix: str) -> None:
        """Name every namespace and address under `prefix` (no kernel state yet)."""
        nodes, pods_per_node = self._size
        ipv6 = self.ipv6
        self.prefix = prefix
        self.fabric_netns = f"{prefix}-fab"
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        for i in range(1, nodes + 1):
            self.nodes.append(
                Node(
                    name=f"node-{i}",
                    index=i,
                    netns=f"{prefix}-n{i}",
                    ipv4=f"192.168.200.{10 + i}",
                    ipv6=f"fd00:200::{10 + i}" if ipv6 else None,
                    pod_cidr_v4=f"10.244.{i}.0/24",
                    pod_cidr_v6=f"fd00:244:{i}::/64" if ipv6 else None,
                )
            )
            for j in range(1, pods_per_node + 1):
                self.pods.append(
                    Pod(
                        name=f"pod-{i}-{j}",
                        netns=f"{prefix}-n{i}p{j}",
                        node=f"node-{i}",
                        ipv4=f"10.244.{i}.{10 + j}",
                        ipv6=f"fd00:244:{i}::{10 + j}" if ipv6 else None,
                        host_veth=f"vp{i}-{j}",
                    )
                )
        self.external = External(
            name="external",
            netns=f"{prefix}-ext",
            ipv4=EXTERNAL_V4,
            ipv6=EXTERNAL_V6 if ipv6 else None,
            lb_range_v6=LB_RANGE_V6 if ipv6 else None,
        )

    # -- lookups ---------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return (
            [self.fabric_netns]
            + [n.netns for n in self.nodes]
            + [p.netns for p in self.pods]
            + [self.external.netns]
        )

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name or n.netns == name:
                return n
        raise KeyError(name)

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name or p.netns == name:
                return p
        raise KeyError(name)

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def netns_of(self, target: str | Node | Pod | External) -> str:
        """Namespace of a node/pod/external (object or name), or a namespace name itself."""
        if isinstance(target, Node | Pod | External):
            return target.netns
        if target in (self.external.name, self.external.netns):
            return self.external.netns
        if target == self.fabric_netns:
            return target
        for item in (*self.nodes, *self.pods):
            if target in (item.name, item.netns):
                return item.netns
        raise KeyError(f"{target!r} is not part of cluster {self.prefix}")

    # -- building --------------------------------------------------------------

    def __enter__(self) -> MiniCluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> MiniCluster:
        """Build the network. On any failure, everything built so far is removed."""
        if self._closed or self._created:
            raise RuntimeError("a MiniCluster can be brought up only once")
        _install_handlers()
        start = time.monotonic()
        if self._prefix_given:
            if not netns.claim(self.prefix):
                raise RuntimeError(f"prefix {self.prefix} is in use by a live process")
        else:
            self._layout(_claim_new_prefix())
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - start
        return self

    def _build(self) -> None:
        names = self.namespaces
        # Recorded before creation so a half-made set is still cleaned up.
        self._created = list(names)
        netns.create_many(names)
        for name in names:
            values: dict[str, int] = dict(_DAD_OFF) if self.ipv6 else {}
            if name in {n.netns for n in self.nodes}:
                values.update(_FORWARDING if self.ipv6 else {"net.ipv4.ip_forward": 1})
            # Before any interface exists, so new interfaces inherit the defaults:
            # no 1-2 s wait for duplicate address detection on fresh links.
            if values:
                netns.set_sysctls(name, values)

        fab = ["link add br0 type bridge forward_delay 0 mcast_snooping 0", "link set br0 up"]
        for n in self.nodes:
            fab += [
                f"link add n{n.index} type veth peer name eth0 netns {n.netns}",
                f"link set n{n.index} master br0 up",
            ]
        fab += [
            f"link add ext type veth peer name eth0 netns {self.external.netns}",
            "link set ext master br0 up",
        ]
        netns.ip_batch(self.fabric_netns, fab)

        _parallel(netns.ip_batch, [(n.netns, self._node_commands(n)) for n in self.nodes])
        jobs = [(p.netns, self._pod_commands(p)) for p in self.pods]
        jobs.append((self.external.netns, self._external_commands()))
        _parallel(netns.ip_batch, jobs)

    def _node_commands(self, n: Node) -> list[str]:
        cmds = [
            "link set lo up",
            f"addr add {n.ipv4}/24 dev eth0",
            "link set eth0 up",
        ]
        if n.ipv6:
            cmds.insert(2, f"addr add {n.ipv6}/64 dev eth0 nodad")
        for p in self.pods_on(n.name):
            cmds += [
                f"link add {p.host_veth} address {POD_GATEWAY_MAC} type veth"
                f" peer name eth0 netns {p.netns}",
                f"link set {p.host_veth} up",
                # Node-originated traffic to a pod uses the node's own address,
                # as it would on a real host (kubelet probes, hostNetwork pods).
                f"route add {p.ipv4}/32 dev {p.host_veth} src {n.ipv4}",
            ]
            if p.ipv6:
                cmds += [
                    f"addr add {POD_GATEWAY_V6}/64 dev {p.host_veth} nodad",
                    f"route add {p.ipv6}/128 dev {p.host_veth} src {n.ipv6}",
                ]
        for other in self.nodes:
            if other is n:
                continue
            cmds.append(f"route add {other.pod_cidr_v4} via {other.ipv4}")
            if other.pod_cidr_v6:
                cmds.append(f"route add {other.pod_cidr_v6} via {other.ipv6}")
        return cmds

    def _pod_commands(self, p: Pod) -> list[str]:
        cmds = [
            "link set lo up",
            f"addr add {p.ipv4}/32 dev eth0",
            "link set eth0 up",
            # Nobody owns 169.254.1.1; the pod just needs its MAC (the node's veth).
            f"neigh add {POD_GATEWAY_V4} lladdr {POD_GATEWAY_MAC} dev eth0 nud permanent",
            f"route add {POD_GATEWAY_V4} dev eth0 scope link",
            f"route add default via {POD_GATEWAY_V4} dev eth0",
        ]
        if p.ipv6:
            cmds.insert(2, f"addr add {p.ipv6}/128 dev eth0 nodad")
            cmds.append(f"route add default via {POD_GATEWAY_V6} dev eth0")
        return cmds

    def _external_commands(self) -> list[str]:
        e = self.external
        first = self.nodes[0]
        cmds = [
            "link set lo up",
            f"addr add {e.ipv4}/24 dev eth0",
            "link set eth0 up",
            f"route add {e.lb_range_v4} via {first.ipv4}",
        ]
        if e.ipv6:
            cmds.insert(2, f"addr add {e.ipv6}/64 dev eth0 nodad")
            cmds.append(f"route add {e.lb_range_v6} via {first.ipv6}")
        return cmds

    def route_external_via(self, node: str | Node) -> None:
        """Send the external client's LoadBalancer/external-IP ranges to `node`."""
        n = node if isinstance(node, Node) else self.node(node)
        e = self.external
        cmds = [f"route replace {e.lb_range_v4} via {n.ipv4}"]
        if e.lb_range_v6 and n.ipv6:
            cmds.append(f"route replace {e.lb_range_v6} via {n.ipv6}")
        netns.ip_batch(e.netns, cmds)

    # -- servers and processes --------------------------------------------------

    def start_servers(
        self,
        ports_tcp: Iterable[int] = (8080,),
        ports_udp: Iterable[int] = (8080,),
        pods: Iterable[Pod | str] | None = None,
    ) -> EchoServer:
        """Serve the echo protocol in every pod (or the given ones), on both families.

        In-process: one background thread serves all listeners. Can be called
        again to add ports or pods.
        """
        ports_tcp, ports_udp = tuple(ports_tcp), tuple(ports_udp)
        targets = self.pods if pods is None else [self._as_pod(p) for p in pods]
        echo = self._echo()
        for p in targets:
            echo.listen(
                p.name, p.netns, tcp_ports=ports_tcp, udp_ports=ports_udp, families=self._families()
            )
        return echo

    def serve_on(
        self,
        target: str | Node | Pod | External,
        ports_tcp: Iterable[int] = (),
        ports_udp: Iterable[int] = (),
        name: str | None = None,
    ) -> EchoServer:
        """Serve the echo protocol in any member's namespace (e.g. a hostNetwork server on
        a node); replies carry `name`, by default the member's name."""
        ns = self.netns_of(target)
        if name is None:
            name = target if isinstance(target, str) else target.name
        echo = self._echo()
        echo.listen(
            name,
            ns,
            tcp_ports=tuple(ports_tcp),
            udp_ports=tuple(ports_udp),
            families=self._families(),
        )
        return echo

    def start_server_process(
        self,
        pod: Pod | str,
        ports_tcp: Iterable[int] = (8080,),
        ports_udp: Iterable[int] = (8080,),
        **popen_kwargs,
    ) -> subprocess.Popen:
        """Run the echo server as its own process in a member's namespace."""
        ns = self.netns_of(pod)
        name = pod if isinstance(pod, str) else pod.name
        if name == ns:
            name = self.pod(ns).name
        argv = [sys.executable, "-m", "lbd.testing.echo", "--name", name]
        for port in ports_tcp:
            argv += ["--tcp", str(port)]
        for port in ports_udp:
            argv += ["--udp", str(port)]
        if not self.ipv6:
            argv.append("--no-ipv6")
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("text", True)
        proc = self.popen(ns, argv, **popen_kwargs)
        # Wait for the "ready" line so callers can send traffic right away.
        piped = proc.stdout is not None and popen_kwargs["stdout"] == subprocess.PIPE
        if piped and not proc.stdout.readline().startswith("echo "):
            proc.wait(timeout=5)
            raise RuntimeError(f"echo server in {ns} exited with {proc.returncode}")
        return proc

    def stop_servers(self) -> None:
        with self._lock:
            echo, self.echo = self.echo, None
        if echo is not None:
            echo.stop()

    def _echo(self) -> EchoServer:
        with self._lock:
            if self.echo is None:
                self.echo = EchoServer().start()
            return self.echo

    def _families(self) -> tuple[int, ...]:
        return (socket.AF_INET, socket.AF_INET6) if self.ipv6 else (socket.AF_INET,)

    def _as_pod(self, p: Pod | str) -> Pod:
        return p if isinstance(p, Pod) else self.pod(p)

    def exec(
        self, target: str | Node | Pod | External, argv: Sequence[str], **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a command to completion in a member's namespace (`subprocess.run` kwargs;
        output captured as text and `check=True` by default)."""
        return netns.run(self.netns_of(target), argv, **kwargs)

    def popen(
        self, target: str | Node | Pod | External, argv: Sequence[str], **kwargs
    ) -> subprocess.Popen:
        """Start a long-running command in a member's namespace; it is stopped on close."""
        proc = netns.popen(self.netns_of(target), argv, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Stop servers and processes, delete every namespace. Idempotent, never raises
        for something already gone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        start = time.monotonic()
        try:
            self.stop_servers()
            with self._lock:
                procs, self._procs = self._procs, []
            netns.kill_pids([p.pid for p in procs if p.poll() is None])
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=1)
                for stream in (p.stdin, p.stdout, p.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
            existing = [n for n in self._created if netns.exists(n)]
            # Anything else still running inside (children, daemons started by hand).
            netns.kill_processes_in(existing)
            if existing:
                try:
                    netns.ip_batch(None, [f"netns del {n}" for n in existing])
                except netns.NetnsError:
                    for n in existing:
                        with contextlib.suppress(netns.NetnsError):
                            netns.delete(n)
        finally:
            netns.release(self.prefix)
            _live.discard(self)
            self.teardown_seconds = time.monotonic() - start

    def __repr__(self) -> str:
        return f"MiniCluster({self.prefix}, nodes={len(self.nodes)}, pods={len(self.pods)})"


def _parallel(fn: Callable[..., None], jobs: Sequence[tuple]) -> None:
    """Run fn(*args) for every job concurrently (each spawns one `ip` process)."""
    errors: list[BaseException] = []

    def run(args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # re-raised below on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
