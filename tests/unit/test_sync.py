"""SyncRunner: coalescing, periodic full syncs, retries and canary-driven repair.

The backend here is a recorder: this tests the loop's scheduling, which no kernel
state influences (the real backends are exercised by the kernel and e2e suites).
"""

from __future__ import annotations

import asyncio
import threading
import time

from backends.base import SyncResult
from lbd.model.state import ProxyState
from lbd.sync import SyncRunner


class Recorder:
    mode = "recorder"

    def __init__(self, fail_times: int = 0) -> None:
        self.calls: list[bool] = []
        self.fail_times = fail_times
        self.canary_gone = threading.Event()

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        self.calls.append(full)
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("iptables-restore: line 3 failed")
        return SyncResult(full=full)

    def needs_full_sync(self) -> bool:
        if self.canary_gone.is_set():
            self.canary_gone.clear()
            return True
        return False

    def status(self):
        return []

    def cleanup(self) -> None:
        pass


def run_for(runner: SyncRunner, seconds: float, during=None) -> None:
    async def main() -> None:
        task = asyncio.create_task(runner.run())
        if during is not None:
            await during()
        await asyncio.sleep(seconds)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


def test_a_burst_of_1000_changes_yields_a_bounded_number_of_syncs():
    backend = Recorder()
    runner = SyncRunner(lambda: ProxyState("n"), backend, min_sync_period=0.3, sync_period=60)

    span: list[float] = []

    async def burst() -> None:
        await asyncio.sleep(0.05)
        start = time.monotonic()
        for i in range(1000):
            runner.notify()
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the runner see the events as they arrive
        span.append(time.monotonic() - start)

    run_for(runner, 0.8, burst)
    # first (full) sync, then the burst coalesced: one sync per min-sync-period at most
    assert backend.calls[0] is True
    assert 2 <= len(backend.calls) <= 2 + span[0] / 0.3 + 1, (backend.calls, span)
    assert all(c is False for c in backend.calls[1:])
    assert runner.status.syncs == len(backend.calls)


def test_failed_sync_is_retried_and_the_changes_stay_pending():
    backend = Recorder(fail_times=1)
    runner = SyncRunner(lambda: ProxyState("n"), backend, min_sync_period=0.0, sync_period=60)
    run_for(runner, 1.5)
    assert backend.calls == [True, True]  # the failed full sync is retried as a full sync
    assert runner.status.failures == 1 and runner.status.syncs == 1


def test_periodic_full_sync():
    backend = Recorder()
    runner = SyncRunner(lambda: ProxyState("n"), backend, min_sync_period=0.0, sync_period=0.3)
    run_for(runner, 1.0)
    assert len(backend.calls) >= 3 and all(backend.calls)


class Draining(Recorder):
    """A backend whose first two syncs leave something to finish later (IPVS real servers
    draining), then none."""

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        self.calls.append(full)
        return SyncResult(full=full, resync_after=0.2 if len(self.calls) <= 2 else None)


def test_a_backend_that_asks_for_a_later_sync_gets_one_without_any_change():
    backend = Draining()
    runner = SyncRunner(lambda: ProxyState("n"), backend, min_sync_period=0.0, sync_period=60)
    run_for(runner, 1.0)
    # the full sync, then the two partial syncs asked for; then quiet until the period
    assert backend.calls == [True, False, False]


def test_missing_datapath_triggers_a_full_sync_before_the_period():
    backend = Recorder()
    runner = SyncRunner(
        lambda: ProxyState("n"), backend, min_sync_period=0.0, sync_period=60, canary_interval=0.1
    )

    async def flush() -> None:
        await asyncio.sleep(0.3)
        backend.canary_gone.set()

    run_for(runner, 0.6, flush)
    assert backend.calls == [True, True]


def test_network_programming_latency_starts_at_the_slice_trigger_time():
    from datetime import UTC, datetime, timedelta

    from lbd.daemon import TRIGGER_TIME_ANNOTATION, trigger_time

    stamp = (datetime.now(UTC) - timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    obj = {"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: stamp}}}
    assert 1.9 < 100.0 - trigger_time(obj, 100.0) < 2.5
    assert trigger_time({"metadata": {}}, 100.0) == 100.0
    future = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
    assert (
        trigger_time({"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: future}}}, 100.0)
        == 100.0
    )
    assert (
        trigger_time({"metadata": {"annotations": {TRIGGER_TIME_ANNOTATION: "junk"}}}, 100.0)
        == 100.0
    )
