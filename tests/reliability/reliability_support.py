"""Helpers the reliability tests share: a stable service with steady traffic, state and
kernel inventories, process accounting, request timing and metric histograms.

Kept out of conftest.py because these are plain functions and classes, not fixtures;
the name is unique so that pytest's rootdir-relative imports cannot pick up a namesake.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lbd.model.build import ModelConfig, build_state, parse_node
from lbd.model.state import state_to_json
from lbd.testing import netns
from lbd.testing.apiserver import ApiServer, RequestRecord
from lbd.testing.env import CLUSTER_CIDRS, METRICS_PORT, LbdEnv, eventually, http_get
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service
from lbd.testing.traffic import Sample, SteadyTraffic

# The service every fault test keeps traffic flowing through. Its node port is fixed so
# the external client can be aimed at it before any daemon has seen the service.
STABLE = "stable"
STABLE_VIP = "10.96.0.80"
STABLE_PORT = PortSpec(80, 8080, "TCP", "http", node_port=30080)
TRAFFIC_RATE = 20.0  # requests per second, per client
# How much slower than this machine the tests run (scripts/vm-test sets it for the IPVS VM,
# under emulation; tests/vm/timeouts.py stretches `eventually` by it): for the few bounds
# on elapsed time that a test asserts rather than waits for.
TIMEOUT_SCALE = float(os.environ.get("LBD_TEST_TIMEOUT_SCALE", "1") or 1)


# --- the stable service and its traffic ----------------------------------------------


def all_endpoints(env: LbdEnv) -> list[EndpointSpec]:
    return [EndpointSpec(p.ipv4, p.node) for p in env.cluster.pods]


def publish_stable(env: LbdEnv) -> None:
    """A NodePort service with an endpoint in every pod, programmed on every node."""
    env.apply(service(STABLE, [STABLE_VIP], [STABLE_PORT], type="NodePort"))
    env.apply(endpoint_slice(STABLE, all_endpoints(env), [STABLE_PORT]))
    env.wait_synced(timeout=30)


class StableTraffic:
    """Steady requests to the stable service through its ClusterIP (from a pod on
    `pod_node`) and its NodePort (from the external client, at `node_port_node`'s
    address).

    Each path crosses the datapath of the node named for it, so a fault in either
    node's daemon shows up here.
    """

    def __init__(
        self,
        env: LbdEnv,
        pod_node: str = "node-1",
        node_port_node: str = "node-2",
        rate: float = TRAFFIC_RATE,
    ) -> None:
        pod = env.cluster.pods_on(pod_node)[0]
        self.started = self.seconds = 0.0
        # A request gets 1 s here, and proportionally more under emulation, where a busy
        # vCPU alone can hold a reply back for longer.
        timeout = 1.0 * TIMEOUT_SCALE
        self.cluster_ip = SteadyTraffic(
            pod.netns, STABLE_VIP, STABLE_PORT.port, rate=rate, timeout=timeout
        )
        self.node_port = SteadyTraffic(
            env.cluster.external.netns,
            env.node(node_port_node).ipv4,
            STABLE_PORT.node_port,
            rate=rate,
            timeout=timeout,
        )

    def __enter__(self) -> StableTraffic:
        self.started = time.monotonic()
        self.cluster_ip.start()
        self.node_port.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster_ip.stop()
        self.node_port.stop()
        self.seconds = time.monotonic() - self.started

    @property
    def failures(self) -> list[Sample]:
        return self.cluster_ip.failures + self.node_port.failures

    def summary(self) -> dict[str, Any]:
        return {"cluster_ip": self.cluster_ip.summary(), "node_port": self.node_port.summary()}

    def assert_clean(self) -> None:
        """Zero failed requests, and enough successes that the traffic really ran the
        whole time (a stalled sender would otherwise pass with zero failures)."""
        summary = self.summary()
        assert self.failures == [], (summary, self.failures[:5])
        # A quarter of the nominal rate: requests are sequential and the machine is shared.
        want = int(self.seconds * TRAFFIC_RATE / 4)
        for name, part in summary.items():
            assert part["ok"] >= want, (name, part, want)


# --- the daemon's state against the API server's ----------------------------------------


def expected_state(env: LbdEnv, node: str) -> dict[str, Any]:
    """The ProxyState the server's objects call for on `node`, as /state prints it."""
    assert env.api is not None
    server = env.api.server
    cfg = ModelConfig(node, cluster_cidrs=tuple(CLUSTER_CIDRS.split(",")))
    state, _ = build_state(
        server.list_objects("services"),
        server.list_objects("endpointslices"),
        parse_node(server.get_object("nodes", None, node), node),
        cfg,
    )
    return state_to_json(state)


def daemon_state(env: LbdEnv, node: str) -> dict[str, Any]:
    status, body = http_get(env.cluster.netns_of(node), "127.0.0.1", METRICS_PORT, "/state")
    assert status == 200, body
    return json.loads(body)


def assert_converged(env: LbdEnv, timeout: float, nodes: Iterable[str] | None = None) -> float:
    """Wait until every (given) daemon's /state equals the server's; the seconds it took."""
    names = list(nodes) if nodes is not None else [n.name for n in env.cluster.nodes]
    started = time.monotonic()

    def check() -> None:
        for name in names:
            assert daemon_state(env, name) == expected_state(env, name), name

    eventually(check, timeout, interval=0.25)
    return time.monotonic() - started


# --- processes -------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def daemon_pid(env: LbdEnv, node: str) -> int:
    """The pid of `node`'s lbd process.

    The daemon is started as `ip netns exec NS python -m lbd run ...`; `ip` enters the
    namespace and execs, so the Popen pid is the Python process itself. Checked here
    rather than assumed, since CPU and memory numbers of `ip` would be meaningless.
    """
    pid = env.daemons[node].pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"lbd" in argv and b"run" in argv and b"netns" not in argv, argv
    return pid


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own user+system CPU seconds, waited-for children's) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces: fields start after its closing paren.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Direct children of `pid` (any of its threads may have forked them)."""
    out: list[int] = []
    # A process or thread may exit while we read: ENOENT, or ESRCH mid-read.
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"/proc/{pid}/task/{tid}/children") as f,
            ):
                out.extend(int(x) for x in f.read().split())
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []  # gone (ENOENT), or exiting while we read (ESRCH)


def ensure_running(env: LbdEnv, node: str) -> None:
    """Start `node`'s daemon if an earlier (failed) test left it stopped."""
    proc = env.daemons.get(node)
    if proc is None or proc.poll() is not None:
        env.daemons.pop(node, None)
        env.start_daemon(node)


def kill9(env: LbdEnv, node: str) -> None:
    """SIGKILL `node`'s daemon and reap it (no chance to run any exit code)."""
    env.stop_daemon(node, signal.SIGKILL)


def run_lbd(env: LbdEnv, node: str, *args: str) -> Any:
    return env.exec_in(node, [sys.executable, "-m", "lbd", *args], timeout=120)


# --- API request timing ----------------------------------------------------------------


class _StampedRequests(deque):  # type: ignore[type-arg]
    """The API server's request log, with the arrival time stamped on each record.

    RequestRecord carries no time; the reliability tests need the spacing of retries, so
    the server's deque is swapped for this one, which adds `at` (time.monotonic()).
    """

    def append(self, record: RequestRecord) -> None:
        record.at = time.monotonic()  # type: ignore[attr-defined]
        super().append(record)


def stamp_requests(server: ApiServer) -> None:
    if not isinstance(server.requests, _StampedRequests):
        server.requests = _StampedRequests(server.requests, maxlen=server.requests.maxlen)


def node_reflector_requests(
    server: ApiServer, node: str, since: float, until: float = float("inf")
) -> list[float]:
    """Arrival times of `node`'s Node-reflector requests (list/watch) in [since, until).

    Only the Node reflector can be told apart per daemon: it selects its own node with
    `fieldSelector=metadata.name=<node>`; Services and EndpointSlices look the same from
    every node.
    """
    want = f"metadata.name={node}"
    return sorted(
        r.at  # type: ignore[attr-defined]
        for r in list(server.requests)
        if r.resource == "nodes"
        and r.query.get("fieldSelector") == want
        and since <= getattr(r, "at", -1.0) < until
    )


def settle_watches(env: LbdEnv, timeout: float = 60.0) -> None:
    """Wait until every daemon's three watches are open and each had time to receive a
    bookmark.

    A reflector resets its backoff on the first event of a healthy watch, so an earlier
    fault leaves it escalated until then; tests that measure retry spacing start here so
    they measure their own fault, not the previous test's.
    """
    assert env.api is not None
    server = env.api.server
    want = 3 * len(env.daemons)
    eventually(lambda: _at_least(server.watch_count, want), timeout, interval=0.2)
    time.sleep(server.bookmark_interval * 1.5)
    assert server.watch_count >= want, server.watch_count


def _at_least(value: int, want: int) -> None:
    assert value >= want, (value, want)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# --- HTTP with any method --------------------------------------------------------------


def http_request(
    ns: str | None, host: str, port: int, method: str, path: str, timeout: float = 2.0
) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of one request from inside a namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = netns.socket_in(ns, family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request(method, path, body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode(errors="replace")
    finally:
        sock.close()


# --- metrics ---------------------------------------------------------------------------


def histogram(metrics: dict[str, float], name: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of an unlabelled histogram."""
    out: dict[float, float] = {}
    prefix = f'{name}_bucket{{le="'
    for key, value in metrics.items():
        if key.startswith(prefix):
            out[float(key[len(prefix) : -2])] = value
    return out


def quantile_upper_bound(
    before: dict[float, float], after: dict[float, float], q: float
) -> tuple[float, int]:
    """(upper bound of the bucket holding quantile `q`, observations) for the
    observations made between two readings of a cumulative histogram."""
    bounds = sorted(after)
    delta = {b: after[b] - before.get(b, 0.0) for b in bounds}
    total = delta[float("inf")]
    if total <= 0:
        return 0.0, 0
    for b in bounds:
        if delta[b] >= q * total:
            return b, int(total)
    return float("inf"), int(total)


# --- iptables inventory ----------------------------------------------------------------

TABLES = ("nat", "filter", "mangle")
FAMILIES = ("iptables", "ip6tables")


@dataclass(frozen=True)
class Saved:
    """One `*-save` dump of one table: chain declarations and rules in order."""

    chains: dict[str, str]  # name -> policy ("-" for user chains)
    rules: list[str]  # "-A CHAIN ..." lines, in order

    def rules_of(self, chain: str) -> list[str]:
        head = f"-A {chain} "
        return [r for r in self.rules if r.startswith(head)]


def parse_save(text: str) -> Saved:
    chains: dict[str, str] = {}
    rules: list[str] = []
    for line in text.splitlines():
        if line.startswith(":"):
            # ":NAME POLICY [packets:bytes]": counters are dropped (they always differ).
            name, policy, *_ = line[1:].split()
            chains[name] = policy
        elif line.startswith("-A "):
            rules.append(line)
    return Saved(chains, rules)


def _legacy_instantiated(env: LbdEnv, node: str, family: str) -> set[str]:
    # Reading a legacy table instantiates it; look before touching (as lbd does).
    name = "ip_tables_names" if family == "iptables" else "ip6_tables_names"
    proc = env.exec_in(node, ["cat", f"/proc/net/{name}"])
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def save_all(
    env: LbdEnv,
    node: str,
    variants: Iterable[str] = ("nft", "legacy"),
    tables: Iterable[str] = TABLES,
) -> dict[tuple[str, str, str], Saved]:
    """Every (variant, family, table) the node's kernel holds (or the ones asked for),
    parsed."""
    out: dict[tuple[str, str, str], Saved] = {}
    for variant in variants:
        for family in FAMILIES:
            binary = f"{family}-{variant}-save"
            for table in tables:
                if variant == "legacy" and table not in _legacy_instantiated(env, node, family):
                    continue
                proc = env.exec_in(node, [binary, "-t", table])
                if proc.returncode == 0:
                    out[(variant, family, table)] = parse_save(proc.stdout)
    return out


# Chain prefixes of the iptables mode and of the ipvs mode (which keeps its own, so the
# two never clobber each other during a mode switch), and of lbd's ipsets.
CHAIN_PREFIXES = ("LBD-", "LBDIPVS-")
CANARIES = ("LBD-PROXY-CANARY", "LBDIPVS-CANARY")
IPSET_PREFIXES = ("LBD-", "LBD6-")


def owned_chain(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIXES)


def mentions_lbd(text: str) -> bool:
    """A chain or rule that names one of lbd's chains or ipsets."""
    return any(p in text for p in (*CHAIN_PREFIXES, *IPSET_PREFIXES))


def lbd_variant(env: LbdEnv, node: str) -> str:
    """Which iptables variant holds lbd's rules on `node` (its canary chain)."""
    # The canary is in every table; mangle is the small one (nat may be megabytes).
    found = [
        v
        for (v, _, _), s in save_all(env, node, tables=("mangle",)).items()
        if any(c in s.chains for c in CANARIES)
    ]
    assert found, "lbd's canary chain is in no iptables variant"
    assert len(set(found)) == 1, found
    return found[0]


Inventory = dict[tuple[str, str], dict[str, tuple[str, ...]]]


def lbd_inventory(env: LbdEnv, node: str, variant: str) -> Inventory:
    """lbd's part of the node's rule set: per (family, table), every chain of lbd's with
    its rules in order, and the rules of other chains that mention lbd's chains or sets."""
    out: Inventory = {}
    for (_, family, table), saved in save_all(env, node, (variant,)).items():
        part: dict[str, tuple[str, ...]] = {}
        for chain in saved.chains:
            rules = saved.rules_of(chain)
            if owned_chain(chain):
                part[chain] = tuple(rules)
            else:
                mine = tuple(r for r in rules if mentions_lbd(r))
                if mine:
                    part[chain] = mine
        if part:
            out[(family, table)] = part
    return out


def lbd_mentions(env: LbdEnv, node: str) -> list[str]:
    """Every chain or rule, in any variant, family and table, that mentions lbd's chains
    or ipsets."""
    found = []
    for key, saved in save_all(env, node).items():
        found += [f"{key}: :{c}" for c in saved.chains if mentions_lbd(c)]
        found += [f"{key}: {r}" for r in saved.rules if mentions_lbd(r)]
    return found


@contextlib.contextmanager
def sampling(interval: float, fn: Any) -> Iterator[list[Any]]:
    """Call `fn()` every `interval` seconds in a thread while the block runs; the
    results (exceptions included) are collected in the yielded list."""
    results: list[Any] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                results.append(fn())
            except Exception as err:  # noqa: BLE001 - recorded for the test to judge
                results.append(err)
            stop.wait(interval)

    thread = threading.Thread(target=loop, name="sampler", daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(10)


# --- whole-datapath inventories (every mode) ---------------------------------------------

# The eBPF maps the control plane owns; the others (conntrack, affinity, socket reverse
# NAT) fill with traffic and are the datapath's own.
EBPF_CONTROL_MAPS = (
    "lbd_services",
    "lbd_backends",
    "lbd_revnat",
    "lbd_maglev",
    "lbd_aff_match",
    "lbd_srcrange",
    "lbd_svcnames",
)


def lbd_status(env: LbdEnv, node: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """`lbd status --json` of `node`, read back from the kernel, as sorted tuples."""
    proc = run_lbd(
        env, node, "status", "--json", "--proxy-mode", env.mode, *env.location_args(node)
    )
    assert proc.returncode == 0, proc.stderr
    return sorted(
        (r["service"], r["kind"], r["frontend"], tuple(sorted(r["endpoints"])))
        for r in json.loads(proc.stdout)
    )


def _bpffs_dir(env: LbdEnv, node: str) -> str:
    return env.ebpf_options(node)["bpffs"]


def pinned_objects(env: LbdEnv, node: str) -> list[str]:
    """Every map and link pinned under the node's bpffs directory (relative paths)."""
    root = _bpffs_dir(env, node)
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(out)


def ebpf_map_entries(
    env: LbdEnv, node: str, maps: Iterable[str] = EBPF_CONTROL_MAPS
) -> dict[str, int]:
    """Entries in each control-plane map (ids differ between daemons; counts may not)."""
    out = {}
    for name in maps:
        path = os.path.join(_bpffs_dir(env, node), name)
        proc = subprocess.run(
            ["bpftool", "-j", "map", "dump", "pinned", path],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, (name, proc.stderr)
        out[name] = len(json.loads(proc.stdout))
    return out


def tc_programs(env: LbdEnv, node: str) -> list[str]:
    """ "device parent program" for every BPF tc filter in the node's namespace."""
    links = env.exec_in(node, ["ip", "-j", "link", "show"])
    out = []
    for link in json.loads(links.stdout):
        dev = link["ifname"]
        for parent in ("ingress", "egress"):
            proc = env.exec_in(node, ["tc", "-j", "filter", "show", "dev", dev, parent])
            if proc.returncode != 0 or not proc.stdout.strip():
                continue
            for f in json.loads(proc.stdout):
                name = (f.get("options") or {}).get("bpf_name")
                if name:
                    out.append(f"{dev} {parent} {name}")
    return sorted(set(out))


def ipvs_services(env: LbdEnv, node: str) -> list[str]:
    """`ipvsadm -Sn` of the node: virtual services and real servers (an independent
    witness beside lbd's own status), sorted."""
    proc = env.exec_in(node, ["ipvsadm", "-Sn"])
    assert proc.returncode == 0, proc.stderr
    return sorted(line for line in proc.stdout.splitlines() if line.strip())


def lbd_ipsets(env: LbdEnv, node: str) -> list[str]:
    """lbd's ipsets with their members, as `ipset save` writes them, sorted."""
    proc = env.exec_in(node, ["ipset", "save"])
    assert proc.returncode == 0, proc.stderr
    # `initval` is the set's random hash seed: it differs between any two creations.
    return sorted(
        re.sub(r" initval 0x[0-9a-f]+", "", line)
        for line in proc.stdout.splitlines()
        if len(parts := line.split()) > 1 and parts[1].startswith(IPSET_PREFIXES)
    )


def kernel_inventory(env: LbdEnv, node: str) -> dict[str, Any]:
    """Everything of lbd's that `node`'s kernel holds in the env's mode, in a form two
    daemons that programmed the same services write identically (no map ids, no
    counters): frontends -> endpoints read back by `lbd status`, plus per mode the rules,
    ipsets, IPVS table and dummy addresses, or the pinned objects, map fill levels and
    attached tc programs."""
    inv: dict[str, Any] = {"status": lbd_status(env, node)}
    if env.mode in ("iptables", "ipvs"):
        inv["rules"] = lbd_inventory(env, node, lbd_variant(env, node))
    if env.mode == "ipvs":
        inv["ipvs"] = ipvs_services(env, node)
        inv["ipsets"] = lbd_ipsets(env, node)
        inv["dummy"] = env.ipvs_dummy_addresses(node)
    if env.mode == "ebpf":
        inv["pinned"] = pinned_objects(env, node)
        inv["maps"] = ebpf_map_entries(env, node)
        inv["tc"] = tc_programs(env, node)
    return inv


def lbd_leftovers(env: LbdEnv, node: str) -> list[str]:
    """Anything of any lbd mode still in `node`'s kernel (empty after `lbd cleanup
    --proxy-mode all`): LBD- chains and rules in every iptables variant, ipsets, IPVS
    services, the dummy interface, pinned BPF objects and tc programs."""
    found = lbd_mentions(env, node)
    found += [f"ipset: {line}" for line in lbd_ipsets(env, node)]
    ipvs = env.exec_in(node, ["ipvsadm", "-Sn"])
    if ipvs.returncode == 0:  # no IPVS in this kernel: nothing to leave behind
        found += [f"ipvs: {line}" for line in ipvs.stdout.splitlines() if line.strip()]
    if env.ipvs_dummy_addresses(node) is not None:
        found.append("the ipvs dummy interface")
    if env.mode == "ebpf":
        found += [f"pinned: {p}" for p in pinned_objects(env, node)]
        found += [f"tc: {t}" for t in tc_programs(env, node) if "lbd" in t]
    return found
