"""The Reflector keeps a Store equal to the API server through changes, dropped watches,
restarts, 410s, throttling and errors; the Store never goes back in time; the client
speaks kubeconfig/TLS and survives huge watch lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lbd.k8s import (
    NODES,
    SERVICES,
    ApiClient,
    ApiError,
    Backoff,
    Reflector,
    Resource,
    Store,
)
from lbd.testing.apiserver import ApiServer, make_self_signed_cert

TOKEN = "reflector-token"


def run(coro: Any, timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def svc(name: str, ns: str = "default", port: int = 80) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": port}]},
    }


async def eventually(predicate: Any, timeout: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def store_view(store: Store) -> dict[str, str]:
    return {k: o["metadata"]["resourceVersion"] for k, o in store.items()}


def server_view(server: ApiServer, kind: str = "services") -> dict[str, str]:
    view = {}
    for o in server.list_objects(kind):
        meta = o["metadata"]
        key = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        view[key] = meta["resourceVersion"]
    return view


class RecordingBackoff(Backoff):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delays: list[tuple[float, float]] = []  # (delay, ceiling)

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        delay = super().next_delay()
        self.delays.append((delay, ceiling))
        return delay


@contextlib.asynccontextmanager
async def cluster(**kwargs: Any) -> AsyncIterator[tuple[ApiServer, ApiClient]]:
    kwargs.setdefault("bookmark_interval", 0.1)
    server = ApiServer(token=TOKEN, **kwargs)
    await server.start("127.0.0.1", 0)
    client = ApiClient.from_url(server.url, TOKEN)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


class Running:
    def __init__(self, reflector: Reflector, changes: list[tuple[str, str | None]]) -> None:
        self.reflector = reflector
        self.store = reflector.store
        self.changes = changes


@contextlib.asynccontextmanager
async def reflecting(
    client: ApiClient,
    resource: Resource = SERVICES,
    *,
    wait_synced: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    kwargs.setdefault("backoff", RecordingBackoff(0.01, 0.1, rng=random.Random(7)))
    store = Store(resource.kind, namespaced=resource.namespaced)
    changes: list[tuple[str, str | None]] = []
    reflector = Reflector(
        client,
        resource,
        store,
        on_change=lambda kind, key: changes.append((kind, key)),
        **kwargs,
    )
    task = asyncio.get_running_loop().create_task(reflector.run())
    try:
        if wait_synced:
            await asyncio.wait_for(reflector.synced.wait(), 5)
        yield Running(reflector, changes)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- following the server ---------------------------------------------------------------


def test_store_mirrors_server_through_create_update_delete() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            for name in ("a", "b", "c"):
                server.put_object("services", svc(name))
            async with reflecting(client) as r:
                assert store_view(r.store) == server_view(server)
                assert r.changes == [("Service", None)]

                server.put_object("services", svc("d", ns="other"))
                server.put_object("services", svc("a", port=8080))
                server.delete_object("services", "default", "b")
                await eventually(lambda: store_view(r.store) == server_view(server))
                assert r.store.get("default/a")["spec"]["ports"][0]["port"] == 8080
                assert "default/b" not in r.store
                assert ("Service", "default/b") in r.changes
                assert ("Service", "other/d") in r.changes
                assert r.reflector.lists == 1 and r.reflector.errors == 0

    run(body())


def test_cluster_scoped_nodes_are_keyed_by_name() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            server.put_object("nodes", {"metadata": {"name": "n1"}})
            async with reflecting(client, NODES) as r:
                assert r.store.keys() == ["n1"]

    run(body())


def test_list_is_paginated() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            for i in range(12):
                server.put_object("services", svc(f"s{i}"))
            async with reflecting(client, page_size=5) as r:
                assert len(r.store) == 12
            pages = server.count_requests(
                "list", "services", where=lambda req: req.query.get("limit") == "5"
            )
            assert pages == 3

    run(body())


class CompactingClient(ApiClient):
    """Compacts the server's history right after the first list page it fetches."""

    server: ApiServer
    compacted = False

    async def list(self, resource: Resource, **kwargs: Any) -> dict[str, Any]:
        page = await super().list(resource, **kwargs)
        if not self.compacted:
            # One object goes away and history is compacted between two pages: the
            # continue token in `page` is now useless.
            self.compacted = True
            self.server.delete_object("services", "default", "s0")
            self.server.compact()
        return page


def test_expired_continue_token_restarts_the_list() -> None:
    async def body() -> None:
        async with cluster() as (server, _):
            for i in range(6):
                server.put_object("services", svc(f"s{i}"))
            client = CompactingClient(server.url, token=TOKEN)
            client.server = server
            try:
                async with reflecting(client, page_size=2) as r:
                    assert store_view(r.store) == server_view(server)
                    assert "default/s0" not in r.store
                    assert r.reflector.lists == 1
            finally:
                await client.close()
            first_pages = server.count_requests(
                "list", "services", where=lambda req: "continue" not in req.query
            )
            assert first_pages == 2

    run(body())


# ---- watch interruptions ----------------------------------------------------------------


def test_dropped_watch_resumes_without_relist() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            server.put_object("services", svc("a"))
            async with reflecting(client) as r:
                await server.wait_for_watches(1)
                server.drop_watches()
                server.put_object("services", svc("b"))
                await eventually(lambda: "default/b" in r.store)
                await server.wait_for_watches(1)
                assert r.reflector.watches >= 2
                assert r.reflector.lists == 1
                assert r.reflector.errors == 0

    run(body())


def test_cut_connection_backs_off_then_resumes_without_relist() -> None:
    async def body() -> None:
        async with cluster() as (server, client), reflecting(client) as r:
            await server.wait_for_watches(1)
            server.drop_watches(abrupt=True)
            server.put_object("services", svc("b"))
            await eventually(lambda: "default/b" in r.store)
            assert r.reflector.errors == 1
            assert r.reflector.lists == 1

    run(body())


def test_server_restart_with_same_data_resumes_the_watch() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            server.put_object("services", svc("a"))
            async with reflecting(client) as r:
                await server.wait_for_watches(1)
                await server.stop()
                await eventually(lambda: r.reflector.errors >= 2, what="refused connections")
                # Down: the store keeps what it had.
                assert list(r.store.keys()) == ["default/a"]
                server.put_object("services", svc("b"))
                await server.start()
                await eventually(lambda: "default/b" in r.store)
                assert r.reflector.lists == 1
                assert r.reflector.relists_410 == 0

    run(body())


def test_410_on_resume_relists_and_objects_deleted_meanwhile_disappear() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            server.put_object("services", svc("stays"))
            server.put_object("services", svc("goes"))
            async with reflecting(client) as r:
                await server.wait_for_watches(1)
                await server.stop()
                server.delete_object("services", "default", "goes")
                server.put_object("services", svc("new"))
                server.compact()
                r.changes.clear()
                await server.start()
                await eventually(lambda: "default/goes" not in r.store, what="relist")
                assert store_view(r.store) == server_view(server)
                assert r.reflector.relists_410 == 1
                assert r.reflector.lists == 2
                assert ("Service", None) in r.changes

    run(body())


def test_store_keeps_its_contents_while_the_server_is_down() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            for name in ("a", "b"):
                server.put_object("services", svc(name))
            async with reflecting(client) as r:
                before = store_view(r.store)
                generation = r.store.generation
                await server.wait_for_watches(1)
                await server.stop()
                await eventually(lambda: r.reflector.errors >= 3)
                assert store_view(r.store) == before
                assert r.store.generation == generation

    run(body())


def test_bookmarks_advance_the_resource_version() -> None:
    async def body() -> None:
        async with cluster(bookmark_interval=0.05) as (server, client), reflecting(client) as r:
            start = r.store.resource_version
            # Writes to another kind move the global resourceVersion; only a bookmark
            # can tell the Service watcher about it.
            server.put_object("nodes", {"metadata": {"name": "n1"}})
            target = server.resource_version
            assert int(target) > int(start)
            await eventually(lambda: r.store.resource_version == target)
            assert r.reflector.events == 0
            assert r.store.generation == 1  # no mutation, just progress

    run(body())


# ---- throttling and errors --------------------------------------------------------------


def test_429_waits_at_least_retry_after() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            server.throttle(1, retry_after=1, verbs={"list"})
            t0 = time.monotonic()
            async with reflecting(client) as r:
                waited = time.monotonic() - t0
                assert waited >= 1.0
                assert r.reflector.errors == 1
                # Its own backoff alone would have retried after at most 10 ms.
                assert r.reflector.backoff.delays[0][1] == pytest.approx(0.01)

    run(body())


def test_server_errors_back_off_with_growing_jittered_delays_then_reset() -> None:
    async def body() -> None:
        async with cluster() as (server, client):
            backoff = RecordingBackoff(0.02, 0.1, rng=random.Random(3))
            server.fail_requests(5, verbs={"list"})
            # min_watch_duration=0: the dropped watch below must not add its own delay.
            async with reflecting(client, backoff=backoff, min_watch_duration=0.0) as r:
                assert r.reflector.errors == 5
                ceilings = [c for _, c in backoff.delays]
                assert ceilings == pytest.approx([0.02, 0.04, 0.08, 0.1, 0.1])
                assert all(0 <= d <= c for d, c in backoff.delays)
                assert backoff.attempt == 0  # reset by the successful list
                server.fail_requests(1, verbs={"watch"})
                server.drop_watches()
                await eventually(lambda: r.reflector.errors == 6)
                assert backoff.delays[-1][1] == pytest.approx(0.02)  # starts low again

    run(body())


def test_backoff_full_jitter_spacing() -> None:
    b = Backoff(base=0.2, cap=5.0, rng=random.Random(42))
    per_attempt: dict[int, list[float]] = {n: [] for n in range(8)}
    for _ in range(1000):
        b.reset()
        for n in range(8):
            per_attempt[n].append(b.next_delay())
    for n, delays in per_attempt.items():
        ceiling = min(5.0, 0.2 * 2**n)
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter: uniform over [0, ceiling], so the mean sits near the middle and
        # the delays are spread, not clustered.
        assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.1)
        assert statistics.pstdev(delays) > ceiling / 4
    means = [statistics.mean(per_attempt[n]) for n in range(5)]
    assert means == sorted(means)
    assert max(per_attempt[7]) <= 5.0
    # Two clients failing together do not retry in lockstep.
    a1 = Backoff(0.2, 5.0, rng=random.Random(1))
    a2 = Backoff(0.2, 5.0, rng=random.Random(2))
    assert [a1.next_delay() for _ in range(5)] != [a2.next_delay() for _ in range(5)]


def test_malformed_watch_line_is_an_error_then_the_watch_resumes() -> None:
    class GarblingClient(ApiClient):
        garbled = False

        async def watch(self, resource: Resource, **kwargs: Any) -> AsyncIterator[Any]:
            async with contextlib.aclosing(super().watch(resource, **kwargs)) as events:
                async for event in events:
                    if not self.garbled:
                        self.garbled = True
                        json.loads(b"{not json")
                    yield event

    async def body() -> None:
        async with cluster(bookmark_interval=0.05) as (server, _):
            client = GarblingClient(server.url, token=TOKEN)
            try:
                async with reflecting(client) as r:
                    await eventually(lambda: r.reflector.errors == 1)
                    assert isinstance(r.reflector.last_error, ValueError)
                    server.put_object("services", svc("later"))
                    await eventually(lambda: "default/later" in r.store)
                    assert r.reflector.lists == 1
            finally:
                await client.close()

    run(body())


# ---- the client ------------------------------------------------------------------------


def test_client_from_kubeconfig_over_tls_and_typed_errors(tmp_path: Path) -> None:
    cert, key = make_self_signed_cert(str(tmp_path))

    async def body() -> None:
        server = ApiServer(token=TOKEN, tls_cert=cert, tls_key=key)
        await server.start("127.0.0.1", 0)
        try:
            server.put_object("services", svc("a"))
            for token, expect in ((TOKEN, None), ("bad", 401)):
                path = tmp_path / f"kubeconfig-{token}"
                path.write_text(
                    json.dumps(
                        {
                            "apiVersion": "v1",
                            "kind": "Config",
                            "clusters": [
                                {
                                    "name": "c",
                                    "cluster": {
                                        "server": server.url,
                                        "certificate-authority": cert,
                                    },
                                }
                            ],
                            "users": [{"name": "u", "user": {"token": token}}],
                            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                            "current-context": "x",
                        }
                    )
                )
                client = await ApiClient.from_kubeconfig(str(path))
                try:
                    if expect is None:
                        listed = await client.list(SERVICES)
                        assert [o["metadata"]["name"] for o in listed["items"]] == ["a"]
                        with pytest.raises(ApiError) as missing:
                            await client.get(SERVICES, "default", "nope")
                        assert (missing.value.status, missing.value.reason) == (404, "NotFound")
                    else:
                        with pytest.raises(ApiError) as denied:
                            await client.list(SERVICES)
                        assert denied.value.status == 401
                finally:
                    await client.close()
        finally:
            await server.stop()

    run(body())


def test_client_watch_reassembles_huge_lines_split_across_chunks() -> None:
    big = {"metadata": {"name": "big", "namespace": "default", "resourceVersion": "5"}}
    big["endpoints"] = [{"addresses": [f"10.0.{i // 256}.{i % 256}"]} for i in range(20000)]
    line = json.dumps({"type": "ADDED", "object": big}).encode() + b"\n"
    assert len(line) > 512 * 1024

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(line), 7000):
            await resp.write(line[i : i + 7000])
        await resp.write(b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}')
        await resp.write(b"\n{broken\n")
        return resp

    async def body() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/services", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        client = ApiClient.from_url(f"http://127.0.0.1:{port}")
        got: list[Any] = []
        try:
            with pytest.raises(ValueError):
                async for event in client.watch(SERVICES, resource_version="1"):
                    got.append(event)
        finally:
            await client.close()
            await runner.cleanup()
        assert [e["type"] for e in got] == ["ADDED", "BOOKMARK"]
        assert got[0]["object"] == big

    run(body())


# ---- the store --------------------------------------------------------------------------


def obj(name: str, rv: int, ns: str = "default", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)}, **extra}


def test_store_ignores_stale_and_duplicate_events() -> None:
    store = Store("Service")
    store.replace([obj("a", 5, v=1)], "5")
    assert store.apply("MODIFIED", obj("a", 7, v=2))
    generation = store.generation
    assert not store.apply("MODIFIED", obj("a", 7, v=2))  # duplicate
    assert not store.apply("MODIFIED", obj("a", 6, v=1))  # older
    assert store.get("default/a")["v"] == 2
    assert store.generation == generation
    assert store.resource_version == "7"


def test_store_does_not_resurrect_deleted_objects() -> None:
    store = Store("Service")
    store.replace([obj("a", 5)], "5")
    assert store.apply("DELETED", obj("a", 8))
    assert not store.apply("ADDED", obj("a", 6))  # a replay from before the delete
    assert "default/a" not in store
    assert store.apply("ADDED", obj("a", 9))  # re-created later: real
    assert "default/a" in store


def test_store_replace_removes_what_the_list_lacks() -> None:
    store = Store("Service")
    store.replace([obj("a", 1), obj("b", 2)], "2")
    store.apply("DELETED", obj("c", 3))
    changed = store.replace([obj("b", 2), obj("c", 2), obj("d", 4)], "10")
    assert sorted(store.keys()) == ["default/b", "default/c", "default/d"]
    assert changed == {"default/a", "default/c", "default/d"}
    assert store.resource_version == "10"
    store.advance("9")
    assert store.resource_version == "10"  # never backward
    store.advance("11")
    assert store.resource_version == "11"
    assert len(store) == 3
