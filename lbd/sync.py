"""SyncRunner: turns "something changed" into bounded, retried backend syncs.

Changes are coalesced: a burst of events yields at most one sync per min-sync-period.
A full sync runs every sync-period (partial syncs in between, where the backend has
them), failures back off exponentially, and the backend's canary is polled so that an
admin flushing lbd's rules is repaired within seconds rather than at the next period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from backends.base import Backend, SyncResult
from lbd import metrics
from lbd.model.state import IPFamily, ProxyState

log = structlog.get_logger()

# Network programming latency is observed per pending change; a burst larger than this
# is sampled (the oldest change is always kept, so the worst case is never lost).
_MAX_PENDING_TIMESTAMPS = 1000


@dataclass(slots=True)
class SyncStatus:
    """What /healthz and tests read: when the datapath last matched the API."""

    last_success_wall: float = 0.0  # time.time() of the last successful sync
    last_success: float = 0.0  # monotonic
    last_queued: float = 0.0  # monotonic time of the oldest change not yet synced
    syncs: int = 0
    full_syncs: int = 0
    failures: int = 0
    last_result: SyncResult | None = None
    state: ProxyState | None = None


class SyncRunner:
    def __init__(
        self,
        build: Callable[[], ProxyState],
        backend: Backend,
        *,
        min_sync_period: float,
        sync_period: float,
        canary_interval: float = 2.0,
        max_backoff: float = 30.0,
        on_synced: Callable[[ProxyState], None] | None = None,
    ) -> None:
        self._build = build
        self._backend = backend
        self._min_sync_period = min_sync_period
        self._sync_period = sync_period
        self._canary_interval = canary_interval
        self._check_every = canary_interval
        self._max_backoff = max_backoff
        self._on_synced = on_synced
        self._wake = asyncio.Event()
        self._pending: list[float] = []
        self._resync_at = float("inf")  # a sync the backend asked for (SyncResult)
        self._force_full = True
        self.status = SyncStatus()

    def notify(self, changed_at: float | None = None) -> None:
        """Something in the stores changed (at monotonic time `changed_at`)."""
        now = time.monotonic() if changed_at is None else changed_at
        if not self._pending:
            self.status.last_queued = now
            metrics.SYNC_LAST_QUEUED_TIMESTAMP.set_to_current_time()
        if len(self._pending) < _MAX_PENDING_TIMESTAMPS:
            self._pending.append(now)
        self._wake.set()

    def request_full(self) -> None:
        self._force_full = True
        self._wake.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Sync forever. Waits for `ready` (stores listed) before the first sync."""
        if ready is not None:
            await ready.wait()
        loop = asyncio.get_running_loop()
        last_start = float("-inf")
        last_full = float("-inf")
        backoff = 0.0
        while True:
            await self._wait_for_work(last_full)
            # Coalesce: no more than one sync per min-sync-period, whatever the event rate.
            wait = last_start + max(self._min_sync_period, backoff) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            last_start = time.monotonic()
            pending, self._pending = self._pending, []
            full = self._force_full or last_start >= last_full + self._sync_period
            try:
                state = self._build()
                started = time.monotonic()
                result = await loop.run_in_executor(None, self._backend.sync, state, full)
            except Exception as err:  # noqa: BLE001 - any failure must be retried, not fatal
                self._pending = pending + self._pending
                self.status.failures += 1
                metrics.SYNC_ERRORS.labels(self._backend.mode).inc()
                backoff = min(self._max_backoff, max(1.0, backoff * 2))
                log.error(
                    "sync.failed", mode=self._backend.mode, error=str(err)[:500], retry_in=backoff
                )
                self._wake.set()
                continue
            done = time.monotonic()
            backoff = 0.0
            after = result.resync_after
            self._resync_at = float("inf") if after is None else done + after
            self._record(state, result, full, started, done, pending)
            if result.full:
                last_full = last_start
                self._force_full = False
            if self._on_synced is not None:
                try:
                    self._on_synced(state)
                except Exception as err:  # noqa: BLE001 - a hook must not stop syncing
                    log.error("sync.hook_failed", error=str(err)[:500])

    async def _wait_for_work(self, last_full: float) -> None:
        """Return when a sync is due: a change, a forced full sync, or the period."""
        loop = asyncio.get_running_loop()
        last_canary = time.monotonic()
        while True:
            now = time.monotonic()
            due_full = last_full + self._sync_period
            if self._pending or self._force_full or now >= min(due_full, self._resync_at):
                return
            if now >= last_canary + self._check_every:
                last_canary = now
                missing = await loop.run_in_executor(None, self._backend.needs_full_sync)
                # Reading the kernel back can be costly (iptables-legacy copies the whole
                # table: seconds at 10k services): never spend more than ~10% of the
                # time checking.
                self._check_every = max(self._canary_interval, 10 * (time.monotonic() - now))
                if missing:
                    log.warning("datapath.missing", mode=self._backend.mode, action="resync")
                    metrics.RULES_RESTORED.labels(self._backend.mode).inc()
                    self._force_full = True
                    continue
            timeout = min(due_full, self._resync_at, last_canary + self._check_every) - now
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.0))
            except TimeoutError:
                pass
            self._wake.clear()

    def _record(
        self,
        state: ProxyState,
        result: SyncResult,
        full: bool,
        started: float,
        done: float,
        pending: list[float],
    ) -> None:
        elapsed = done - started
        metrics.SYNC_DURATION.observe(elapsed)
        (metrics.SYNC_FULL_DURATION if result.full else metrics.SYNC_PARTIAL_DURATION).observe(
            elapsed
        )
        metrics.SYNC_LAST_TIMESTAMP.set_to_current_time()
        for changed_at in pending:
            metrics.NETWORK_PROGRAMMING_DURATION.observe(max(0.0, done - changed_at))
        for family in IPFamily:
            ports = list(state.ports(family))
            metrics.SERVICE_PORTS.labels(f"IPv{int(family)}").set(len(ports))
            metrics.ENDPOINTS.labels(f"IPv{int(family)}").set(
                sum(len(sp.used_endpoints) for sp in ports)
            )
        st = self.status
        st.last_success, st.last_success_wall = done, time.time()
        st.syncs += 1
        st.full_syncs += int(result.full)
        st.last_result, st.state = result, state
        if not self._pending:
            st.last_queued = 0.0
        log.info(
            "sync.done",
            mode=self._backend.mode,
            full=result.full,
            requested_full=full,
            service_ports=len(state.service_ports),
            changed=result.changed_service_ports,
            seconds=round(elapsed, 4),
            coalesced_changes=len(pending),
        )
