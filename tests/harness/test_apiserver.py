"""The fake API server behaves like a real one where clients can tell: CRUD and Status
errors, selectors, pagination, watches (resume, bookmarks, 410), auth, fault injection,
restarts, and the real kubectl driving it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbd.testing.apiserver import (
    ApiServer,
    ThreadedApiServer,
    make_self_signed_cert,
)

TOKEN = "s3cret-token"
SVCS = "/api/v1/namespaces/default/services"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


def run(coro: Any, timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None, port: int = 80):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
    }


class Http:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None = TOKEN):
        self.session = session
        self.url = url
        self.token = token

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        h.update(extra or {})
        return h

    async def req(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        hdrs = self.headers(headers)
        data = None
        if body is not None:
            data = json.dumps(body)
            hdrs["Content-Type"] = content_type
        async with self.session.request(
            method, self.url + path, data=data, params=params, headers=hdrs
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode()
            return resp.status, parsed, resp.headers

    async def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = await self.req("POST", path, obj)
        assert status == 201, body
        return body


_END = object()


class Watch:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for line in self.resp.content:
                if line.strip():
                    self.queue.put_nowait(json.loads(line))
            self.queue.put_nowait(_END)
        except (aiohttp.ClientError, ConnectionError) as exc:
            self.queue.put_nowait(exc)

    async def next(self, timeout: float = 3.0) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def next_event(self, timeout: float = 3.0, skip_bookmarks: bool = True) -> Any:
        while True:
            ev = await self.next(timeout)
            if not (skip_bookmarks and isinstance(ev, dict) and ev["type"] == "BOOKMARK"):
                return ev


@contextlib.asynccontextmanager
async def watching(http: Http, path: str, **params: str) -> AsyncIterator[Watch]:
    query = {"watch": "1", **params}
    resp = await http.session.get(http.url + path, params=query, headers=http.headers())
    assert resp.status == 200, await resp.text()
    w = Watch(resp)
    try:
        yield w
    finally:
        w.task.cancel()
        resp.close()


@contextlib.asynccontextmanager
async def serve(**kwargs: Any) -> AsyncIterator[tuple[ApiServer, Http]]:
    server = ApiServer(token=TOKEN, **kwargs)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield server, Http(session, server.url)
    finally:
        await server.stop()


# ---- CRUD and Status bodies -------------------------------------------------------------


def test_create_get_update_delete_with_real_metadata() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            created = await http.create(SVCS, svc("web"))
            meta = created["metadata"]
            assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
            assert meta["generation"] == 1
            assert int(meta["resourceVersion"]) == int(server.resource_version)
            assert created["spec"]["clusterIP"].startswith("10.96.")
            assert created["spec"]["ports"][0]["protocol"] == "TCP"

            status, got, _ = await http.req("GET", f"{SVCS}/web")
            assert status == 200 and got == created

            got["spec"]["ports"][0]["port"] = 81
            status, updated, _ = await http.req("PUT", f"{SVCS}/web", got)
            assert status == 200, updated
            assert updated["metadata"]["generation"] == 2
            assert int(updated["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
            assert updated["metadata"]["uid"] == meta["uid"]
            assert updated["spec"]["clusterIP"] == created["spec"]["clusterIP"]

            status, _, _ = await http.req("DELETE", f"{SVCS}/web")
            assert status == 200
            status, gone, _ = await http.req("GET", f"{SVCS}/web")
            assert status == 404
            assert gone["kind"] == "Status" and gone["reason"] == "NotFound"
            assert gone["code"] == 404 and gone["details"]["name"] == "web"

    run(body())


def test_conflicts_and_missing_objects_answer_status_bodies() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            first = await http.create(SVCS, svc("web"))
            status, dup, _ = await http.req("POST", SVCS, svc("web"))
            assert (status, dup["reason"], dup["status"]) == (409, "AlreadyExists", "Failure")
            assert dup["message"] == 'services "web" already exists'

            first["spec"]["sessionAffinity"] = "ClientIP"
            status, ok, _ = await http.req("PUT", f"{SVCS}/web", first)
            assert status == 200
            # `first` still carries the old resourceVersion: a lost update.
            first["spec"]["sessionAffinity"] = "None"
            status, stale, _ = await http.req("PUT", f"{SVCS}/web", first)
            assert (status, stale["reason"]) == (409, "Conflict")

            for method in ("GET", "PUT", "DELETE"):
                status, missing, _ = await http.req(method, f"{SVCS}/nope", svc("nope"))
                assert (status, missing["reason"]) == (404, "NotFound"), method
            status, missing, _ = await http.req("GET", f"{SLICES}/nope")
            assert missing["message"] == 'endpointslices.discovery.k8s.io "nope" not found'

            status, invalid, _ = await http.req("POST", SVCS, {"metadata": {}})
            assert (status, invalid["reason"]) == (422, "Invalid")

    run(body())


def test_generate_name_and_namespace_auto_creation() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            obj = svc("x", ns="team-a")
            del obj["metadata"]["name"]
            obj["metadata"]["generateName"] = "web-"
            made = await http.create("/api/v1/namespaces/team-a/services", obj)
            assert made["metadata"]["name"].startswith("web-")
            assert len(made["metadata"]["name"]) == len("web-") + 5
            status, ns, _ = await http.req("GET", "/api/v1/namespaces/team-a")
            assert status == 200 and ns["kind"] == "Namespace"

    run(body())


def test_nodes_are_cluster_scoped() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            node = {"metadata": {"name": "n1", "labels": {"zone": "a"}}}
            created = await http.create("/api/v1/nodes", node)
            assert "namespace" not in created["metadata"]
            status, listed, _ = await http.req("GET", "/api/v1/nodes")
            assert [n["metadata"]["name"] for n in listed["items"]] == ["n1"]
            status, _, _ = await http.req("GET", "/api/v1/namespaces/default/nodes/n1")
            assert status == 404

    run(body())


def test_status_subresource_is_separate_from_the_main_resource() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            obj = svc("lb")
            obj["spec"]["type"] = "LoadBalancer"
            obj["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
            created = await http.create(SVCS, obj)
            assert created["status"] == {"loadBalancer": {}}  # create ignores status
            assert created["spec"]["ports"][0]["nodePort"] >= 30000

            patch = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}
            mp = "application/merge-patch+json"
            status, got, _ = await http.req("PATCH", f"{SVCS}/lb/status", patch, content_type=mp)
            assert status == 200 and got["status"] == patch["status"]
            # A main-resource patch cannot touch status.
            status, got, _ = await http.req(
                "PATCH", f"{SVCS}/lb", {"status": {"loadBalancer": {}}}, content_type=mp
            )
            assert got["status"] == patch["status"]

    run(body())


def test_patch_flavours() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            obj = svc("web")
            obj["spec"]["ports"].append({"name": "https", "port": 443})
            await http.create(SVCS, obj)

            status, got, _ = await http.req(
                "PATCH",
                f"{SVCS}/web",
                {"metadata": {"labels": {"tier": "front"}}},
                content_type="application/merge-patch+json",
            )
            assert status == 200 and got["metadata"]["labels"] == {"tier": "front"}

            # What kubectl apply sends: ports merge by `port`, with a delete directive.
            smp = {
                "spec": {
                    "$setElementOrder/ports": [{"port": 443}, {"port": 8080}],
                    "ports": [{"name": "alt", "port": 8080}, {"$patch": "delete", "port": 80}],
                }
            }
            status, got, _ = await http.req(
                "PATCH",
                f"{SVCS}/web",
                smp,
                content_type="application/strategic-merge-patch+json",
            )
            assert status == 200, got
            assert [(p["name"], p["port"]) for p in got["spec"]["ports"]] == [
                ("https", 443),
                ("alt", 8080),
            ]

            ops = [{"op": "replace", "path": "/spec/sessionAffinity", "value": "ClientIP"}]
            status, got, _ = await http.req(
                "PATCH", f"{SVCS}/web", ops, content_type="application/json-patch+json"
            )
            assert status == 200 and got["spec"]["sessionAffinity"] == "ClientIP"

            stale = {"metadata": {"resourceVersion": "1"}, "spec": {"type": "NodePort"}}
            status, got, _ = await http.req(
                "PATCH", f"{SVCS}/web", stale, content_type="application/merge-patch+json"
            )
            assert (status, got["reason"]) == (409, "Conflict")

    run(body())


# ---- selectors and pagination -----------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=a", ["s1", "s2"]),
        ("app==a", ["s1", "s2"]),
        ("app!=a", ["s3", "s4"]),  # objects without the key match !=
        ("app in (a,b)", ["s1", "s2", "s3"]),
        ("app notin (a)", ["s3", "s4"]),
        ("tier", ["s2", "s3"]),
        ("!tier", ["s1", "s4"]),
        ("app=a,tier=web", ["s2"]),
        ("app in (a, b),!tier", ["s1"]),
    ],
)
def test_label_selectors(selector: str, expected: list[str]) -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.put_object("services", svc("s1", labels={"app": "a"}))
            server.put_object("services", svc("s2", labels={"app": "a", "tier": "web"}))
            server.put_object("services", svc("s3", labels={"app": "b", "tier": "db"}))
            server.put_object("services", svc("s4"))
            status, listed, _ = await http.req("GET", SVCS, params={"labelSelector": selector})
            assert status == 200
            assert [o["metadata"]["name"] for o in listed["items"]] == expected

    run(body())


def test_field_selectors_and_namespaces() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            for ns in ("a", "b"):
                for name in ("x", "y"):
                    server.put_object("services", svc(name, ns=ns))
            _, listed, _ = await http.req(
                "GET", "/api/v1/services", params={"fieldSelector": "metadata.name=x"}
            )
            assert [
                (o["metadata"]["namespace"], o["metadata"]["name"]) for o in listed["items"]
            ] == [
                ("a", "x"),
                ("b", "x"),
            ]
            _, listed, _ = await http.req(
                "GET",
                "/api/v1/services",
                params={"fieldSelector": "metadata.namespace=b,metadata.name!=x"},
            )
            assert [o["metadata"]["name"] for o in listed["items"]] == ["y"]
            _, listed, _ = await http.req("GET", "/api/v1/namespaces/a/services")
            assert {o["metadata"]["namespace"] for o in listed["items"]} == {"a"}

    run(body())


def test_pagination_is_complete_stable_and_consistent() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            for i in range(25):
                server.put_object("services", svc(f"s{i:02d}", ns=f"ns{i % 3}"))
            names: list[str] = []
            token = None
            rvs = set()
            pages = 0
            while True:
                params = {"limit": "10"}
                if token:
                    params["continue"] = token
                status, page, _ = await http.req("GET", "/api/v1/services", params=params)
                assert status == 200
                pages += 1
                rvs.add(page["metadata"]["resourceVersion"])
                names += [o["metadata"]["name"] for o in page["items"]]
                if pages == 1:
                    # Writes after the first page do not leak into later pages.
                    server.put_object("services", svc("zz-late"))
                token = page["metadata"].get("continue")
                if not token:
                    break
            assert pages == 3
            assert sorted(names) == [f"s{i:02d}" for i in range(25)]
            assert len(rvs) == 1
            _, again, _ = await http.req("GET", "/api/v1/services", params={"limit": "10"})
            # Stable (namespace, name) order: "default/zz-late" now sorts first.
            assert [o["metadata"]["name"] for o in again["items"]] == ["zz-late", *names[:9]]

    run(body())


def test_continue_token_expires_after_compaction() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            for i in range(5):
                server.put_object("services", svc(f"s{i}"))
            _, page, _ = await http.req("GET", SVCS, params={"limit": "2"})
            server.put_object("services", svc("later"))
            server.compact()
            status, err, _ = await http.req(
                "GET", SVCS, params={"limit": "2", "continue": page["metadata"]["continue"]}
            )
            assert (status, err["reason"], err["code"]) == (410, "Expired", 410)

    run(body())


# ---- watch -------------------------------------------------------------------------------


def test_watch_from_resource_version_streams_changes_in_order() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.put_object("services", svc("before"))
            rv = server.resource_version
            async with watching(http, SVCS, resourceVersion=rv) as w:
                created = await http.create(SVCS, svc("web"))
                created["spec"]["sessionAffinity"] = "ClientIP"
                await http.req("PUT", f"{SVCS}/web", created)
                await http.req("DELETE", f"{SVCS}/web")
                server.put_object("nodes", {"metadata": {"name": "n1"}})  # other kind
                server.delete_object("services", "default", "before")
                events = [await w.next_event() for _ in range(4)]
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
                ("ADDED", "web"),
                ("MODIFIED", "web"),
                ("DELETED", "web"),
                ("DELETED", "before"),
            ]
            rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
            assert rvs == sorted(rvs) and rvs[0] > int(rv)

    run(body())


def test_watch_without_resource_version_starts_with_current_objects() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.put_object("services", svc("a"))
            server.put_object("services", svc("b"))
            async with watching(http, SVCS) as w:
                first = [await w.next_event() for _ in range(2)]
                server.put_object("services", svc("c"))
                third = await w.next_event()
            assert [(e["type"], e["object"]["metadata"]["name"]) for e in first] == [
                ("ADDED", "a"),
                ("ADDED", "b"),
            ]
            assert (third["type"], third["object"]["metadata"]["name"]) == ("ADDED", "c")

    run(body())


def test_watch_with_selector_sees_objects_enter_and_leave() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.put_object("services", svc("web", labels={"app": "x"}))
            rv = server.resource_version
            async with watching(http, SVCS, resourceVersion=rv, labelSelector="app=y") as w:
                server.put_object("services", svc("web", labels={"app": "y"}))
                entered = await w.next_event()
                server.put_object("services", svc("web", labels={"app": "z"}))
                left = await w.next_event()
            assert entered["type"] == "ADDED"
            assert left["type"] == "DELETED"

    run(body())


def test_bookmarks_carry_the_current_resource_version() -> None:
    async def body() -> None:
        async with serve(bookmark_interval=0.05) as (server, http):
            rv = server.resource_version
            async with watching(http, SVCS, resourceVersion=rv, allowWatchBookmarks="true") as w:
                server.put_object("nodes", {"metadata": {"name": "n1"}})
                target = server.resource_version
                deadline = time.monotonic() + 3
                while True:
                    ev = await w.next()
                    assert ev["type"] == "BOOKMARK"
                    assert set(ev["object"]["metadata"]) == {"resourceVersion"}
                    if ev["object"]["metadata"]["resourceVersion"] == target:
                        break
                    assert time.monotonic() < deadline
            async with watching(http, SVCS, resourceVersion=rv) as w:
                with pytest.raises(TimeoutError):
                    await w.next(timeout=0.3)  # not asked for: none sent

    run(body())


def test_watch_honours_timeout_seconds() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            started = time.monotonic()
            async with watching(
                http, SVCS, resourceVersion=server.resource_version, timeoutSeconds="1"
            ) as w:
                assert await w.next(timeout=3) is _END
            assert 0.9 <= time.monotonic() - started < 2.5

    run(body())


def test_watch_from_compacted_history_gets_410_expired_event() -> None:
    async def body() -> None:
        async with serve(history_size=5) as (server, http):
            old = server.resource_version
            for i in range(3):
                server.put_object("services", svc(f"s{i}"))
            async with watching(http, SVCS, resourceVersion=old) as w:
                # Still within history: fine.
                assert (await w.next_event())["type"] == "ADDED"
            for i in range(10):
                server.put_object("services", svc(f"t{i}"))
            async with watching(http, SVCS, resourceVersion=old) as w:
                err = await w.next()
                assert err["type"] == "ERROR"
                assert err["object"]["kind"] == "Status"
                assert (err["object"]["code"], err["object"]["reason"]) == (410, "Expired")
                assert await w.next() is _END
            recent = server.resource_version
            server.compact()
            async with watching(http, SVCS, resourceVersion=str(int(recent) - 1)) as w:
                assert (await w.next())["type"] == "ERROR"

    run(body())


def test_object_helpers_generate_watch_events_from_other_threads() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            async with watching(http, SVCS, resourceVersion=server.resource_version) as w:
                t = threading.Thread(
                    target=lambda: server.put_objects("services", [svc(f"t{i}") for i in range(3)])
                )
                t.start()
                t.join()
                names = [(await w.next_event())["object"]["metadata"]["name"] for _ in range(3)]
            assert names == ["t0", "t1", "t2"]

    run(body())


# ---- auth --------------------------------------------------------------------------------


def test_bearer_token_is_required() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            for token in (None, "wrong"):
                anon = Http(http.session, http.url, token=token)
                status, err, _ = await anon.req("GET", SVCS)
                assert (status, err["kind"], err["reason"]) == (401, "Status", "Unauthorized")
                status, _, _ = await anon.req("POST", "/_fault/compact")
                assert status == 401
            status, _, _ = await http.req("GET", SVCS)
            assert status == 200
            # kubectl probes /version anonymously, as real clusters allow.
            status, version, _ = await Http(http.session, http.url, None).req("GET", "/version")
            assert status == 200 and version["major"] == "1"

    run(body())


def test_discovery_documents() -> None:
    async def body() -> None:
        async with serve() as (_, http):
            _, api, _ = await http.req("GET", "/api")
            assert api["versions"] == ["v1"]
            _, core, _ = await http.req("GET", "/api/v1")
            names = {r["name"]: r for r in core["resources"]}
            assert names["services"]["namespaced"] and not names["nodes"]["namespaced"]
            assert "svc" in names["services"]["shortNames"]
            _, groups, _ = await http.req("GET", "/apis")
            assert [g["name"] for g in groups["groups"]] == ["discovery.k8s.io"]
            _, disc, _ = await http.req("GET", "/apis/discovery.k8s.io/v1")
            assert [r["kind"] for r in disc["resources"]] == ["EndpointSlice"]
            status, _, _ = await http.req("GET", "/apis/apps/v1")
            assert status == 404

    run(body())


# ---- faults ------------------------------------------------------------------------------


def test_fault_errors_for_n_requests_then_recovers() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.fail_requests(2, status=503)
            statuses = [(await http.req("GET", SVCS))[0] for _ in range(3)]
            assert statuses == [503, 503, 200]
            server.fail_requests(duration=0.3, verbs={"watch"})
            assert (await http.req("GET", SVCS))[0] == 200  # lists unaffected
            status, err, _ = await http.req("GET", SVCS, params={"watch": "1"})
            assert (status, err["reason"]) == (500, "InternalError")
            await asyncio.sleep(0.35)
            async with watching(http, SVCS, resourceVersion=server.resource_version):
                pass

    run(body())


def test_fault_throttle_answers_429_with_retry_after() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.throttle(1, retry_after=3)
            status, err, headers = await http.req("GET", SVCS)
            assert (status, err["reason"]) == (429, "TooManyRequests")
            assert headers["Retry-After"] == "3"
            assert err["details"]["retryAfterSeconds"] == 3
            assert (await http.req("GET", SVCS))[0] == 200

    run(body())


def test_fault_stall_delays_answers() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.stall(0.3, count=1)
            t0 = time.monotonic()
            assert (await http.req("GET", SVCS))[0] == 200
            assert time.monotonic() - t0 >= 0.3
            t0 = time.monotonic()
            await http.req("GET", SVCS)
            assert time.monotonic() - t0 < 0.2

    run(body())


def test_fault_drop_watches_graceful_and_abrupt() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            rv = server.resource_version
            async with watching(http, SVCS, resourceVersion=rv) as w:
                await server.wait_for_watches(1)
                assert server.drop_watches() == 1
                assert await w.next() is _END  # a clean end of the chunked stream
            async with watching(http, SVCS, resourceVersion=rv) as w:
                await server.wait_for_watches(1)
                server.drop_watches(abrupt=True)
                ended = await w.next()
                assert ended is not _END and isinstance(ended, Exception)

    run(body())


def test_faults_over_http() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            assert (await http.req("POST", "/_fault/errors", {"count": 1, "status": 500}))[0] == 200
            assert (await http.req("GET", SVCS))[0] == 500
            await http.req("POST", "/_fault/throttle", {"count": 1, "retry_after": 2})
            status, _, headers = await http.req("GET", SVCS)
            assert (status, headers["Retry-After"]) == (429, "2")
            await http.req("POST", "/_fault/stall", {"seconds": 0.2})
            t0 = time.monotonic()
            await http.req("GET", SVCS)
            assert time.monotonic() - t0 >= 0.2
            await http.req("POST", "/_fault/clear")
            old = server.resource_version
            server.put_object("services", svc("a"))
            await http.req("POST", "/_fault/compact")
            async with watching(http, SVCS, resourceVersion=old) as w:
                assert (await w.next())["object"]["code"] == 410
            async with watching(http, SVCS, resourceVersion=server.resource_version) as w:
                await server.wait_for_watches(1)
                _, dropped, _ = await http.req("POST", "/_fault/drop-watches", {})
                assert dropped == {"dropped": 1}
                assert await w.next() is _END
            _, stats, _ = await http.req("GET", "/_fault/stats")
            assert stats["objects"]["services"] == 1

    run(body())


def test_restart_on_same_port_keeping_or_discarding_data() -> None:
    async def body() -> None:
        async with serve() as (server, http):
            server.put_object("services", svc("kept"))
            port = server.port
            await server.stop()
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.req("GET", SVCS)
            await server.start()
            assert server.port == port
            _, listed, _ = await http.req("GET", SVCS)
            assert [o["metadata"]["name"] for o in listed["items"]] == ["kept"]

            old = server.resource_version
            await server.restart(keep_data=False)
            _, listed, _ = await http.req("GET", SVCS)
            assert listed["items"] == []
            async with watching(http, SVCS, resourceVersion=old) as w:
                assert (await w.next())["object"]["code"] == 410

            await http.req("POST", "/_fault/restart", {"down_for": 0.2})
            await asyncio.sleep(0.1)
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.req("GET", SVCS)
            await asyncio.sleep(0.4)
            assert (await http.req("GET", SVCS))[0] == 200

    run(body())


def test_start_on_a_pre_created_socket() -> None:
    import socket

    async def body() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = ApiServer(token=TOKEN)
        await server.start_on_socket(sock)
        try:
            assert server.url == f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with aiohttp.ClientSession() as session:
                status, _, _ = await Http(session, server.url).req("GET", SVCS)
                assert status == 200
        finally:
            await server.stop()

    run(body())


# ---- as a subprocess ---------------------------------------------------------------------


def test_runs_as_a_subprocess_and_prints_its_address() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbd.testing.apiserver", "--listen", "127.0.0.1:0", "--token", "T"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]

        async def probe() -> tuple[int, int]:
            async with aiohttp.ClientSession() as session:
                anon = await Http(session, url, None).req("GET", SVCS)
                ok = await Http(session, url, "T").req("GET", SVCS)
                return anon[0], ok[0]

        assert run(probe()) == (401, 200)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# ---- the real kubectl --------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None or shutil.which("openssl") is None, reason="kubectl/openssl not installed"
)


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # client-go sends a bearer token only over TLS, so this server speaks https.
    tmp = tmp_path_factory.mktemp("kube")
    cert, key = make_self_signed_cert(str(tmp))
    with ThreadedApiServer(token=TOKEN, tls_cert=cert, tls_key=key) as srv:
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{srv.url}", certificate-authority: "{cert}"}}
users:
- name: test
  user: {{token: "{TOKEN}"}}
contexts:
- name: test
  context: {{cluster: test, user: test}}
current-context: test
"""
        )

        def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp)}
            cmd = [str(KUBECTL), "--cache-dir", str(tmp / "cache"), *args]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            if check:
                assert proc.returncode == 0, proc.stderr
            return proc

        yield srv, kubectl, tmp


@needs_kubectl
def test_kubectl_get_all_namespaces(kube: Any) -> None:
    srv, kubectl, _ = kube
    srv.server.put_object("services", svc("listed-one", ns="kubectl-a"))
    out = kubectl("get", "svc", "-A").stdout
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP"]
    row = next(r.split() for r in rows if "listed-one" in r)
    assert row[0] == "kubectl-a"
    assert row[3] == srv.server.get_object("svc", "kubectl-a", "listed-one")["spec"]["clusterIP"]


@needs_kubectl
def test_kubectl_create_get_apply_delete(kube: Any) -> None:
    srv, kubectl, tmp = kube
    manifest = Path(tmp) / "svc.yaml"
    manifest.write_text(
        """apiVersion: v1
kind: Service
metadata: {name: shop, namespace: kubectl-b, labels: {app: shop}}
spec:
  selector: {app: shop}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
    )
    # --save-config records last-applied, so the later apply can see port 80 go away.
    created = kubectl("create", "--save-config", "-f", str(manifest)).stdout
    assert "service/shop created" in created
    got = json.loads(kubectl("get", "svc", "shop", "-n", "kubectl-b", "-o", "json").stdout)
    assert got["spec"]["ports"][0]["targetPort"] == 8080
    assert (
        got["metadata"]["uid"]
        == srv.server.get_object("svc", "kubectl-b", "shop")["metadata"]["uid"]
    )

    # Client-side apply on an existing object: GET, then a strategic merge PATCH.
    manifest.write_text(manifest.read_text().replace("port: 80,", "port: 81,"))
    kubectl("apply", "-f", str(manifest))
    stored = srv.server.get_object("svc", "kubectl-b", "shop")
    assert [p["port"] for p in stored["spec"]["ports"]] == [81]
    assert stored["spec"]["clusterIP"] == got["spec"]["clusterIP"]

    assert 'service "shop" deleted' in kubectl("delete", "svc", "shop", "-n", "kubectl-b").stdout
    assert srv.server.get_object("svc", "kubectl-b", "shop") is None
    missing = kubectl("get", "svc", "shop", "-n", "kubectl-b", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


@needs_kubectl
def test_kubectl_apply_endpointslice_and_nodes(kube: Any) -> None:
    srv, kubectl, tmp = kube
    manifest = Path(tmp) / "slice.yaml"
    manifest.write_text(
        """apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: shop-abc
  namespace: kubectl-c
  labels: {kubernetes.io/service-name: shop}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
---
apiVersion: v1
kind: Node
metadata: {name: kubectl-node}
"""
    )
    out = kubectl("apply", "-f", str(manifest)).stdout
    assert "endpointslice.discovery.k8s.io/shop-abc created" in out
    manifest.write_text(manifest.read_text().replace("[10.0.0.1]", "[10.0.0.1, 10.0.0.2]"))
    kubectl("apply", "-f", str(manifest))
    stored = srv.server.get_object("endpointslices", "kubectl-c", "shop-abc")
    assert stored["endpoints"][0]["addresses"] == ["10.0.0.1", "10.0.0.2"]
    nodes = kubectl("get", "nodes", "-o", "name").stdout.split()
    assert "node/kubectl-node" in nodes
    kubectl("delete", "-f", str(manifest))
    assert srv.server.get_object("endpointslices", "kubectl-c", "shop-abc") is None
    assert srv.server.get_object("nodes", None, "kubectl-node") is None
