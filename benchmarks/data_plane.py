"""The data-plane benchmark: real traffic through each proxy mode's datapath.

Owns what is measured and in which order. For every datapath target (iptables per
variant; ebpf twice, with socket LB for pods and with socket LB limited to the host's
namespace so that pod traffic takes the tc per-packet path; IPVS when the kernel has
it) and every number of *other* services installed beside the benchmark's own (the
workload's fake services, which only make rule lists and maps big), it runs, with the C
tools of `benchmarks.traffic_tools`:

- conn_rate: new connections per second, one HTTP request each (wrk, Connection: close);
- latency: HTTP request latency p50/p99 on kept-alive connections (wrk --latency);
- throughput: bulk TCP (iperf3);
- udp_rr: UDP request/response round trip p50/p99 (sockperf ping-pong);

each on four paths (`dp_cluster.PATHS`): the ClusterIP from a client pod and, as its
physical limit, the server pod's IP from the same pod; the NodePort from the external
client and the pod IP from the same external client. The paths of one test run back to
back and in a rotating order, for `rounds` rounds; a path's ratio to its reference is the
median of the per-round ratios, so slow drift of a shared machine (other load comes and
goes) cancels out instead of landing in one path's numbers.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import control_plane
from benchmarks import traffic_tools as tools
from benchmarks.dp_cluster import (
    CLIENT_PORT_RANGES,
    HTTP,
    IPERF,
    PATHS,
    REFERENCE,
    SOCKPERF,
    BenchCluster,
    DataTarget,
    Path_,
    ebpf_map_max,
)
from benchmarks.machine import load_average
from benchmarks.workload import Workload

JSON = dict[str, Any]
Log = Callable[[str], None]

TESTS = ("conn_rate", "latency", "throughput", "udp_rr")
# The tool each test needs (a missing one skips the test, with the reason).
TEST_TOOL = {"conn_rate": "wrk", "latency": "wrk", "throughput": "iperf3", "udp_rr": "sockperf"}
DEFAULT_SIZES = (0, 1000, 10000)
# CI-sized: one size with other services, so seeding them is exercised; ~30 s a target.
QUICK_SIZES = (100,)


@dataclass(frozen=True, slots=True)
class Settings:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    endpoints_per_service: int = 10
    rounds: int = 3
    seconds: float = 3.0  # per run of wrk; iperf3 and sockperf too
    connections: int = 16  # wrk's concurrent connections for conn_rate
    latency_connections: int = 4  # and for latency (few: latency, not queueing)
    pin_cpus: bool = False

    @classmethod
    def quick(cls) -> Settings:
        return cls(sizes=QUICK_SIZES, rounds=1, seconds=1.0)


# --------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True, slots=True)
class Skipped:
    target: str
    reason: str


def select_targets(
    modes: list[str], iptables_variant: str | None, *, quick: bool = False
) -> tuple[list[DataTarget], list[Skipped]]:
    """The datapaths to measure and the ones this host cannot run (with the reason).

    The host checks are the control plane's (a mode whose backend is missing or whose
    kernel lacks a feature is skipped there too); ebpf becomes two datapaths."""
    found, skipped = control_plane.select_targets(modes, iptables_variant, quick=quick)
    targets: list[DataTarget] = []
    for t in found:
        if t.mode == "ebpf":
            targets.append(DataTarget("ebpf-socket", "ebpf", socket_lb=True))
            targets.append(DataTarget("ebpf-tc", "ebpf", socket_lb=False))
        else:
            targets.append(DataTarget(t.label, t.mode, t.variant, max_services=t.max_services))
    return targets, [Skipped(s.target, s.reason) for s in skipped]


def available_tests() -> tuple[list[str], list[Skipped]]:
    tests, skipped = [], []
    for test in TESTS:
        tool = TEST_TOOL[test]
        if shutil.which(tool) is None:
            skipped.append(Skipped(test, f"{tool} is not installed (apt-get install {tool})"))
        else:
            tests.append(test)
    return tests, skipped


def tool_versions() -> JSON:
    out: JSON = {}
    for name, argv in tools.VERSION_ARGV.items():
        if shutil.which(argv[0]) is None:
            out[name] = "not installed"
            continue
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        out[name] = tools.first_line(proc.stdout) or tools.first_line(proc.stderr)
    return out


# --------------------------------------------------------------------------------------
# One run of one tool on one path


def run_test(env: BenchCluster, test: str, path: Path_, settings: Settings) -> JSON:
    """One measurement; raises tools.ToolFailed if it did not measure anything."""
    secs = settings.seconds
    if test in ("conn_rate", "latency"):
        host, port = env.address(path, HTTP)
        close = test == "conn_rate"
        argv = tools.wrk_argv(
            f"http://{host}:{port}/",
            connections=settings.connections if close else settings.latency_connections,
            seconds=secs,
            close=close,
        )
        parse: Callable[[str], JSON] = tools.parse_wrk
    elif test == "throughput":
        host, port = env.address(path, IPERF)
        argv = tools.iperf3_argv(host, port, seconds=secs)
        parse = tools.parse_iperf3
    elif test == "udp_rr":
        host, port = env.address(path, SOCKPERF)
        argv = tools.sockperf_argv(host, port, seconds=secs)
        parse = tools.parse_sockperf
    else:
        raise ValueError(test)
    counters = env.tcp_counters()
    started = time.monotonic()
    try:
        proc = env.run_client(path, argv, timeout=secs + 60)
    except subprocess.TimeoutExpired:
        raise tools.ToolFailed(f"{argv[0]} did not finish in {secs + 60:.0f} s") from None
    if proc.returncode != 0:
        raise tools.ToolFailed(
            f"{argv[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
        )
    # The tool's own wall time too: a run that took far longer than asked (a slow
    # connect, a stuck teardown) is worth seeing beside its numbers; and the SYNs that
    # had to be sent again (each costs a connection ~10 ms to 1 s, not the datapath's
    # per-packet work), with how many of them the server's TIME_WAIT refused.
    wall_s = time.monotonic() - started
    after = env.tcp_counters()
    tcp = {k: after[k] - counters[k] for k in counters}
    return {**parse(proc.stdout), "wall_s": wall_s, "tcp": tcp}


def metrics_of(test: str, sample: JSON) -> JSON:
    """The numbers of a sample that the summary keeps (medians over rounds)."""
    if test == "conn_rate":
        return {"requests_per_s": sample["requests_per_s"]}
    if test == "latency":
        lat = sample["latency_us"]
        rate = sample["requests_per_s"]
        return {"p50_us": lat["p50"], "p99_us": lat["p99"], "requests_per_s": rate}
    if test == "throughput":
        return {"bits_per_s": sample["bits_per_s"]}
    rtt = sample["rtt_us"]
    return {"p50_us": rtt["p50"], "p99_us": rtt["p99"], "avg_us": rtt["avg"]}


def summarize(test_samples: dict[str, dict[str, list[JSON | None]]]) -> tuple[JSON, JSON]:
    """(summary, ratios) from {test: {path: [sample or None per round]}}.

    summary[test][path][metric]: the median over the rounds that measured something.
    ratios[test][path][metric]: for a load-balanced path, the median over rounds of
    path / reference in the same round (1.0: as fast as going to the pod directly; for
    rates below 1 is worse, for latencies above 1 is worse)."""
    summary: JSON = {}
    ratios: JSON = {}
    for test, by_path in test_samples.items():
        summary[test] = {}
        for path, samples in by_path.items():
            got = [metrics_of(test, s) for s in samples if s is not None]
            if got:
                summary[test][path] = {
                    k: statistics.median(g[k] for g in got) for k in got[0] if got[0][k] is not None
                }
                summary[test][path]["n"] = len(got)
        ratios[test] = {}
        for path, ref in REFERENCE.items():
            pairs = [
                (metrics_of(test, a), metrics_of(test, b))
                for a, b in zip(by_path.get(path, []), by_path.get(ref, []), strict=False)
                if a is not None and b is not None
            ]
            if pairs:
                ratios[test][path] = {
                    k: statistics.median(a[k] / b[k] for a, b in pairs if b[k])
                    for k in pairs[0][0]
                    if all(b[k] for _, b in pairs)
                }
    return summary, ratios


# --------------------------------------------------------------------------------------
# One target at one size


def measure_size(
    env: BenchCluster, tests: list[str], settings: Settings, log: Log
) -> tuple[dict[str, dict[str, list[JSON | None]]], list[JSON]]:
    """Every test on every path for `settings.rounds` rounds: (samples, failures)."""
    samples: dict[str, dict[str, list[JSON | None]]] = {
        t: {p.name: [] for p in PATHS} for t in tests
    }
    failures: list[JSON] = []
    broken: set[str] = set()
    # A path that does not carry a short HTTP exchange is broken for this size: record
    # it once instead of letting every tool time out on it.
    for path in PATHS:
        try:
            run_test(env, "latency", path, Settings(seconds=1, latency_connections=1))
        except tools.ToolFailed as e:
            log(f"path {path.name} does not work: {e}")
            failures.append({"test": "check", "path": path.name, "round": None, "error": str(e)})
            broken.add(path.name)
    for r in range(settings.rounds):
        for test in tests:
            # Rotate the order each round: no path always runs right after another.
            order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
            for path in order:
                if path.name in broken:
                    samples[test][path.name].append(None)
                    continue
                try:
                    sample = run_test(env, test, path, settings)
                except tools.ToolFailed as e:
                    log(f"round {r + 1} {test} {path.name}: {e}")
                    failures.append({"test": test, "path": path.name, "round": r, "error": str(e)})
                    sample = None
                samples[test][path.name].append(sample)
        log(f"round {r + 1}/{settings.rounds} done")
    # Keep every path's list aligned with the rounds (samples[t][p][r] is round r).
    return samples, failures


def witness_error(target: DataTarget, maps: dict[str, int]) -> str | None:
    """Why the ebpf numbers are not those of the path the target claims, if they are not:
    socket LB must have translated the pod's sockets, the tc target none of them."""
    if target.mode != "ebpf":
        return None
    sockets = maps.get("lbd_sockrev", 0)
    if target.socket_lb and not sockets:
        return "socket LB translated no socket: pod traffic took the tc path"
    if not target.socket_lb and sockets:
        return f"socket LB translated {sockets} sockets: pod traffic did not take the tc path"
    return None


def describe(summary: JSON, ratios: JSON) -> str:
    """One log line: the conn-rate figures, the number everybody asks for first."""
    conn = summary.get("conn_rate", {})
    parts = [f"{p} {conn[p]['requests_per_s']:,.0f}/s" for p in ("pod", "clusterip") if p in conn]
    ratio = ratios.get("conn_rate", {}).get("clusterip", {}).get("requests_per_s")
    if ratio is not None:
        parts.append(f"ClusterIP/pod {ratio:.0%}")
    return "new connections: " + (", ".join(parts) if parts else "no result")


def run_target(
    target: DataTarget,
    settings: Settings,
    tests: list[str],
    workload: Workload,
    section: JSON,
    save: Callable[[], None],
    log: Log,
) -> None:
    """All sizes of one target in one cluster, growing the other services in between."""
    sizes = [s for s in settings.sizes if target.max_services is None or s <= target.max_services]
    for s in settings.sizes:
        if s not in sizes:
            section["not_run"].append(
                {
                    "target": target.label,
                    "services": s,
                    "reason": f"not run above {target.max_services:,} services by default "
                    "(slow sync); pass --iptables-variant to force",
                }
            )
    if not sizes:
        return
    map_max = ebpf_map_max(max(sizes), settings.endpoints_per_service)
    current = None
    try:
        with BenchCluster(target, map_max=map_max, pin_cpus=settings.pin_cpus) as env:
            section["config"]["http_server"] = env.http_server
            for services in sizes:
                current = services
                env.seed(workload, services)
                log(f"{target.label}, {services:,} other services: starting lbd")
                synced_s = env.restart_daemon()
                log(f"{target.label}, {services:,} other services: synced in {synced_s:.1f} s")
                cpu_before, load_start = env.daemon_cpu_s(), load_average()
                started = time.monotonic()
                samples, failures = measure_size(
                    env, tests, settings, lambda m, s=services: log(f"{target.label} @ {s:,}: {m}")
                )
                cpu_after = env.daemon_cpu_s()
                summary, ratios = summarize(samples)
                witness = env.ebpf_map_counts()
                wrong = witness_error(target, witness)
                if wrong:
                    failures.append(
                        {"test": "witness", "path": "clusterip", "round": None, "error": wrong}
                    )
                section["runs"].append(
                    {
                        **asdict(target),
                        "target": target.label,
                        "services": services,
                        "endpoints_per_service": settings.endpoints_per_service,
                        "daemon": {
                            "start_to_synced_s": synced_s,
                            # lbd's own CPU while traffic ran: should be ~0; if not, it
                            # competed with the traffic for the machine's cores.
                            "cpu_s_while_measuring": (
                                cpu_after - cpu_before
                                if cpu_after is not None and cpu_before is not None
                                else None
                            ),
                            "rss_bytes": env.daemon_rss_bytes(),
                            "bpf_lb_map_max": map_max if target.mode == "ebpf" else None,
                        },
                        "measuring_s": time.monotonic() - started,
                        # ebpf: entries in lbd_sockrev / lbd_ct after the traffic.
                        "bpf_map_entries": witness,
                        "load_average": {"start": load_start, "end": load_average()},
                        "samples": samples,
                        "failures": failures,
                        "summary": summary,
                        "ratios": ratios,
                    }
                )
                log(f"{target.label} @ {services:,}: {describe(summary, ratios)}")
                save()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        # One target failing (ebpf's maps too small, a daemon that dies) must not throw
        # away the other targets' numbers; later sizes of this target are not tried.
        error = f"{type(e).__name__}: {e}"
        log(f"{target.label} at {current} other services FAILED: {error}")
        traceback.print_exc(file=sys.stderr)
        section["failed"].append({"target": target.label, "services": current, "error": error})
        save()


def new_section(
    settings: Settings,
    targets: list[DataTarget],
    skipped: list[Skipped],
    tests: list[str],
    skipped_tests: list[Skipped],
) -> JSON:
    return {
        "schema": 1,
        "config": {
            **asdict(settings),
            "tests": tests,
            "paths": [asdict(p) for p in PATHS],
            "references": REFERENCE,
            # Client source ports of the direct / load-balanced paths (dp_cluster says why).
            "client_port_ranges": {
                "direct": CLIENT_PORT_RANGES[False],
                "via_lb": CLIENT_PORT_RANGES[True],
            },
            "targets": [asdict(t) for t in targets],
            "tools": tool_versions(),
            "http_server": None,
            "topology": "1 node, client pod and server pod on it, external client on the "
            "fabric; the Service has the server pod as its only endpoint",
        },
        "skipped": [asdict(s) for s in skipped],
        "skipped_tests": [asdict(s) for s in skipped_tests],
        "not_run": [],
        "failed": [],
        "runs": [],
    }


def run(
    modes: list[str],
    iptables_variant: str | None,
    settings: Settings,
    *,
    quick: bool,
    results: JSON,
    save: Callable[[], None],
    log: Log,
) -> JSON:
    """Measure every target; the section is stored as results["data_plane"] and saved
    after every target and size, so an interrupted run keeps what it finished."""
    targets, skipped = select_targets(modes, iptables_variant, quick=quick)
    tests, skipped_tests = available_tests()
    for s in [*skipped, *skipped_tests]:
        log(f"skipping {s.target}: {s.reason}")
    section = new_section(settings, targets, skipped, tests, skipped_tests)
    results["data_plane"] = section
    save()
    if not tests:
        return section
    workload = Workload(max(settings.sizes), settings.endpoints_per_service)
    for target in targets:
        run_target(target, settings, tests, workload, section, save, log)
    return section
