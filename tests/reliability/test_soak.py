"""Churn soak: ~50 Service/EndpointSlice changes per second while traffic flows
(`--soak-rate` changes it; the IPVS VM under emulation runs it at 10).

For the whole run (a minute in CI; `--soak` makes it ten, `--soak-seconds N` anything),
services are created, re-pointed at other endpoints (or none), re-ported and deleted at
a steady rate, while steady traffic goes through the stable service. Expected: zero
failed requests on the stable service; each daemon's memory (RSS) and open file
descriptors flat after warm-up; every change in the kernel at the end (the daemons'
/state equals the server's, and a sample of churned services answers, refuses or is
gone exactly as the server says); and the p99 network-programming latency, read from
kube-proxy's histogram, printed and within a generous bound.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from reliability_support import (
    StableTraffic,
    assert_converged,
    daemon_pid,
    fd_count,
    histogram,
    quantile_upper_bound,
    rss_kib,
)

from lbd.testing.env import LbdEnv
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service
from lbd.testing.traffic import RequestError, RequestRefused, tcp_request

pytestmark = [pytest.mark.reliability, pytest.mark.kernel, pytest.mark.soak]

POOL = 60  # churned services cycle through these names (and cluster IPs)
SAMPLE_INTERVAL = 1.0
# Memory and descriptors are compared after this share of the run: Python's allocator
# and the caches (parsed objects, rendered rules) grow to their working size first.
WARMUP_FRACTION = 0.15
MAX_RSS_GROWTH = 0.30  # the last third's peak over the first third's
MAX_FD_GROWTH = 10
# kube-proxy's SLO for network programming is p99 <= 30 s at scale; here the service
# count is small, so a change waits for at most the sync in progress, min-sync-period
# and its own sync: well under a second on an idle machine. The bound is generous, and
# is relaxed further only when the syncs themselves were slow (a machine shared with
# other test runs): a change that waited for anything else (a periodic full sync, a
# backoff) would blow through both.
MAX_P99_PROGRAMMING_SECONDS = 5.0
SYNCS_PER_CHANGE_BOUND = 5
NPL = "kubeproxy_network_programming_duration_seconds"
SYNC = "kubeproxy_sync_proxy_rules_duration_seconds"
SAMPLE_PER_OUTCOME = 8


@dataclass
class Churned:
    """What the churn last wrote for one service (None: deleted or never created)."""

    port: int
    pods: tuple[str, ...]


def vip(i: int) -> str:
    return f"10.96.90.{i + 1}"


def port_spec(port: int) -> PortSpec:
    return PortSpec(port, 8080, "TCP", "http")


class Churn:
    """Writes changes to the API server at a steady rate, remembering what it wrote."""

    def __init__(self, env: LbdEnv, seed: int) -> None:
        self.env = env
        self.rng = random.Random(seed)
        self.pods = env.cluster.pods
        self.model: dict[int, Churned | None] = dict.fromkeys(range(POOL))
        self.changes = 0

    def _slice(self, i: int, c: Churned) -> dict:
        eps = [EndpointSpec(p.ipv4, p.node) for p in self.pods if p.name in c.pods]
        return endpoint_slice(f"soak-{i}", eps, [port_spec(c.port)])

    def _pick_pods(self) -> tuple[str, ...]:
        # One time in five, no endpoint at all (the service must then refuse).
        k = 0 if self.rng.random() < 0.2 else self.rng.randint(1, len(self.pods))
        return tuple(sorted(p.name for p in self.rng.sample(self.pods, k)))

    def step(self) -> None:
        i = self.rng.randrange(POOL)
        cur = self.model[i]
        roll = self.rng.random()
        if cur is None:
            new = Churned(self.rng.choice((80, 81)), self._pick_pods())
            self.env.apply(service(f"soak-{i}", [vip(i)], [port_spec(new.port)]))
            self.env.apply(self._slice(i, new))
        elif roll < 0.5:
            new = Churned(cur.port, self._pick_pods())
            self.env.apply(self._slice(i, new))
        elif roll < 0.75:
            new = Churned(161 - cur.port, cur.pods)  # 80 <-> 81
            self.env.apply(service(f"soak-{i}", [vip(i)], [port_spec(new.port)]))
            self.env.apply(self._slice(i, new))
        else:
            new = None
            self.env.delete("Service", f"soak-{i}")
            self.env.delete("EndpointSlice", f"soak-{i}-v4")
        self.model[i] = new
        self.changes += 1


@dataclass
class Usage:
    at: float
    rss_kib: int
    fds: int


def flat(samples: list[Usage], start: float) -> tuple[float, int]:
    """(RSS growth ratio, fd growth) of the last third of the samples over the first
    third, both after `start` (the end of the warm-up)."""
    kept = [s for s in samples if s.at >= start]
    assert len(kept) >= 9, len(kept)
    third = len(kept) // 3
    first, last = kept[:third], kept[-third:]
    rss = max(s.rss_kib for s in last) / max(s.rss_kib for s in first) - 1.0
    fds = max(s.fds for s in last) - max(s.fds for s in first)
    return rss, fds


def test_churn_soak(env: LbdEnv, soak_duration: float, soak_rate: float) -> None:
    nodes = [n.name for n in env.cluster.nodes]
    pids = {n: daemon_pid(env, n) for n in nodes}
    before = {n: env.metrics(n) for n in nodes}
    usage: dict[str, list[Usage]] = {n: [] for n in nodes}
    churn = Churn(env, seed=int(time.time()))
    interval = 1.0 / soak_rate
    with StableTraffic(env) as traffic:
        started = time.monotonic()
        end = started + soak_duration
        next_change = next_sample = started
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                for n, pid in pids.items():
                    usage[n].append(Usage(now - started, rss_kib(pid), fd_count(pid)))
                next_sample += SAMPLE_INTERVAL
            churn.step()
            next_change += interval
            # Paced, not bursty: a late step is not made up for with a burst.
            next_change = max(next_change, time.monotonic() - interval)
            time.sleep(max(0.0, min(next_change, next_sample) - time.monotonic()))
        churned_for = time.monotonic() - started
        converged_in = assert_converged(env, 60)
    rate = churn.changes / churned_for
    print(
        f"\nsoak: {churn.changes} changes in {churned_for:.0f} s ({rate:.0f}/s), "
        f"converged {converged_in:.1f} s after the last; traffic {traffic.summary()}"
    )
    traffic.assert_clean()
    # The rate is what the test claims to exercise: a slow writer would weaken it.
    assert rate >= soak_rate * 0.8, (rate, soak_rate)

    warm = soak_duration * WARMUP_FRACTION
    memory_growth: list[tuple[str, float]] = []
    for n in nodes:
        rss, fds = flat(usage[n], warm)
        peak = max(u.rss_kib for u in usage[n]) / 1024
        print(f"{n}: RSS growth {rss:+.1%} (peak {peak:.0f} MiB), fd growth {fds:+d}")
        if rss >= MAX_RSS_GROWTH:
            memory_growth.append((n, rss))
        assert fds < MAX_FD_GROWTH, (n, fds, usage[n][-5:])

    for n in nodes:
        after = env.metrics(n)
        p99, observed = quantile_upper_bound(histogram(before[n], NPL), histogram(after, NPL), 0.99)
        sync_p99, syncs = quantile_upper_bound(
            histogram(before[n], SYNC), histogram(after, SYNC), 0.99
        )
        print(
            f"{n}: network programming p99 <= {p99:g} s over {observed} changes; "
            f"sync p99 <= {sync_p99:g} s over {syncs} syncs"
        )
        bound = max(MAX_P99_PROGRAMMING_SECONDS, SYNCS_PER_CHANGE_BOUND * sync_p99)
        assert observed > 0 and p99 <= bound, (n, p99, observed, sync_p99)

    # Every change reached the kernel: churned services behave as the server says.
    pod = env.cluster.pod("pod-1-1").netns
    rng = random.Random(0)
    serving = [(i, c) for i, c in churn.model.items() if c is not None and c.pods]
    empty = [(i, c) for i, c in churn.model.items() if c is not None and not c.pods]
    gone = [i for i, c in churn.model.items() if c is None]
    for i, c in rng.sample(serving, min(SAMPLE_PER_OUTCOME, len(serving))):
        assert tcp_request(pod, vip(i), c.port).pod in c.pods, (i, c)
    for i, c in rng.sample(empty, min(SAMPLE_PER_OUTCOME, len(empty))):
        with pytest.raises(RequestRefused):
            tcp_request(pod, vip(i), c.port, timeout=1.0)
    for i in rng.sample(gone, min(SAMPLE_PER_OUTCOME, len(gone))):
        for port in (80, 81):
            with pytest.raises(RequestError):
                tcp_request(pod, vip(i), port, timeout=0.5)
    # Checked last so that every other property is still asserted when it fails.
    assert not memory_growth, memory_growth
