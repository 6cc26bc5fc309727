"""`lbd run`: watch the API, keep a ProxyState, drive one backend, serve health and metrics.

Nothing here decides Kubernetes semantics (lbd.model does) or touches the kernel (the
backend does): this module wires reflectors → SyncRunner → backend together and owns
the process lifecycle. On exit the datapath is left in place, as kube-proxy does, so a
restart or upgrade never interrupts traffic.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import sys
import threading
import time
from contextlib import suppress
from datetime import datetime
from typing import Any

import structlog

from backends.base import Backend
from backends.registry import create_backend, hand_over_modes, other_modes, retire_modes
from lbd import log as lbd_log
from lbd import metrics
from lbd.config import ProxyConfig
from lbd.health import HealthCheckServers, healthz_app, metrics_app, start_site
from lbd.k8s import client as k8s_client
from lbd.k8s.reflector import Reflector
from lbd.k8s.store import Store
from lbd.model.build import Changes, ModelConfig, Rejection, StateBuilder, parse_node
from lbd.model.parse import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from lbd.model.state import ProxyState
from lbd.sync import SyncRunner

log = structlog.get_logger()

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
# On a switch away from ebpf, how long its programs stay after its frontends are gone:
# flows it balanced (a NodePort client's, say) keep their NAT in its own conntrack and
# finish; longer-lived ones are cut when it ends. Without it they were reset when tc
# detached under them (seen in tests/e2e/test_mode_switch.py).
MODE_SWITCH_DRAIN_SECONDS = 10.0


def trigger_time(slice_obj: dict, default: float) -> float:
    """When the change that produced this EndpointSlice happened, on the monotonic clock.

    The EndpointSlice controller stamps the time of the pod/service change that caused a
    slice update; kube-proxy measures network programming latency from it, and so do we
    (falling back to when we received the event).
    """
    meta = slice_obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    stamp = annotations.get(TRIGGER_TIME_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(stamp, str):
        return default
    try:
        wall = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default
    age = time.time() - wall
    # A clock skewed into the future, or an ancient stamp replayed by a relist, says
    # nothing about this change's latency.
    if age < 0 or age > 3600:
        return default
    return default - age


class StartupError(Exception):
    """The daemon cannot start; the message is one sentence for the operator."""


class Daemon:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.node_name = cfg.node_name
        self.services = Store("Service")
        self.slices = Store("EndpointSlice")
        self.nodes = Store("Node", namespaced=False)
        self._rejected: set[Rejection] = set()
        self._builder = StateBuilder(
            ModelConfig(
                node_name=self.node_name,
                cluster_cidrs=cfg.cluster_cidrs,
                masquerade_all=cfg.masquerade_all,
                nodeport_addresses=cfg.nodeport_addresses,
            )
        )
        # What changed since the last build; None: unknown (start, relist) -> full build.
        self._changes: Changes | None = None
        self.backend = create_backend(cfg)
        self.runner = SyncRunner(
            self.build,
            self.backend,
            min_sync_period=cfg.min_sync_period,
            sync_period=cfg.sync_period,
            on_synced=self._on_synced,
        )
        self.health_checks = HealthCheckServers(self._health_check_hosts)
        self._tasks: set[asyncio.Task[None]] = set()
        self._built_rv = 0
        self._switched = False
        self._stopping = threading.Event()  # set on exit: a drain in progress ends now
        # The other modes' backends (a mode switch), built while the caches fill
        self._other_modes: asyncio.Future[list[tuple[str, Backend]]] | None = None

    def build(self) -> ProxyState:
        self._built_rv = max(s.last_event_rv for s in (self.services, self.slices, self.nodes))
        node = parse_node(self.nodes.get(self.node_name), self.node_name)
        changes, self._changes = self._changes, Changes()
        state, rejected = self._builder.build(self.services, self.slices, node, changes)
        current = set(rejected)
        for rej in current - self._rejected:
            log.warning("object.rejected", kind=rej.kind, object=rej.ref, reason=rej.reason)
            metrics.INVALID_OBJECTS.labels(rej.kind).inc()
        self._rejected = current
        return state

    def _health_check_hosts(self) -> list[str]:
        # Health-check node ports listen wherever node ports do; with no nodeport
        # addresses configured that is every address, as with kube-proxy.
        return ["0.0.0.0", "::"]

    def _on_synced(self, state: ProxyState) -> None:
        metrics.SYNCED_RESOURCE_VERSION.set(self._built_rv)
        if not self._switched:
            # A mode switch: what another lbd mode left is removed only once this mode's
            # datapath is in place, so services stay reachable throughout.
            self._switched = True
            self._spawn(self._remove_other_modes())
        self._spawn(self.health_checks.update(state))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_over(self) -> None:
        """Before the first sync, prepare another mode's datapath for this one's arrival,
        and this one for taking the node over (see registry.hand_over_modes)."""
        try:
            assert self._other_modes is not None  # set by run()
            others = await self._other_modes
            told = await asyncio.get_running_loop().run_in_executor(
                None, hand_over_modes, others, self.cfg.mode, self.backend
            )
        except Exception as err:  # noqa: BLE001 - leftovers must not stop this mode
            log.error("mode.hand_over_failed", error=str(err)[:500])
            return
        if told:
            log.info("mode.handing_over", to=self.cfg.mode, modes=told)

    async def _remove_other_modes(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            assert self._other_modes is not None  # set by run(), which syncs
            others = await self._other_modes
            self._other_modes = None  # held no longer than the switch needs them
            cleaned = await loop.run_in_executor(
                None,
                functools.partial(
                    retire_modes,
                    others,
                    drain_seconds=MODE_SWITCH_DRAIN_SECONDS,
                    stop=self._stopping,
                ),
            )
        except Exception as err:  # noqa: BLE001 - leftovers must not stop this mode
            log.error("mode.cleanup_failed", error=str(err)[:500])
            return
        if cleaned:
            log.info("mode.switched", mode=self.cfg.mode, removed=cleaned)

    def _on_change(self, kind: str, key: str | None = None) -> None:
        changed_at = time.monotonic()
        if key is None:
            self._changes = None  # a relist: anything may have changed
        elif self._changes is not None:
            if kind == "Service":
                self._changes.services.add(key)
            elif kind == "EndpointSlice":
                self._changes.slices.add(key)
            # A Node change needs no key: the builder compares the parsed node itself.
        if kind == "Service":
            metrics.SERVICE_CHANGES.inc()
        elif kind == "EndpointSlice":
            metrics.ENDPOINT_CHANGES.inc()
            obj = self.slices.get(key) if key else None
            if obj is not None:
                changed_at = trigger_time(obj, changed_at)
        self.runner.notify(changed_at)

    async def run(self) -> None:
        try:
            if self.cfg.master and not self.cfg.kubeconfig:
                client = k8s_client.ApiClient.from_url(self.cfg.master)
            else:
                client = await k8s_client.ApiClient.from_config(self.cfg.kubeconfig)
        except Exception as err:  # noqa: BLE001 - the loaders raise many kinds
            where = self.cfg.kubeconfig or "the in-cluster service account"
            detail = " ".join(str(err).split())
            raise StartupError(f"cannot load API credentials from {where}: {detail}") from None
        # Built now, so that retiring another mode's datapath right after the first sync
        # costs no imports: while both datapaths are in place, iptables' FORWARD rule
        # that drops conntrack-INVALID packets also drops replies to flows eBPF's tc
        # translates (the kernel's conntrack never saw their translated form).
        self._other_modes = asyncio.get_running_loop().run_in_executor(None, other_modes, self.cfg)
        not_ours = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
        reflectors = [
            Reflector(
                client,
                k8s_client.SERVICES,
                self.services,
                label_selector=not_ours,
                on_change=self._on_change,
            ),
            Reflector(
                client,
                k8s_client.ENDPOINTSLICES,
                self.slices,
                label_selector=not_ours,
                on_change=self._on_change,
            ),
            Reflector(
                client,
                k8s_client.NODES,
                self.nodes,
                field_selector=f"metadata.name={self.node_name}",
                on_change=self._on_change,
            ),
        ]
        ready = asyncio.Event()

        async def wait_synced() -> None:
            await asyncio.gather(*(r.synced.wait() for r in reflectors))
            log.info("caches.synced", services=len(self.services), slices=len(self.slices))
            await self._hand_over()
            # The listed objects live as long as the daemon: move them out of the cyclic
            # GC's sight so later collections do not rescan ~10^6 objects each time.
            gc.collect()
            gc.freeze()
            ready.set()

        runners = [
            await start_site(
                healthz_app(self.runner.status, 2 * self.cfg.sync_period + 10),
                self.cfg.healthz_bind_address,
            ),
            await start_site(
                metrics_app(self.cfg.mode, self.runner.status), self.cfg.metrics_bind_address
            ),
        ]
        log.info(
            "lbd.started",
            mode=self.cfg.mode,
            node=self.node_name,
            healthz=self.cfg.healthz_bind_address,
            metrics=self.cfg.metrics_bind_address,
        )
        try:
            await asyncio.gather(
                *(r.run() for r in reflectors), wait_synced(), self.runner.run(ready)
            )
        finally:
            self._stopping.set()
            await self.health_checks.close()
            for r in runners:
                await r.cleanup()
            await client.close()


def main(cfg: ProxyConfig, log_level: str = "info") -> int:
    lbd_log.configure(log_level)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # plain asyncio still works, only slower
        loop_factory = None

    async def _main() -> None:
        daemon = Daemon(cfg)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        with suppress(asyncio.CancelledError):
            await daemon.run()
        log.info("lbd.stopped", reason="signal")

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(_main())
        except StartupError as err:
            print(f"lbd: {err}", file=sys.stderr)
            return 2
    return 0
