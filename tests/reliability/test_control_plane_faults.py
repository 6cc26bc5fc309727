"""Control-plane faults while traffic flows: the datapath never notices the API server.

Steady traffic runs through the stable service's ClusterIP (from a pod on node-1) and
NodePort (from the external client at node-2) while the API server is down for a minute,
drops its watches every few seconds, throttles with 429 + Retry-After, answers slowly,
or fails with 500s. Every test expects zero failed requests, a daemon state equal to the
server's afterwards (changes made during the fault included), and, read from the
server's request log, reconnects that are spaced by jittered exponential backoff rather
than a retry storm. tests/e2e/test_control_plane.py covers state convergence after
short faults; this module adds traffic, long faults and how the retries are spaced.
"""

from __future__ import annotations

import time
from statistics import mean

import pytest
from reliability_support import (
    STABLE_PORT,
    StableTraffic,
    all_endpoints,
    assert_converged,
    cpu_seconds,
    daemon_pid,
    gaps,
    node_reflector_requests,
    settle_watches,
    stamp_requests,
)

from lbd.testing.env import HEALTHZ_PORT, LbdEnv, http_get
from lbd.testing.objects import endpoint_slice, service
from lbd.testing.traffic import RequestError, tcp_request

pytestmark = [pytest.mark.reliability, pytest.mark.kernel]

# The number: kube-proxy keeps the datapath through an API outage of a minute.
API_OUTAGE_SECONDS = 60.0
# The CPU a disconnected daemon uses is measured over this window inside the outage,
# after the first quick reconnect attempts.
CPU_WINDOW_SECONDS = 20.0
CPU_WINDOW_START = 5.0
# A disconnected daemon only wakes for backoff timers, the canary check (every 2 s) and
# the periodic full sync: a few percent of a core. A retry loop without a delay spins
# a whole core, so the bound separates the two with a wide margin either way.
# (Measured here: under 1 % with children.)
MAX_OWN_CPU_FRACTION = 0.05
MAX_TOTAL_CPU_FRACTION = 0.15  # including the iptables tools it runs
# After an outage the reflectors' backoff may be at its 30 s ceiling: a reconnect can
# take that long, then a sync.
RECONNECT_TIMEOUT = 60.0

DROP_INTERVAL = 2.5
DROP_ROUNDS = 5  # about 12 s of dropped watches
RETRY_AFTER = 2.0
THROTTLE_SECONDS = 10.0
STALL_SECONDS = 3.0
STALL_ROUNDS = 3
ERROR_STORM_SECONDS = 12.0


def vip(i: int) -> str:
    return f"10.96.60.{i}"


def add(env: LbdEnv, name: str, i: int) -> None:
    env.apply(service(name, [vip(i)], [STABLE_PORT]))
    env.apply(endpoint_slice(name, all_endpoints(env), [STABLE_PORT]))


def remove(env: LbdEnv, name: str) -> None:
    env.delete("Service", name)
    env.delete("EndpointSlice", f"{name}-v4")


def answered(env: LbdEnv, ip: str) -> bool:
    try:
        tcp_request(env.cluster.pod("pod-2-1").netns, ip, 80, timeout=1.0)
    except RequestError:
        return False
    return True


def healthz(env: LbdEnv, node: str) -> int:
    status, _ = http_get(env.cluster.netns_of(node), "127.0.0.1", HEALTHZ_PORT, "/healthz")
    return status


def test_api_server_down_for_a_minute(env: LbdEnv) -> None:
    """A minute without the API: no failed request, the node stays healthy, the daemon
    idles instead of spinning, and once the API is back the changes made meanwhile are
    programmed."""
    add(env, "down-old", 1)
    assert_converged(env, 30)
    pids = {n.name: daemon_pid(env, n.name) for n in env.cluster.nodes}
    with StableTraffic(env) as traffic:
        env.api.stop()
        down_at = time.monotonic()
        try:
            # Written while the server is unreachable: the daemons see them on reconnect.
            remove(env, "down-old")
            add(env, "down-new", 2)
            time.sleep(CPU_WINDOW_START)
            before = {node: cpu_seconds(pid) for node, pid in pids.items()}
            time.sleep(CPU_WINDOW_SECONDS)
            after = {node: cpu_seconds(pid) for node, pid in pids.items()}
            time.sleep(max(0.0, down_at + API_OUTAGE_SECONDS - time.monotonic()))
            # The datapath is still recent (periodic syncs go on): load balancers probing
            # /healthz must not pull every node out because the control plane is away.
            health = {n.name: healthz(env, n.name) for n in env.cluster.nodes}
        finally:
            env.api.start()  # also when the test fails: the module's other tests need it
        assert health == {"node-1": 200, "node-2": 200}, health
        took = assert_converged(env, RECONNECT_TIMEOUT)
    print(f"\nconverged {took:.1f} s after a {API_OUTAGE_SECONDS:.0f} s outage")
    for node in pids:
        own = (after[node][0] - before[node][0]) / CPU_WINDOW_SECONDS
        total = own + (after[node][1] - before[node][1]) / CPU_WINDOW_SECONDS
        print(f"{node}: CPU while disconnected {own:.1%} own, {total:.1%} with children")
        assert own < MAX_OWN_CPU_FRACTION, (node, own)
        assert total < MAX_TOTAL_CPU_FRACTION, (node, total)
    traffic.assert_clean()
    assert answered(env, vip(2)) and not answered(env, vip(1))


def test_watches_dropped_every_few_seconds(env: LbdEnv) -> None:
    """Watches cut (abruptly or gracefully) every few seconds lose no change and cost no
    relist: the reflectors resume from their resourceVersion."""
    server = env.api.server
    stamp_requests(server)
    settle_watches(env)
    started = time.monotonic()
    with StableTraffic(env) as traffic:
        for i in range(DROP_ROUNDS):
            add(env, f"drop-{i}", 10 + i)
            if i:
                remove(env, f"drop-{i - 1}")
            server.drop_watches(abrupt=i % 2 == 0)
            time.sleep(DROP_INTERVAL)
        assert_converged(env, RECONNECT_TIMEOUT)
    traffic.assert_clean()
    relists = server.count_requests("list", where=lambda r: getattr(r, "at", 0) >= started)
    rewatches = server.count_requests("watch", where=lambda r: getattr(r, "at", 0) >= started)
    # 2 daemons x 3 reflectors re-watch after each drop that finds them connected (one
    # still backing off from the previous drop has no watch to lose): most drops do.
    assert relists == 0 and rewatches >= 6 * (DROP_ROUNDS // 2), (relists, rewatches)
    assert answered(env, vip(10 + DROP_ROUNDS - 1)) and not answered(env, vip(10))


def test_throttled_requests_wait_for_retry_after(env: LbdEnv) -> None:
    """429 TooManyRequests with Retry-After: each daemon waits at least that long
    between attempts (API priority and fairness relies on it), and traffic is unaffected."""
    server = env.api.server
    stamp_requests(server)
    settle_watches(env)
    with StableTraffic(env) as traffic:
        server.throttle(retry_after=RETRY_AFTER, duration=THROTTLE_SECONDS)
        started = time.monotonic()
        server.drop_watches(abrupt=True)
        add(env, "throttled", 20)
        time.sleep(THROTTLE_SECONDS)
        ended = started + THROTTLE_SECONDS
        assert_converged(env, RECONNECT_TIMEOUT)
    server.clear_faults()
    traffic.assert_clean()
    for node in ("node-1", "node-2"):
        times = node_reflector_requests(server, node, started)
        throttled = [t for t in times if t < ended]
        # The throttled attempts and the first one after the throttle ended.
        spaced = times[: len(throttled) + 1]
        assert len(spaced) >= 3, (node, times)
        # A little under Retry-After: timers and the server's clock are not the same.
        assert min(gaps(spaced)) >= RETRY_AFTER - 0.1, (node, gaps(spaced))
    assert answered(env, vip(20))


def test_slow_api_responses(env: LbdEnv) -> None:
    """An API server that answers every request seconds late: traffic and health are
    unaffected, and changes made meanwhile arrive once the answers do."""
    server = env.api.server
    health: list[dict[str, int]] = []
    with StableTraffic(env) as traffic:
        server.stall(STALL_SECONDS, duration=STALL_SECONDS * STALL_ROUNDS)
        for i in range(STALL_ROUNDS):
            # Cut watches so that every reconnect meets the delay.
            server.drop_watches(abrupt=True)
            add(env, f"slow-{i}", 30 + i)
            time.sleep(STALL_SECONDS)
            health.append({n.name: healthz(env, n.name) for n in env.cluster.nodes})
        assert_converged(env, RECONNECT_TIMEOUT)
    server.clear_faults()
    traffic.assert_clean()
    assert all(set(h.values()) == {200} for h in health), health
    assert all(answered(env, vip(30 + i)) for i in range(STALL_ROUNDS))


def test_error_storm_retries_back_off_with_jitter(env: LbdEnv) -> None:
    """500s on every request: each daemon's retries start quickly, then spread out
    (exponential backoff), and the two daemons do not retry in lockstep (jitter)."""
    if env.mode != "iptables":
        # The reflectors' backoff does not depend on the datapath: measure it once, where
        # the daemon is lightest (the ebpf daemon's start-up compile skews the timing).
        pytest.skip("reflector backoff is mode-independent; measured in iptables mode")
    server = env.api.server
    stamp_requests(server)
    settle_watches(env)
    with StableTraffic(env) as traffic:
        server.fail_requests(duration=ERROR_STORM_SECONDS, status=500)
        started = time.monotonic()
        server.drop_watches(abrupt=True)
        add(env, "storm", 40)
        time.sleep(ERROR_STORM_SECONDS)
        ended = started + ERROR_STORM_SECONDS
        assert_converged(env, RECONNECT_TIMEOUT)
    server.clear_faults()
    traffic.assert_clean()
    assert answered(env, vip(40))

    intervals: dict[str, list[float]] = {}
    for node in ("node-1", "node-2"):
        times = node_reflector_requests(server, node, started)
        failed = [t for t in times if t < ended]
        # Each gap follows a failure: the failed attempts and the first one after.
        seq = gaps(times[: len(failed) + 1])
        intervals[node] = seq
        print(f"\n{node}: retry gaps {[round(g, 2) for g in seq]}")
        # Full-jitter backoff from 0.2 s doubling to a 30 s cap: the delays before the
        # n-th retry are at most 0.2 * 2**n, so a 12 s storm sees 5 to 12 attempts.
        # Far fewer means retries stopped; far more means a fixed short delay.
        context = [round(t - started, 2) for t in node_reflector_requests(server, node, 0)]
        assert 4 <= len(seq) <= 20, (node, seq, context[-20:])
        # Starts short: a blip costs well under a second...
        assert seq[0] < 1.0, (node, seq)
        # ...and grows: the longest gap is several times the first two, and the later
        # half of the gaps is longer on average than the earlier half. (Simulated over
        # 200,000 storms, these fail less than once in 5,000 runs.)
        assert max(seq) > 3 * max(seq[:2]), (node, seq)
        half = len(seq) // 2
        assert mean(seq[half:]) > mean(seq[:half]), (node, seq)
    # Jitter: the two daemons' retry schedules differ (without it they would match to
    # within a few milliseconds, attempt for attempt).
    pairs = list(zip(intervals["node-1"], intervals["node-2"], strict=False))
    assert max(abs(a - b) for a, b in pairs) > 0.05, intervals
