"""The Reflector: keeps one Store equal to the API server's objects of one kind.

It owns the list-then-watch loop and its failure handling:
- a paginated list (limit/continue; an expired continue token restarts the list) that
  *replaces* the store, then a watch from the list's resourceVersion with bookmarks;
- a watch that ends normally is resumed from the last resourceVersion, without a relist;
- 410 Gone (HTTP, or a watch ERROR event) means the history is gone: relist;
- any other failure waits with exponential backoff and full jitter (429 waits at least
  Retry-After), then retries the same step; the store keeps its contents meanwhile.

Consumers are told "something changed" through `on_change(kind, key)`; payloads stay in
the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import structlog

from lbd.k8s.client import ApiClient, ApiError, Resource
from lbd.k8s.store import Store

JSON = dict[str, Any]

OnChange = Callable[[str, str | None], None]


class Backoff:
    """Exponential backoff with *full jitter*: the n-th consecutive failure (n from 0)
    waits uniform(0, min(cap, base * 2**n)).

    Full jitter rather than a fixed exponential: when an API server restarts, every node
    in the cluster sees the same failure at the same moment, and fixed delays would bring
    them back in synchronized waves. Spreading each wait over the whole interval keeps
    the expected delay growing while decorrelating the clients. The RNG is injectable so
    the spacing can be tested.
    """

    def __init__(
        self, base: float = 0.2, cap: float = 30.0, *, rng: random.Random | None = None
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int | None = None) -> float:
        """The upper bound of the delay for `attempt` (default: the next one)."""
        n = self.attempt if attempt is None else attempt
        # min() before the power would overflow for long outages.
        return min(self.cap, self.base * 2 ** min(n, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Reflector:
    """List and watch one resource into a Store until cancelled.

    `synced` is set after the first successful list. The counters (`lists`, `watches`,
    `errors`, `relists_410`, `events`) exist so tests and metrics can see what happened.
    """

    def __init__(
        self,
        client: ApiClient,
        resource: Resource,
        store: Store,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        on_change: OnChange | None = None,
        backoff: Backoff | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
        watch_read_timeout: float | None = 300.0,
        min_watch_duration: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.store = store
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.on_change = on_change
        self.backoff = backoff or Backoff()
        # Server-side watch timeout, randomized per watch so that many clients do not
        # all re-watch at the same moment (client-go does the same, 5-10 minutes).
        self.watch_timeout = watch_timeout
        # No byte for this long means a half-dead connection. Generous on purpose: a
        # quiet cluster is not an error, and bookmarks keep a healthy stream talking.
        self.watch_read_timeout = watch_read_timeout
        self.min_watch_duration = min_watch_duration
        self._rng = rng or random.Random()
        self.synced = asyncio.Event()
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self.relists_410 = 0
        self.events = 0
        self.last_error: BaseException | None = None
        self._log = structlog.get_logger().bind(kind=resource.kind)

    async def run(self) -> None:
        need_list = True
        while True:
            if need_list:
                try:
                    await self._list()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # A 410 here is an error too: relisting at once would spin.
                    await self._fail(exc, "list")
                    continue
                need_list = False
                self.backoff.reset()
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, ApiError) and exc.expired:
                    self.relists_410 += 1
                    need_list = True
                    self._log.info(
                        "watch history expired, relisting",
                        resource_version=self.store.resource_version,
                        reason=exc.message,
                    )
                    continue
                await self._fail(exc, "watch")

    # ---- steps -----------------------------------------------------------------------

    async def _list(self) -> None:
        restarts = 0
        while True:
            items: list[JSON] = []
            token: str | None = None
            rv = ""
            try:
                while True:
                    page = await self.client.list(
                        self.resource,
                        namespace=self.namespace,
                        label_selector=self.label_selector,
                        field_selector=self.field_selector,
                        limit=self.page_size,
                        continue_=token,
                    )
                    items.extend(page.get("items") or [])
                    meta = page.get("metadata") or {}
                    rv = meta.get("resourceVersion") or rv
                    token = meta.get("continue") or None
                    if token is None:
                        break
            except ApiError as exc:
                # The snapshot behind a continue token is gone: the pages we hold may
                # no longer be consistent with the next ones, so start over.
                if exc.expired and token is not None and restarts < 3:
                    restarts += 1
                    self._log.info("list continue token expired, restarting list")
                    continue
                raise
            break
        if not rv:
            raise ValueError("list returned no resourceVersion")
        self.lists += 1
        changed = self.store.replace(items, rv)
        self._log.info("listed", objects=len(items), changed=len(changed), resource_version=rv)
        self.synced.set()
        self._notify(None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        saw_event = False
        self.watches += 1
        timeout = self._rng.randint(*self.watch_timeout)
        stream = self.client.watch(
            self.resource,
            resource_version=self.store.resource_version,
            namespace=self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=timeout,
            allow_bookmarks=True,
            read_timeout=self.watch_read_timeout,
        )
        # aclosing: leaving on an ERROR event must release the connection now, not
        # whenever the generator is collected.
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                self._handle_event(event)
                saw_event = True
        if not saw_event and loop.time() - started < self.min_watch_duration:
            # A server that closes every watch at once would otherwise be hammered.
            await asyncio.sleep(self.backoff.next_delay())

    def _handle_event(self, event: JSON) -> None:
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"watch {etype} event without an object")
        if etype == "ERROR":
            raise ApiError.from_status(obj)
        # A stream that delivers is a success: the next failure starts from a short
        # delay again.
        self.backoff.reset()
        if etype == "BOOKMARK":
            self.store.advance((obj.get("metadata") or {}).get("resourceVersion"))
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            self._log.warning("unknown watch event type", type=etype)
            return
        self.events += 1
        if self.store.apply(etype, obj):
            self._notify(self.store.key(obj))

    async def _fail(self, exc: Exception, step: str) -> None:
        self.errors += 1
        self.last_error = exc
        delay = self.backoff.next_delay()
        retry_after = exc.retry_after if isinstance(exc, ApiError) else None
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._log.warning(
            f"{step} failed, retrying",
            error=f"{type(exc).__name__}: {exc}",
            retry_in=round(delay, 3),
            attempt=self.backoff.attempt,
        )
        await asyncio.sleep(delay)

    def _notify(self, key: str | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self.resource.kind, key)
        except Exception:
            self._log.exception("on_change callback failed", key=key)
