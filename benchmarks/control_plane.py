"""The control-plane benchmark: how fast lbd turns API objects into programmed rules.

Owns three measurements per cluster size, all on the same synthetic workload:
- state build: the initial paginated list of Services, EndpointSlices and the Node by
  real Reflectors over HTTP, then `build_state` over the stores; wall time and the CPU of
  the benchmark process (the API server runs in a subprocess, so its CPU is not counted);
  plus a rebuild after one object changed (StateBuilder told what changed, as in the daemon);
- full sync: a backend programming the whole state into a fresh network namespace;
- one-service changes: from a synced state, change one EndpointSlice, rebuild the state
  and sync it (partial, and full for comparison); the per-change wall time is what a
  user waits for between a pod change reaching lbd and the rules being in the kernel.

A mode is measured through the Backend protocol only, so IPVS and eBPF plug in as soon
as `backends.registry.create_backend` can build them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gc
import importlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from backends.base import Backend, HostUnsupported, SyncResult
from backends.registry import check_host, create_backend
from benchmarks.namespaces import scratch_netns
from benchmarks.workload import NODE_NAME, Workload, change_target, changed_slice, model_config
from lbd.config import ProxyConfig
from lbd.k8s import ENDPOINTSLICES, NODES, SERVICES, ApiClient, Reflector, Store
from lbd.model.build import Changes, ParseCache, StateBuilder, build_state, parse_node
from lbd.model.parse import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from lbd.model.state import ProxyState
from lbd.testing import netns

JSON = dict[str, Any]
Log = Callable[[str], None]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ("iptables", "ipvs", "ebpf")
# iptables-nft-restore is far slower than legacy for large payloads (ENVIRONMENT.md: ~30x
# at 10k services; measured here: seconds at 1,000 services x 10 endpoints), so by default
# nft is measured only at sizes where a run stays reasonable.
NFT_DEFAULT_MAX_SERVICES = 1000
NFT_QUICK_MAX_SERVICES = 100
LIST_TIMEOUT_S = 300.0
SERVER_START_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated between the closest ranks, so
    p99 of 100 samples sits between the two slowest instead of being the slowest."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float]) -> JSON:
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def _children_cpu() -> tuple[float, float]:
    """CPU of finished child processes (iptables-restore and friends): (user + system,
    system). The system part is the kernel's work for them: with iptables-legacy, mostly
    replacing the whole table on each commit, however small the change."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_stime


@dataclass(slots=True)
class _Clock:
    """Wall time, this process's CPU and its children's CPU, read together."""

    wall: float
    cpu: float
    children: float
    children_sys: float

    @classmethod
    def now(cls) -> _Clock:
        return cls(time.perf_counter(), time.process_time(), *_children_cpu())

    def since(self, start: _Clock) -> JSON:
        return {
            "wall_s": self.wall - start.wall,
            "cpu_s": self.cpu - start.cpu,
            "children_cpu_s": self.children - start.children,
        }


class ToolTracer:
    """Wall time of every external program a sync runs, by program (and table).

    Backends run their kernel tools through `subprocess.run`; wrapping it while a sync
    is timed tells, without touching the backend, how a sync's wall time splits between
    lbd's own Python and each tool (iptables-save of nat, iptables-restore, ...).
    """

    def __init__(self) -> None:
        self._calls: list[tuple[str, float]] = []
        self._real = subprocess.run

    def __enter__(self) -> ToolTracer:
        real = self._real

        def traced(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                argv = args[0] if args else kwargs.get("args", ())
                self._calls.append((tool_name(argv), time.perf_counter() - start))

        subprocess.run = traced  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run = self._real  # type: ignore[assignment]

    def take(self) -> dict[str, JSON]:
        """{tool: {"calls": n, "wall_s": total}} since the last take()."""
        out: dict[str, JSON] = {}
        for name, wall in self._calls:
            entry = out.setdefault(name, {"calls": 0, "wall_s": 0.0})
            entry["calls"] += 1
            entry["wall_s"] += wall
        self._calls.clear()
        return out


def tool_name(argv: Any) -> str:
    """ "iptables-legacy-save -t nat" for `ip netns exec NS iptables-legacy-save -t nat`."""
    if isinstance(argv, str | bytes):
        return "shell"
    parts = [str(a) for a in argv]
    if parts[:3] == ["ip", "netns", "exec"]:
        parts = parts[4:]
    if not parts:
        return "?"
    name = os.path.basename(parts[0])
    if "-t" in parts[:-1]:
        name += f" -t {parts[parts.index('-t') + 1]}"
    if "-S" in parts:
        name += " -S"
    return name


def tools_wall(tools: dict[str, JSON]) -> float:
    return sum(t["wall_s"] for t in tools.values())


# --------------------------------------------------------------------------------------
# What gets measured


@dataclass(frozen=True, slots=True)
class Target:
    """One backend configuration to measure: a mode and, for iptables, its variant."""

    mode: str
    variant: str | None = None
    max_services: int | None = None  # larger sizes are skipped for this target

    @property
    def label(self) -> str:
        return f"{self.mode}-{self.variant}" if self.variant else self.mode

    def runs_at(self, services: int) -> bool:
        return self.max_services is None or services <= self.max_services

    def make_backend(self, ns: str) -> Backend:
        extra = {}
        if self.mode == "ebpf":
            # Map programming is what the control plane costs. Socket LB is off: its
            # programs act on a cgroup, and the default one is every process of the host.
            extra = {
                "ebpf": {"cgroup": "", "bpffs": f"/run/lbd/bpffs/bench-{ns}", "gc_interval": 0}
            }
        if self.mode == "ipvs":
            # The IPVS backend imports pyroute2 (for reads of rare objects and set creation)
            # at its first kernel session: 0.25 s here, ~10 s under the VM's emulation. A
            # daemon pays that once at start; a full sync's time should not include it.
            for module in ("pyroute2", "pyroute2.ipset", "pyroute2.ipvs"):
                importlib.import_module(module)
        cfg = ProxyConfig(mode=self.mode, iptables_variant=self.variant or "auto", extra=extra)
        backend = create_backend(cfg, netns=ns)
        # A backend that would program the namespace the benchmark runs in must never be
        # driven from here: insist that it says it targets the scratch namespace.
        if getattr(backend, "netns", None) != ns:
            raise HostUnsupported(
                f"the {self.label} backend cannot be pointed at a named network namespace"
            )
        return backend


@dataclass(frozen=True, slots=True)
class Skipped:
    target: str
    reason: str


def select_targets(
    modes: list[str], iptables_variant: str | None, *, quick: bool = False
) -> tuple[list[Target], list[Skipped]]:
    """The targets to run and the ones this host or build cannot run (with the reason)."""
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for mode in modes:
        if mode not in MODES:
            skipped.append(Skipped(mode, f"unknown mode (choose from {', '.join(MODES)})"))
            continue
        try:
            importlib.import_module(f"backends.{mode}.backend")
        except ImportError as e:
            skipped.append(Skipped(mode, f"the {mode} backend is not in this build ({e})"))
            continue
        if mode == "iptables":
            wanted = (
                [
                    Target(mode, "legacy"),
                    Target(
                        mode, "nft", NFT_QUICK_MAX_SERVICES if quick else NFT_DEFAULT_MAX_SERVICES
                    ),
                ]
                if iptables_variant is None
                else [Target(mode, iptables_variant)]
            )
        else:
            wanted = [Target(mode)]
        for target in wanted:
            try:
                check_host(mode, target.variant or "auto")
            except HostUnsupported as e:
                skipped.append(Skipped(target.label, str(e)))
                continue
            targets.append(target)
    return targets, skipped


# --------------------------------------------------------------------------------------
# The API server, in its own process


class ApiServerProcess:
    """`benchmarks.seeded_apiserver` as a subprocess holding one workload."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.token = secrets.token_hex(8)
        self.url = ""
        self.startup_s = 0.0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ApiServerProcess:
        started = time.perf_counter()
        self._proc = subprocess.Popen(
            [
                sys.executable, "-m", "benchmarks.seeded_apiserver",
                "--services", str(self.workload.services),
                "--endpoints-per-service", str(self.workload.endpoints_per_service),
                "--token", self.token,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,  # `benchmarks` is not an installed package: import it from the checkout
        )  # fmt: skip
        try:
            self.url = self._read_url()
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def _read_url(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line: list[str] = []
        # readline() cannot time out; a reader thread can be abandoned if it must.
        reader = threading.Thread(
            target=lambda: line.append(self._proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(SERVER_START_TIMEOUT_S)
        text = line[0].strip() if line else ""
        if not text.startswith("listening on "):
            raise RuntimeError(
                f"the benchmark API server did not start (exit code {self._proc.poll()}, "
                f"said {text!r})"
            )
        return text.removeprefix("listening on ")

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------------------
# State build


@dataclass(slots=True)
class Snapshot:
    """The listed stores and the state built from them: the start of every sync run."""

    services: Store
    slices: Store
    nodes: Store
    cache: ParseCache
    state: ProxyState


async def _list_and_build(url: str, token: str) -> tuple[JSON, Snapshot]:
    client = ApiClient.from_url(url, token=token)
    services, slices = Store("Service"), Store("EndpointSlice")
    nodes = Store("Node", namespaced=False)
    # The daemon's own selectors, so the server filters exactly as it would for lbd.
    not_ours = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
    reflectors = [
        Reflector(client, SERVICES, services, label_selector=not_ours),
        Reflector(client, ENDPOINTSLICES, slices, label_selector=not_ours),
        Reflector(client, NODES, nodes, field_selector=f"metadata.name={NODE_NAME}"),
    ]
    tasks: list[asyncio.Task[None]] = []
    try:
        gc.collect()
        start = _Clock.now()
        tasks = [asyncio.create_task(r.run()) for r in reflectors]
        await asyncio.wait_for(
            asyncio.gather(*(r.synced.wait() for r in reflectors)), LIST_TIMEOUT_S
        )
        listed = _Clock.now()
        cache = ParseCache()
        node = parse_node(nodes.get(NODE_NAME), NODE_NAME)
        state, rejected = build_state(
            services.values(), slices.values(), node, model_config(), cache
        )
        built = _Clock.now()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    errors = sum(r.errors for r in reflectors)
    if errors or rejected:
        raise RuntimeError(
            f"state build went wrong: {errors} list errors, {len(rejected)} rejected"
        )
    run = {
        "list": listed.since(start),
        "build": built.since(listed),
        "total": built.since(start),
        "services_listed": len(services),
        "slices_listed": len(slices),
        "service_ports": len(state.service_ports),
        "list_pages": sum(r.lists for r in reflectors),
    }
    return run, Snapshot(services, slices, nodes, cache, state)


def _rebuild_after_one_change(snapshot: Snapshot, workload: Workload, k: int) -> JSON:
    """Change one slice in the stores and rebuild incrementally, as the daemon does (timed)."""
    driver = ChangeDriver(snapshot, workload, first_change=k)
    gc.collect()
    start = _Clock.now()
    driver.apply_next_change()
    driver.build()
    return _Clock.now().since(start)


def measure_build(workload: Workload, repeats: int, log: Log) -> tuple[JSON, Snapshot]:
    """List + build `repeats` times against a seeded API server; the last snapshot is kept
    for the sync measurements."""
    runs: list[JSON] = []
    snapshot: Snapshot | None = None
    with ApiServerProcess(workload) as server:
        log(f"API server seeded in {server.startup_s:.1f} s")
        for i in range(repeats):
            run, snapshot = asyncio.run(_list_and_build(server.url, server.token))
            runs.append(run)
            log(
                f"build {i + 1}/{repeats}: list {run['list']['wall_s']:.2f} s wall "
                f"{run['list']['cpu_s']:.2f} s CPU, build_state {run['build']['cpu_s']:.2f} s "
                f"CPU, total {run['total']['cpu_s']:.2f} s CPU"
            )
    assert snapshot is not None
    rebuilds = [_rebuild_after_one_change(snapshot, workload, k) for k in range(5)]
    result = {
        "runs": runs,
        "median": {
            part: {
                metric: statistics.median(r[part][metric] for r in runs)
                for metric in ("wall_s", "cpu_s")
            }
            for part in ("list", "build", "total")
        },
        "rebuild_one_change": {
            "runs": rebuilds,
            "median": {m: statistics.median(r[m] for r in rebuilds) for m in ("wall_s", "cpu_s")},
        },
    }
    log(
        f"rebuild after one change: {result['rebuild_one_change']['median']['cpu_s'] * 1000:.0f}"
        " ms CPU (median of 5)"
    )
    return result, snapshot


# --------------------------------------------------------------------------------------
# Changes


class ChangeDriver:
    """Private copies of the stores and cache on which single-service changes are made,
    so every target starts from the same listed state."""

    def __init__(self, snapshot: Snapshot, workload: Workload, first_change: int = 0) -> None:
        self.workload = workload
        self.services = _copy_store(snapshot.services)
        self.slices = _copy_store(snapshot.slices)
        self.node = parse_node(snapshot.nodes.get(NODE_NAME), NODE_NAME)
        self.cache = _copy_cache(snapshot.cache)
        self.config = model_config()
        self.next_change = first_change
        self._rv = 1 + max(
            int(self.services.resource_version or 0), int(self.slices.resource_version or 0)
        )
        # The daemon's incremental builder, warmed by a full build (untimed) as the
        # daemon's is by its first sync; then each build is told what changed.
        self.builder = StateBuilder(self.config, self.cache)
        self._changes: Changes | None = None
        self.build()

    def apply_next_change(self) -> str:
        k = self.next_change
        self.next_change += 1
        i = change_target(k, self.workload.services)
        key = f"{self.workload.namespace(i)}/{self.workload.service_name(i)}-abcde"
        current = self.slices.get(key)
        if current is None:
            raise RuntimeError(f"no EndpointSlice {key} in the store")
        kind, new = changed_slice(current, k, self._rv)
        self._rv += 1
        if not self.slices.apply("MODIFIED", new):
            raise RuntimeError(f"the store refused the change of {key}")
        if self._changes is not None:
            self._changes.slices.add(key)
        return kind

    def build(self) -> ProxyState:
        changes, self._changes = self._changes, Changes()
        state, rejected = self.builder.build(self.services, self.slices, self.node, changes)
        if rejected:
            raise RuntimeError(f"{len(rejected)} objects rejected: {rejected[:3]}")
        return state


def _copy_cache(cache: ParseCache) -> ParseCache:
    """A copy of every table the cache holds (whatever fields it grows), so that this
    driver starts exactly as warm as the daemon would be after its build, and nothing it
    does can leak into another driver's start."""
    new = copy.copy(cache)
    for f in dataclasses.fields(cache):
        value = getattr(cache, f.name)
        if isinstance(value, dict):
            setattr(new, f.name, dict(value))
    return new


def _copy_store(store: Store) -> Store:
    copy = Store(store.kind, namespaced=store.namespaced)
    copy.replace(store.values(), store.resource_version)
    return copy


# --------------------------------------------------------------------------------------
# Syncs


def _sync_record(result: SyncResult) -> JSON:
    return {
        "ran_full": result.full,
        "changed_service_ports": result.changed_service_ports,
        "detail": dict(result.detail),
    }


def _timed_full_sync(backend: Backend, state: ProxyState) -> JSON:
    """The first full sync of a started backend. Starting (the eBPF mode compiles and
    loads its programs: seconds, once per daemon start) is timed apart, as `start_s`."""
    start_s = 0.0
    starter = getattr(backend, "start", None)
    if starter is not None:
        t = time.perf_counter()
        starter()
        start_s = time.perf_counter() - t
    gc.collect()
    with ToolTracer() as tracer:
        start = _Clock.now()
        result = backend.sync(state, full=True)
        done = _Clock.now()
    tools = tracer.take()
    return {**done.since(start), "start_s": start_s, "tools": tools, **_sync_record(result)}


def _change_series(backend: Backend, driver: ChangeDriver, count: int, *, full: bool) -> JSON:
    samples: list[JSON] = []
    with ToolTracer() as tracer:
        for _ in range(count):
            start = _Clock.now()
            kind = driver.apply_next_change()
            state = driver.build()
            built = _Clock.now()
            result = backend.sync(state, full=full)
            done = _Clock.now()
            tools = tracer.take()
            samples.append(
                {
                    "change": kind,
                    "total_s": done.wall - start.wall,
                    "build_s": built.wall - start.wall,
                    "sync_s": done.wall - built.wall,
                    # The sync minus its external programs: render, diff, bookkeeping.
                    "sync_python_s": done.wall - built.wall - tools_wall(tools),
                    "cpu_s": done.cpu - start.cpu,
                    "children_cpu_s": done.children - start.children,
                    "children_sys_s": done.children_sys - start.children_sys,
                    "tools": tools,
                    **_sync_record(result),
                }
            )
    out: JSON = {"full": full, "count": count, "samples": samples}
    if samples:
        for part in ("total_s", "build_s", "sync_s", "sync_python_s", "children_sys_s"):
            out[part.removesuffix("_s")] = summarize([s[part] for s in samples])
        names = sorted({name for s in samples for name in s["tools"]})
        # Median over all samples (0 where a sample did not run the tool).
        out["tools_median"] = {
            name: {
                "calls": statistics.median(
                    s["tools"].get(name, {}).get("calls", 0) for s in samples
                ),
                "wall_s": statistics.median(
                    s["tools"].get(name, {}).get("wall_s", 0.0) for s in samples
                ),
            }
            for name in names
        }
        # A partial sync that had to fall back to a full one is measured as it ran, but
        # it should be rare: say how often it happened.
        out["ran_full"] = sum(1 for s in samples if s["ran_full"])
    return out


_IPVS_PROTOS = frozenset({"TCP", "UDP", "SCTP", "FWM"})


def _kernel_facts(target: Target, backend: Backend, ns: str) -> JSON:
    """Independent witnesses of what a full sync programmed (read from the kernel)."""
    if target.mode not in ("iptables", "ipvs"):
        return {}
    variant = getattr(backend, "variant", target.variant)
    facts: JSON = {"variant": variant}
    if target.mode == "ipvs":
        # ipvsadm is not on the backend's (netlink) path: it witnesses what was programmed.
        proc = netns.run(ns, ["ipvsadm", "-Ln"], check=False, timeout=600)
        lines = proc.stdout.splitlines()
        facts["virtual_servers"] = sum(1 for ln in lines if ln.split(" ", 1)[0] in _IPVS_PROTOS)
        facts["real_servers"] = sum(
            1 for ln in lines if ln.lstrip().startswith("-> ") and "RemoteAddress" not in ln
        )
        proc = netns.run(ns, ["ipset", "list", "-t"], check=False, timeout=300)
        facts["ipset_entries"] = sum(
            int(ln.split(":", 1)[1]) for ln in proc.stdout.splitlines()
            if ln.startswith("Number of entries:")
        )  # fmt: skip
    for table in ("nat", "filter"):
        proc = netns.run(ns, [f"iptables-{variant}-save", "-t", table], check=False, timeout=300)
        lines = proc.stdout.splitlines()
        facts[f"{table}_rules"] = sum(1 for ln in lines if ln.startswith("-A "))
        facts[f"{table}_chains"] = sum(1 for ln in lines if ln.startswith(":"))
    return facts


@contextmanager
def _cleaned_up(backend: Backend) -> Iterator[Backend]:
    """Remove what the backend created even when a measurement fails: deleting the
    namespace takes iptables rules with it, but pinned BPF objects outlive it."""
    try:
        yield backend
    finally:
        with suppress(Exception):
            backend.cleanup()


def _explain_vanished(ns: str, error: Exception) -> None:
    """Say so when the failure is our namespace having been deleted by someone else (a
    shared machine's clean-up), not a fault of the backend."""
    if not netns.exists(ns):
        error.add_note(f"namespace {ns} was deleted by another process during the run")


def full_change_repeats(services: int, changes: int, quick: bool = False) -> int:
    """Repetitions of the change loop with full syncs: a full sync at 10k costs seconds,
    so fewer of them are enough to compare against the partial path."""
    if services <= 100:
        return changes
    if quick:
        return min(changes, 5)
    if services <= 1000:
        return min(changes, 20)
    return min(changes, 10)


def measure_target(
    target: Target,
    snapshot: Snapshot,
    workload: Workload,
    *,
    changes: int,
    repeats: int,
    log: Log,
    quick: bool = False,
) -> JSON:
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    full_runs: list[JSON] = []
    partial: JSON = {}
    with_full: JSON = {}
    result: JSON = {"target": target.label, "mode": target.mode, "variant": target.variant}
    for rep in range(repeats):
        with scratch_netns() as ns, _cleaned_up(target.make_backend(ns)) as backend:
            run = _timed_full_sync(backend, snapshot.state)
            full_runs.append(run)
            log(
                f"{target.label}: full sync {rep + 1}/{repeats}: {run['wall_s']:.3f} s wall "
                f"({run['cpu_s']:.3f} s CPU in lbd, {run['children_cpu_s']:.3f} s in tools)"
                + (
                    f"; start (program load) before it: {run['start_s']:.2f} s"
                    if run["start_s"]
                    else ""
                )
            )
            if rep < repeats - 1:
                continue
            result["kernel"] = _kernel_facts(target, backend, ns)
            driver = ChangeDriver(snapshot, workload)
            try:
                partial = _change_series(backend, driver, changes, full=False)
            except Exception as e:
                _explain_vanished(ns, e)
                raise
            if partial["samples"]:
                log(
                    f"{target.label}: {changes} changes (partial sync): p50 "
                    f"{partial['total']['p50'] * 1000:.1f} ms, p99 "
                    f"{partial['total']['p99'] * 1000:.1f} ms, max "
                    f"{partial['total']['max'] * 1000:.1f} ms"
                )
            n_full = full_change_repeats(workload.services, changes, quick)
            try:
                with_full = _change_series(backend, driver, n_full, full=True)
            except Exception as e:
                _explain_vanished(ns, e)
                raise
            if with_full["samples"]:
                log(
                    f"{target.label}: {n_full} changes (full sync): p50 "
                    f"{with_full['total']['p50'] * 1000:.1f} ms, p99 "
                    f"{with_full['total']['p99'] * 1000:.1f} ms"
                )
    result["full_sync"] = {
        "runs": full_runs,
        "median": {
            m: statistics.median(r[m] for r in full_runs)
            for m in ("wall_s", "cpu_s", "children_cpu_s")
        },
    }
    result["changes_partial"] = partial
    result["changes_full"] = with_full
    return result
