"""A small, honest Kubernetes API server for tests, the demo and the benchmarks.

It owns the in-memory object store for Services, EndpointSlices, Nodes and Namespaces and
serves them over HTTP with the real server's semantics where a client can notice them:
one global resourceVersion, list pagination with continue tokens, label and field
selectors, watches with bookmarks and 410 Expired after compaction, kind: Status error
bodies, bearer-token auth and enough discovery for the real kubectl. It also injects
faults (dropped watches, 5xx, 429 + Retry-After, stalls, compaction, restarts) on demand,
from Python or over HTTP under /_fault/.

Run alone: ``python -m lbd.testing.apiserver --listen 127.0.0.1:0 --token T``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import pickle
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

JSON = dict[str, Any]

_log = logging.getLogger(__name__)

_DUMPS_SEPARATORS = (",", ":")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=_DUMPS_SEPARATORS, check_circular=False)


# --------------------------------------------------------------------------------------
# Kinds


@dataclass(frozen=True)
class KindInfo:
    """What the server needs to know about one resource type."""

    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    # Kinds with a status subresource ignore status on main-resource writes, as the real
    # server does; clients must PUT/PATCH .../status to change it.
    has_status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """The resource name used in error messages ("endpointslices.discovery.k8s.io")."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


KINDS: dict[str, KindInfo] = {
    k.plural: k
    for k in (
        KindInfo("services", "Service", "", "v1", True, ("svc",), has_status=True),
        KindInfo("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", True),
        KindInfo("nodes", "Node", "", "v1", False, ("no",), has_status=True),
        KindInfo("namespaces", "Namespace", "", "v1", False, ("ns",), has_status=True),
    )
}

_KIND_ALIASES: dict[str, KindInfo] = {}
for _info in KINDS.values():
    for _alias in (_info.plural, _info.kind, _info.singular, *_info.short_names):
        _KIND_ALIASES[_alias] = _info
        _KIND_ALIASES[_alias.lower()] = _info


def kind_info(kind: str) -> KindInfo:
    """Resolve "services", "Service", "service" or "svc" to its KindInfo."""
    try:
        return _KIND_ALIASES[kind] if kind in _KIND_ALIASES else _KIND_ALIASES[kind.lower()]
    except KeyError:
        raise KeyError(f"unknown kind {kind!r}; known: {sorted(KINDS)}") from None


# Anonymous requests may read these, as on a real cluster (kubectl's version probe).
_PUBLIC_PATHS = frozenset({"/version", "/healthz", "/livez", "/readyz"})

_DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

# --------------------------------------------------------------------------------------
# Status errors


class StatusError(Exception):
    """An error answered as a `kind: Status` body, like the real server's."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    def response(self) -> web.Response:
        return web.Response(
            status=self.code,
            text=_dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


def _details(info: KindInfo, name: str) -> JSON:
    details: JSON = {"name": name, "kind": info.plural}
    if info.group:
        details["group"] = info.group
    return details


def _not_found(info: KindInfo, name: str) -> StatusError:
    return StatusError(
        404, "NotFound", f'{info.qualified} "{name}" not found', _details(info, name)
    )


def _already_exists(info: KindInfo, name: str) -> StatusError:
    return StatusError(
        409, "AlreadyExists", f'{info.qualified} "{name}" already exists', _details(info, name)
    )


def _conflict(info: KindInfo, name: str) -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {info.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(info, name),
    )


def _bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def _invalid(info: KindInfo, name: str, message: str) -> StatusError:
    return StatusError(
        422, "Invalid", f'{info.kind} "{name}" is invalid: {message}', _details(info, name)
    )


def _expired(message: str) -> StatusError:
    return StatusError(410, "Expired", message)


# --------------------------------------------------------------------------------------
# Selectors

_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")
_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


@dataclass(frozen=True)
class Requirement:
    """One clause of a label or field selector."""

    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, value: str | None) -> bool:
        op = self.op
        if op == "exists":
            return value is not None
        if op == "!exists":
            return value is None
        if op in ("=", "in"):
            return value is not None and value in self.values
        # "!=" and "notin" match objects that lack the key, as in Kubernetes.
        return value is None or value not in self.values


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` into requirements (ANDed)."""
    if not text or not text.strip():
        return []
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        m = _SET_RE.match(part)
        if m:
            key, op, raw = m.group(1), m.group(2), m.group(3)
            values = frozenset(v.strip() for v in raw.split(",") if v.strip())
            reqs.append(Requirement(_check_key(key), op, values))
        elif part.startswith("!"):
            reqs.append(Requirement(_check_key(part[1:].strip()), "!exists"))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            reqs.append(Requirement(_check_key(key.strip()), "!=", frozenset({value.strip()})))
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            reqs.append(Requirement(_check_key(key.strip()), "=", frozenset({value.strip()})))
        else:
            reqs.append(Requirement(_check_key(part), "exists"))
    return reqs


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise _bad_request(f"unable to parse requirement: invalid label key {key!r}")
    return key


def parse_field_selector(text: str | None) -> list[Requirement]:
    """Parse `metadata.name=x,metadata.namespace!=y` (any dotted path is accepted)."""
    if not text or not text.strip():
        return []
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        if "!=" in part:
            key, value = part.split("!=", 1)
            op = "!="
        elif "==" in part:
            key, value = part.split("==", 1)
            op = "="
        elif "=" in part:
            key, value = part.split("=", 1)
            op = "="
        else:
            raise _bad_request(f"invalid field selector: {part!r}")
        reqs.append(Requirement(key.strip(), op, frozenset({value.strip()})))
    return reqs


def _field_value(obj: JSON, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


@dataclass(frozen=True)
class ObjectFilter:
    """The namespace and selectors of one list or watch request."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    @property
    def by_content(self) -> bool:
        """True when an update can move an object in or out of the filter."""
        return bool(self.labels or self.fields)

    def __call__(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.labels:
            labels = meta.get("labels") or {}
            for req in self.labels:
                if not req.matches(labels.get(req.key)):
                    return False
        return all(req.matches(_field_value(obj, req.key)) for req in self.fields)


# --------------------------------------------------------------------------------------
# Patches


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386. `target` is not modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# Lists that strategic merge patch merges by key instead of replacing. Only the lists that
# kubectl apply touches on our kinds matter; everything else is replaced (atomic), which is
# also what the real server does for EndpointSlice's endpoints and ports.
_MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("spec", "ports"): "port",
    ("metadata", "ownerReferences"): "uid",
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
}


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """A pared-down strategic merge patch: JSON merge patch, plus merge-by-key for the
    lists in _MERGE_KEYS and the `$patch`, `$retainKeys`, `$setElementOrder` and
    `$deleteFromPrimitiveList` directives kubectl emits."""
    if not isinstance(patch, dict):
        return patch
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [x for x in result.get(name) or [] if x not in value]
            continue
        sub = (*path, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and sub in _MERGE_KEYS:
            result[key] = _merge_list(result.get(key) or [], value, _MERGE_KEYS[sub], sub)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value, sub)
        else:
            result[key] = value
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    for name, order in orders.items():
        items = result.get(name)
        if not isinstance(items, list):
            continue
        merge_key = _MERGE_KEYS.get((*path, name))
        if merge_key is None:
            rank = {_dumps(v): i for i, v in enumerate(order)}
            result[name] = sorted(items, key=lambda v: rank.get(_dumps(v), len(rank)))
        else:
            rank = {_dumps(v.get(merge_key)): i for i, v in enumerate(order) if isinstance(v, dict)}
            result[name] = sorted(
                items,
                key=lambda v: rank.get(
                    _dumps(v.get(merge_key) if isinstance(v, dict) else v), len(rank)
                ),
            )
    return result


def _merge_list(old: list[Any], patch: list[Any], key: str, path: tuple[str, ...]) -> list[Any]:
    out = list(old)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            out.append(item)
            continue
        pos = next(
            (i for i, cur in enumerate(out) if isinstance(cur, dict) and cur.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            out = [c for c in out if not (isinstance(c, dict) and c.get(key) == item[key])]
        elif item.get("$patch") == "replace" or pos is None:
            clean = {k: v for k, v in item.items() if k != "$patch"}
            if pos is None:
                out.append(clean)
            else:
                out[pos] = clean
        else:
            out[pos] = strategic_merge_patch(out[pos], item, path)
    return out


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 (add, remove, replace, move, copy, test). `target` is not modified."""
    if not isinstance(ops, list):
        raise _bad_request("a JSON patch must be a list of operations")
    doc = json.loads(_dumps(target))
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise _bad_request(f"invalid JSON patch operation: {op!r}")
        kind = op["op"]
        if kind == "add":
            doc = _pointer_set(doc, op["path"], op.get("value"), insert=True)
        elif kind == "remove":
            doc, _ = _pointer_remove(doc, op["path"])
        elif kind == "replace":
            doc, _ = _pointer_remove(doc, op["path"])
            doc = _pointer_set(doc, op["path"], op.get("value"), insert=True)
        elif kind == "move":
            doc, value = _pointer_remove(doc, op["from"])
            doc = _pointer_set(doc, op["path"], value, insert=True)
        elif kind == "copy":
            value = json.loads(_dumps(_pointer_get(doc, op["from"])))
            doc = _pointer_set(doc, op["path"], value, insert=True)
        elif kind == "test":
            if _pointer_get(doc, op["path"]) != op.get("value"):
                raise StatusError(422, "Invalid", f"JSON patch test failed at {op['path']}")
        else:
            raise _bad_request(f"unknown JSON patch op {kind!r}")
    return doc


def _pointer_parts(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise _bad_request(f"invalid JSON pointer {pointer!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _pointer_parent(doc: Any, parts: list[str]) -> Any:
    cur = doc
    for part in parts[:-1]:
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise StatusError(422, "Invalid", f"JSON patch path not found: /{part}") from None
    return cur


def _pointer_get(doc: Any, pointer: str) -> Any:
    parts = _pointer_parts(pointer)
    if not parts:
        return doc
    parent = _pointer_parent(doc, parts)
    try:
        return parent[int(parts[-1])] if isinstance(parent, list) else parent[parts[-1]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise StatusError(422, "Invalid", f"JSON patch path not found: {pointer}") from None


def _pointer_set(doc: Any, pointer: str, value: Any, *, insert: bool) -> Any:
    parts = _pointer_parts(pointer)
    if not parts:
        return value
    parent = _pointer_parent(doc, parts)
    last = parts[-1]
    if isinstance(parent, list):
        idx = len(parent) if last == "-" else int(last)
        if insert:
            parent.insert(idx, value)
        else:
            parent[idx] = value
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise StatusError(422, "Invalid", f"JSON patch cannot set {pointer}")
    return doc


def _pointer_remove(doc: Any, pointer: str) -> tuple[Any, Any]:
    parts = _pointer_parts(pointer)
    if not parts:
        return None, doc
    parent = _pointer_parent(doc, parts)
    try:
        if isinstance(parent, list):
            return doc, parent.pop(int(parts[-1]))
        return doc, parent.pop(parts[-1])
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise StatusError(422, "Invalid", f"JSON patch path not found: {pointer}") from None


# --------------------------------------------------------------------------------------
# Server state


@dataclass(slots=True)
class _Event:
    rv: int
    plural: str
    type: str
    obj: JSON
    old: JSON | None
    line: bytes | None = None  # the serialized event, shared by every unfiltered watcher

    def encoded(self) -> bytes:
        if self.line is None:
            self.line = (_dumps({"type": self.type, "object": self.obj}) + "\n").encode()
        return self.line


@dataclass(eq=False)
class _Watch:
    plural: str
    request: web.BaseRequest
    dropped: bool = False
    abrupt: bool = False


@dataclass
class RequestRecord:
    """One API request as the server saw it (kept for tests to count)."""

    method: str
    path: str
    query: dict[str, str]
    verb: str  # list, watch, get, create, update, patch, delete, discovery, other
    resource: str | None


@dataclass
class _Fault:
    remaining: int | None
    until: float | None
    verbs: frozenset[str] | None
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0

    def applies(self, verb: str) -> bool:
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        return self.verbs is None or verb in self.verbs

    def take(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1

    @property
    def exhausted(self) -> bool:
        return (self.remaining is not None and self.remaining <= 0) or (
            self.until is not None and time.monotonic() >= self.until
        )


_last_stamp: tuple[int, str] = (0, "")


def _now_rfc3339() -> str:
    global _last_stamp
    now = int(time.time())
    if _last_stamp[0] != now:  # strftime is slow enough to show when seeding 20k objects
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _last_stamp = (now, stamp)
    return _last_stamp[1]


_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def _copy(obj: Any) -> Any:
    # A pickle round trip is the fastest deep copy of plain JSON trees (several times
    # faster than copy.deepcopy), which matters when seeding 20,000 objects.
    return pickle.loads(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


def _without(obj: JSON, *keys: str) -> JSON:
    return {k: v for k, v in obj.items() if k not in keys}


def _format_retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class ApiServer:
    """The fake API server. Create it, then `await start(host, port)` (or
    `start_on_socket(sock)`) inside a running event loop.

    The object helpers (`put_object`, `delete_object`, ...) are synchronous and may be
    called from any thread; they generate watch events exactly like HTTP writes do.
    Stored objects are never mutated in place (writes replace them), so the dicts
    returned by the helpers are safe to read but must not be modified.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        bookmark_interval: float = 5.0,
        history_size: int = 10000,
        watch_timeout: float = 1800.0,
        service_cidr: str = "10.96.0.0/12",
        node_port_range: tuple[int, int] = (30000, 32767),
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.token = token
        # kubectl (client-go) only sends a bearer token over TLS: serve https when the
        # real kubectl must authenticate (see make_self_signed_cert).
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.bookmark_interval = bookmark_interval
        self.history_size = history_size
        self.watch_timeout = watch_timeout
        self.requests: deque[RequestRecord] = deque(maxlen=100000)

        self._lock = threading.RLock()
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {p: {} for p in KINDS}
        self._sorted: dict[str, list[JSON] | None] = {p: None for p in KINDS}
        # Serialized stored objects by resourceVersion (unique per write), so a list
        # page is mostly a join of cached bytes: cheap repeated relists by many clients.
        self._encoded: dict[str, bytes] = {}
        self._snapshots: OrderedDict[tuple[str, int], list[JSON]] = OrderedDict()
        self._history: deque[_Event] = deque()
        self._rv = 0
        # Every event with rv > _compacted_rv is still in _history.
        self._compacted_rv = 0

        self._service_net = ipaddress.ip_network(service_cidr)
        self._next_ip = 10  # leave the first addresses to well-known services
        self._ips_in_use: set[str] = set()
        self._node_port_range = node_port_range
        self._node_ports_in_use: set[int] = set()
        self._next_node_port = node_port_range[0]

        self._watches: set[_Watch] = set()
        self._wake_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

        self._error_fault: _Fault | None = None
        self._stall_fault: _Fault | None = None

        self._runner: web.AppRunner | None = None
        self._host: str | None = None
        self._port: int | None = None
        self._started_on_socket = False
        self._restart_task: asyncio.Task[None] | None = None

        self._reset_namespaces()

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._host is None or self._port is None:
            raise RuntimeError("server was never started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def running(self) -> bool:
        return self._runner is not None

    def _make_runner(self) -> web.AppRunner:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: an idle watch whose client went away ends at once.
        return web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def _attach_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake_event = asyncio.Event()

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen on host:port (port 0 picks a free one). Without arguments, listen again
        where the previous start did (a restart on the same port)."""
        if self._runner is not None:
            raise RuntimeError("already running")
        host = host if host is not None else (self._host or "127.0.0.1")
        port = port if port is not None else (self._port or 0)
        self._attach_loop()
        runner = self._make_runner()
        await runner.setup()
        site = web.TCPSite(
            runner,
            host,
            port,
            reuse_address=True,
            ssl_context=self._ssl_context(),
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._started_on_socket = False
        server = site._server  # aiohttp exposes the bound sockets only through it
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else port

    async def start_on_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening socket (e.g. one made inside a network
        namespace). `stop()` closes it; a later restart needs a fresh socket."""
        if self._runner is not None:
            raise RuntimeError("already running")
        self._attach_loop()
        runner = self._make_runner()
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=self._ssl_context())
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addr = sock.getsockname()
        self._host, self._port = addr[0], addr[1]
        self._started_on_socket = True

    async def stop(self, *, keep_data: bool = True) -> None:
        """Stop listening and cut every open connection. With keep_data=False all objects
        and the event history go away, so resuming clients get 410 and relist."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self.drop_watches(abrupt=True)
            await runner.cleanup()
        self._loop = None
        self._loop_thread = None
        if not keep_data:
            self.reset()

    async def restart(
        self, *, down_for: float = 0.0, keep_data: bool = True, sock: socket.socket | None = None
    ) -> None:
        """Stop, stay down for `down_for` seconds, and listen again on the same address
        (or on `sock`, required when the server was started on a socket)."""
        if self._started_on_socket and sock is None:
            raise RuntimeError("started on a socket: pass a fresh socket to restart()")
        await self.stop(keep_data=keep_data)
        if down_for > 0:
            await asyncio.sleep(down_for)
        if sock is not None:
            await self.start_on_socket(sock)
        else:
            await self.start()

    def reset(self) -> None:
        """Forget every object and the history. The resourceVersion keeps growing and
        everything before it is compacted, so a client resuming a watch gets 410."""
        with self._lock:
            for plural in KINDS:
                self._objects[plural] = {}
                self._sorted[plural] = None
            self._encoded.clear()
            self._ips_in_use.clear()
            self._node_ports_in_use.clear()
            self._rv += 1
            self._compact_locked()
            self._reset_namespaces()
        self._notify()

    def _reset_namespaces(self) -> None:
        for name in _DEFAULT_NAMESPACES:
            self.put_object("namespaces", {"metadata": {"name": name}})

    # ---- object helpers (any thread) -------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def put_object(self, kind: str, obj: JSON) -> JSON:
        """Create or replace an object (status included), as a controller would. The
        argument is copied; the stored object is returned."""
        info = kind_info(kind)
        with self._lock:
            stored = self._put_locked(info, obj)
        self._notify()
        return stored

    def _put_locked(self, info: KindInfo, obj: JSON) -> JSON:
        obj = _copy(obj)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ValueError("put_object needs metadata.name")
        namespace = (meta.get("namespace") or "default") if info.namespaced else ""
        old = self._objects[info.plural].get((namespace, name))
        if old is None:
            return self._create_locked(info, namespace, obj, keep_status=True)
        meta.pop("resourceVersion", None)
        return self._update_locked(info, old, obj, status_from="new")

    def put_objects(self, kind: str, objs: Iterable[JSON]) -> list[JSON]:
        """put_object for many objects at once (one lock, one wake-up for watchers)."""
        with self._lock:
            stored = [self._put_locked(kind_info(kind), obj) for obj in objs]
        self._notify()
        return stored

    def delete_object(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """Delete an object; returns its last state, or None when it did not exist."""
        info = kind_info(kind)
        ns = (namespace or "default") if info.namespaced else ""
        with self._lock:
            old = self._objects[info.plural].get((ns, name))
            if old is None:
                return None
            deleted = self._delete_locked(info, old)
        self._notify()
        return deleted

    def get_object(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        info = kind_info(kind)
        ns = (namespace or "default") if info.namespaced else ""
        with self._lock:
            return self._objects[info.plural].get((ns, name))

    def list_objects(self, kind: str, namespace: str | None = None) -> list[JSON]:
        """Objects of a kind in the server's stable order (namespace, name)."""
        info = kind_info(kind)
        with self._lock:
            items = self._sorted_locked(info.plural)
        if namespace is None:
            return list(items)
        return [o for o in items if o["metadata"].get("namespace") == namespace]

    # ---- faults ----------------------------------------------------------------------

    def fail_requests(
        self,
        count: int | None = None,
        *,
        duration: float | None = None,
        status: int = 500,
        retry_after: float | None = None,
        verbs: Iterable[str] | None = None,
    ) -> None:
        """Answer the next `count` API requests (or all for `duration` seconds; or both,
        whichever ends first; default one request) with `status` and a Status body.
        `verbs` limits it to e.g. {"list"} or {"watch"}."""
        if count is None and duration is None:
            count = 1
        self._error_fault = _Fault(
            remaining=count,
            until=None if duration is None else time.monotonic() + duration,
            verbs=frozenset(verbs) if verbs is not None else None,
            status=status,
            retry_after=retry_after,
        )

    def throttle(
        self,
        count: int | None = None,
        *,
        retry_after: float = 1.0,
        duration: float | None = None,
        verbs: Iterable[str] | None = None,
    ) -> None:
        """Answer with 429 TooManyRequests and `Retry-After`, like API priority and
        fairness does."""
        self.fail_requests(
            count, duration=duration, status=429, retry_after=retry_after, verbs=verbs
        )

    def stall(
        self,
        seconds: float,
        count: int | None = None,
        *,
        duration: float | None = None,
        verbs: Iterable[str] | None = None,
    ) -> None:
        """Delay matching requests by `seconds` before answering (until cleared, or for
        `count` requests / `duration` seconds)."""
        self._stall_fault = _Fault(
            remaining=count,
            until=None if duration is None else time.monotonic() + duration,
            verbs=frozenset(verbs) if verbs is not None else None,
            seconds=seconds,
        )

    def clear_faults(self) -> None:
        self._error_fault = None
        self._stall_fault = None

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch. Graceful ends the chunked stream properly (what a client
        sees when the server times a watch out); abrupt cuts the TCP connection."""
        watches = list(self._watches)
        for w in watches:
            w.dropped = True
            w.abrupt = abrupt
        self._notify()
        return len(watches)

    def compact(self) -> None:
        """Forget the event history up to now: a watch resuming from an older
        resourceVersion, or a list continue token issued before, gets 410 Expired."""
        with self._lock:
            self._compact_locked()
        self._notify()

    def _compact_locked(self) -> None:
        self._history.clear()
        self._compacted_rv = self._rv
        self._snapshots.clear()

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    async def wait_for_watches(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` watches are open."""
        deadline = time.monotonic() + timeout
        while len(self._watches) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._watches)} watches open, wanted {count}")
            await asyncio.sleep(0.01)

    def count_requests(
        self,
        verb: str | None = None,
        resource: str | None = None,
        where: Callable[[RequestRecord], bool] | None = None,
    ) -> int:
        plural = kind_info(resource).plural if resource else None
        return sum(
            1
            for r in list(self.requests)
            if (verb is None or r.verb == verb)
            and (plural is None or r.resource == plural)
            and (where is None or where(r))
        )

    # ---- write path (lock held) ------------------------------------------------------

    def _sorted_locked(self, plural: str) -> list[JSON]:
        items = self._sorted[plural]
        if items is None:
            objs = self._objects[plural]
            items = [objs[k] for k in sorted(objs)]
            self._sorted[plural] = items
        return items

    def _commit_locked(self, info: KindInfo, etype: str, obj: JSON, old: JSON | None) -> JSON:
        # kind and apiVersion first, as the real server prints them.
        obj = {"kind": info.kind, "apiVersion": info.api_version, **obj}
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if etype == "DELETED":
            self._objects[info.plural].pop(key, None)
        else:
            self._objects[info.plural][key] = obj
        if old is not None:
            self._encoded.pop(old["metadata"]["resourceVersion"], None)
        self._sorted[info.plural] = None
        if info.plural == "services":
            self._track_service(old, obj if etype != "DELETED" else None)
        if len(self._history) >= self.history_size:
            self._compacted_rv = self._history.popleft().rv
        self._history.append(_Event(self._rv, info.plural, etype, obj, old))
        return obj

    def _create_locked(
        self, info: KindInfo, namespace: str, obj: JSON, *, keep_status: bool
    ) -> JSON:
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise _invalid(info, "", "metadata.name: Required value: name or generateName")
            while True:
                name = prefix + "".join(random.choices(_GENERATE_CHARS, k=5))
                if (namespace, name) not in self._objects[info.plural]:
                    break
            meta["name"] = name
        name = meta["name"]
        if info.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            meta["namespace"] = namespace
            if ("", namespace) not in self._objects["namespaces"]:
                self._create_locked(
                    KINDS["namespaces"], "", {"metadata": {"name": namespace}}, keep_status=True
                )
        else:
            meta.pop("namespace", None)
        if (namespace, name) in self._objects[info.plural]:
            raise _already_exists(info, name)
        meta.pop("resourceVersion", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now_rfc3339()
        meta["generation"] = 1
        # Kubelets register Nodes with their status; other kinds start with none.
        if info.has_status and not keep_status and info.plural != "nodes":
            obj.pop("status", None)
        self._default(info, obj, None)
        return self._commit_locked(info, "ADDED", obj, None)

    def _update_locked(self, info: KindInfo, old: JSON, obj: JSON, *, status_from: str) -> JSON:
        """Replace `old` with `obj`. status_from: "new" (take obj's), "old" (main-resource
        write of a kind with a status subresource) or "status" (a .../status write: take
        only obj's status)."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        old_meta = old["metadata"]
        name = old_meta["name"]
        if meta.get("name") not in (None, name):
            raise _bad_request("the name of the object does not match the name on the URL")
        if info.namespaced and meta.get("namespace") not in (None, "", old_meta["namespace"]):
            raise _bad_request("the namespace of the object does not match the URL")
        rv = meta.get("resourceVersion")
        if rv not in (None, "") and rv != old_meta["resourceVersion"]:
            raise _conflict(info, name)
        if status_from == "status":
            new = _copy(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
            meta = new["metadata"]
        else:
            new = obj
            if status_from == "old":
                if "status" in old:
                    new["status"] = _copy(old["status"])
                else:
                    new.pop("status", None)
        meta["name"] = name
        if info.namespaced:
            meta["namespace"] = old_meta["namespace"]
        else:
            meta.pop("namespace", None)
        meta["uid"] = old_meta["uid"]
        meta["creationTimestamp"] = old_meta["creationTimestamp"]
        self._default(info, new, old)
        generation = old_meta.get("generation", 1)
        if _without(new, "metadata", "status", "kind", "apiVersion") != _without(
            old, "metadata", "status", "kind", "apiVersion"
        ):
            generation += 1
        meta["generation"] = generation
        return self._commit_locked(info, "MODIFIED", new, old)

    def _delete_locked(self, info: KindInfo, old: JSON) -> JSON:
        if info.plural == "namespaces":
            ns = old["metadata"]["name"]
            for other in KINDS.values():
                if other.namespaced:
                    for key in [k for k in self._objects[other.plural] if k[0] == ns]:
                        self._delete_locked(other, self._objects[other.plural][key])
        deleted = dict(old)
        deleted["metadata"] = dict(old["metadata"])
        return self._commit_locked(info, "DELETED", deleted, old)

    # ---- defaulting (what the real server's registry fills in) ------------------------

    def _default(self, info: KindInfo, obj: JSON, old: JSON | None) -> None:
        if info.plural == "services":
            try:
                self._default_service(obj, old)
            except (TypeError, KeyError, IndexError, AttributeError, ValueError):
                # Defaulting is best effort: a malformed object is stored as given, so
                # fuzz tests can deliver garbage to the proxies (the real server would
                # have rejected it; lbd must survive it anyway).
                pass
        elif info.plural == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
            labels = obj["metadata"].setdefault("labels", {})
            labels.setdefault("kubernetes.io/metadata.name", obj["metadata"]["name"])

    def _default_service(self, obj: JSON, old: JSON | None) -> None:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = obj["spec"] = {}
        old_spec = (old or {}).get("spec") or {}
        stype = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        ports = spec.get("ports") or []
        for port in ports:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])
        if stype == "ExternalName":
            return
        cluster_ip = spec.get("clusterIP") or old_spec.get("clusterIP")
        if not cluster_ip:
            cluster_ip = self._allocate_ip()
        spec["clusterIP"] = cluster_ip
        if not spec.get("clusterIPs") or spec["clusterIPs"][0] != cluster_ip:
            spec["clusterIPs"] = [cluster_ip] + [
                ip for ip in (spec.get("clusterIPs") or old_spec.get("clusterIPs") or [])[1:]
            ]
        if cluster_ip != "None":
            families = ["IPv6" if ":" in ip else "IPv4" for ip in spec["clusterIPs"]]
            spec.setdefault("ipFamilies", families)
        else:
            spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault(
            "ipFamilyPolicy", "SingleStack" if len(spec["ipFamilies"]) == 1 else "RequireDualStack"
        )
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if stype in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            if stype == "NodePort" or spec.get("allocateLoadBalancerNodePorts", True):
                old_ports = {
                    (p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                    for p in old_spec.get("ports") or []
                    if isinstance(p, dict)
                }
                for port in ports:
                    if isinstance(port, dict) and not port.get("nodePort"):
                        key = (port.get("port"), port.get("protocol"))
                        port["nodePort"] = old_ports.get(key) or self._allocate_node_port()
            if stype == "LoadBalancer":
                spec.setdefault("allocateLoadBalancerNodePorts", True)
                if spec["externalTrafficPolicy"] == "Local" and not spec.get("healthCheckNodePort"):
                    spec["healthCheckNodePort"] = (
                        old_spec.get("healthCheckNodePort") or self._allocate_node_port()
                    )
        obj.setdefault("status", {"loadBalancer": {}})

    def _allocate_ip(self) -> str:
        size = self._service_net.num_addresses
        for _ in range(size):
            offset = self._next_ip
            self._next_ip = self._next_ip + 1 if self._next_ip + 1 < size - 1 else 1
            ip = str(self._service_net.network_address + offset)
            if ip not in self._ips_in_use:
                return ip
        raise StatusError(500, "InternalError", "service IP range exhausted")

    def _allocate_node_port(self) -> int:
        low, high = self._node_port_range
        for _ in range(high - low + 1):
            port = self._next_node_port
            self._next_node_port = port + 1 if port < high else low
            if port not in self._node_ports_in_use:
                self._node_ports_in_use.add(port)
                return port
        raise StatusError(500, "InternalError", "node port range exhausted")

    def _track_service(self, old: JSON | None, new: JSON | None) -> None:
        for obj, used in ((old, False), (new, True)):
            if obj is None:
                continue
            spec = obj.get("spec")
            spec = spec if isinstance(spec, dict) else {}
            raw_ips, raw_ports = spec.get("clusterIPs"), spec.get("ports")
            # Fuzz tests store malformed services: track only what is well-formed.
            ips = [
                ip
                for ip in (raw_ips if isinstance(raw_ips, list) else [])
                if isinstance(ip, str) and ip and ip != "None"
            ]
            ports = [
                p.get("nodePort")
                for p in (raw_ports if isinstance(raw_ports, list) else [])
                if isinstance(p, dict)
            ]
            ports.append(spec.get("healthCheckNodePort"))
            ports = [p for p in ports if isinstance(p, int) and not isinstance(p, bool)]
            for ip in ips:
                (self._ips_in_use.add if used else self._ips_in_use.discard)(ip)
            for port in ports:
                if port:
                    (self._node_ports_in_use.add if used else self._node_ports_in_use.discard)(port)

    # ---- watch wake-ups --------------------------------------------------------------

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        # Each waiter holds the event that was current when it last looked at the
        # history; replacing it before setting means no wake-up can be missed.
        event = self._wake_event
        self._wake_event = asyncio.Event()
        if event is not None:
            event.set()

    # ---- HTTP ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.path.startswith("/_fault"):
                self._check_auth(request)
                return await self._handle_fault(request)
            route = _parse_route(request)
            self.requests.append(
                RequestRecord(
                    request.method,
                    request.path,
                    dict(request.query),
                    route.verb,
                    route.kind.plural if route.kind else None,
                )
            )
            if request.path not in _PUBLIC_PATHS:
                self._check_auth(request)
            await self._apply_faults(route.verb)
            return await self._dispatch(request, route)
        except StatusError as err:
            return err.response()
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            _log.exception("request failed: %s %s", request.method, request.path_qs)
            return StatusError(500, "InternalError", f"internal error: {exc!r}").response()

    def _check_auth(self, request: web.Request) -> None:
        if self.token is None:
            return
        if request.headers.get("Authorization", "") != f"Bearer {self.token}":
            raise StatusError(401, "Unauthorized", "Unauthorized")

    async def _apply_faults(self, verb: str) -> None:
        stall = self._stall_fault
        if stall is not None and stall.applies(verb):
            stall.take()
            await asyncio.sleep(stall.seconds)
        fault = self._error_fault
        if fault is not None and fault.applies(verb):
            fault.take()
            if fault.exhausted:
                self._error_fault = None
            headers = {}
            details: JSON | None = None
            if fault.retry_after is not None:
                headers["Retry-After"] = _format_retry_after(fault.retry_after)
                details = {"retryAfterSeconds": max(1, round(fault.retry_after))}
            if fault.status == 429:
                raise StatusError(
                    429,
                    "TooManyRequests",
                    "Too many requests, please try again later.",
                    details,
                    headers,
                )
            reason = {503: "ServiceUnavailable", 504: "Timeout"}.get(fault.status, "InternalError")
            raise StatusError(fault.status, reason, "injected fault", details, headers)

    async def _dispatch(self, request: web.Request, route: _Route) -> web.StreamResponse:
        if route.discovery == "health":
            return web.Response(text="ok")
        if route.discovery is not None:
            return _json_response(self._discovery(route.discovery))
        info = route.kind
        if info is None:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        if route.name is None:
            if method == "GET":
                filt = ObjectFilter(
                    route.namespace,
                    tuple(parse_label_selector(request.query.get("labelSelector"))),
                    tuple(parse_field_selector(request.query.get("fieldSelector"))),
                )
                if route.verb == "watch":
                    return await self._serve_watch(request, info, filt)
                return self._serve_list(request, info, filt)
            if method == "POST" and (route.namespace is not None or not info.namespaced):
                body = await _read_body(request)
                with self._lock:
                    created = self._create_locked(
                        info, route.namespace or "", body, keep_status=False
                    )
                self._notify()
                return _json_response(created, status=201)
            raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")
        ns = route.namespace or ""
        key = (ns, route.name)
        if method == "GET":
            with self._lock:
                obj = self._objects[info.plural].get(key)
            if obj is None:
                raise _not_found(info, route.name)
            if _wants_table(request):
                return _json_response(_table(info, [obj], {"resourceVersion": str(self._rv)}))
            return _json_response(obj)
        if method in ("PUT", "PATCH"):
            if route.subresource not in (None, "status"):
                raise StatusError(404, "NotFound", f"no subresource {route.subresource!r}")
            body = await _read_body(request) if method == "PUT" else await _read_raw(request)
            status_from = (
                "status" if route.subresource == "status" else ("old" if info.has_status else "new")
            )
            with self._lock:
                old = self._objects[info.plural].get(key)
                if old is None:
                    raise _not_found(info, route.name)
                if method == "PUT":
                    new = body
                else:
                    new = _apply_patch(request.headers.get("Content-Type", ""), _copy(old), body)
                    if not isinstance(new, dict):
                        raise _bad_request("the patch did not produce an object")
                    # The patched copy keeps the current resourceVersion unless the patch
                    # set one, which makes it a precondition (checked by the update).
                stored = self._update_locked(info, old, new, status_from=status_from)
            self._notify()
            return _json_response(stored)
        if method == "DELETE":
            with self._lock:
                old = self._objects[info.plural].get(key)
                if old is None:
                    raise _not_found(info, route.name)
                deleted = self._delete_locked(info, old)
            self._notify()
            return _json_response(deleted)
        raise StatusError(405, "MethodNotAllowed", f"{method} is not supported here")

    # ---- list ------------------------------------------------------------------------

    def _serve_list(self, request: web.Request, info: KindInfo, filt: ObjectFilter) -> web.Response:
        limit = _int_param(request, "limit", 0)
        token = request.query.get("continue")
        with self._lock:
            if token:
                rv, start = _decode_continue(token, info.plural)
                items = self._snapshots.get((info.plural, rv))
                if items is None or rv < self._compacted_rv:
                    raise _expired(
                        "the continue token is too old to give a consistent list; "
                        "start a new list without it"
                    )
                self._snapshots.move_to_end((info.plural, rv))
            else:
                rv = self._rv
                start = 0
                items = self._sorted_locked(info.plural)
                if limit > 0:
                    self._snapshots[(info.plural, rv)] = items
                    self._snapshots.move_to_end((info.plural, rv))
                    while len(self._snapshots) > 32:
                        self._snapshots.popitem(last=False)
        page, next_index = _page(items, start, limit, filt)
        meta: JSON = {"resourceVersion": str(rv)}
        if next_index is not None:
            meta["continue"] = _encode_continue(info.plural, rv, next_index)
            if not filt.by_content and filt.namespace is None:
                meta["remainingItemCount"] = len(items) - next_index
        if _wants_table(request):
            return _json_response(_table(info, page, meta))
        head = f'{{"kind":"{info.kind}List","apiVersion":"{info.api_version}","metadata":'
        body = b"".join(
            (
                head.encode(),
                _dumps(meta).encode(),
                b',"items":[',
                b",".join(self._encode(o) for o in page),
                b"]}",
            )
        )
        return web.Response(body=body, content_type="application/json")

    def _encode(self, obj: JSON) -> bytes:
        rv = obj["metadata"]["resourceVersion"]
        data = self._encoded.get(rv)
        if data is None:
            if len(self._encoded) > 100000:
                # Entries for versions replaced while a paginated list was running are
                # never popped by a commit; drop everything once in a while.
                self._encoded.clear()
            data = self._encoded[rv] = _dumps(obj).encode()
        return data

    # ---- watch -----------------------------------------------------------------------

    async def _serve_watch(
        self, request: web.Request, info: KindInfo, filt: ObjectFilter
    ) -> web.StreamResponse:
        rv_param = request.query.get("resourceVersion", "")
        try:
            cursor = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            raise _bad_request(f"invalid resourceVersion {rv_param!r}") from None
        timeout = float(_int_param(request, "timeoutSeconds", 0)) or self.watch_timeout
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        # `kubectl get -w` asks for each event's object as a one-row Table.
        table = _wants_table(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        watch = _Watch(info.plural, request)
        self._watches.add(watch)
        try:
            if cursor is None:
                with self._lock:
                    cursor = self._rv
                    current = [o for o in self._sorted_locked(info.plural) if filt(o)]
                if current:
                    await resp.write(
                        b"".join(
                            _event_line("ADDED", _table(info, [o], {}) if table else o)
                            for o in current
                        )
                    )
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                wake = self._wake_event
                expired: bytes | None = None
                events: list[_Event] = []
                with self._lock:
                    if cursor < self._compacted_rv:
                        expired = _event_line(
                            "ERROR",
                            StatusError(
                                410,
                                "Expired",
                                f"too old resource version: {cursor} ({self._compacted_rv})",
                            ).body(),
                        )
                    else:
                        for ev in reversed(self._history):
                            if ev.rv <= cursor:
                                break
                            events.append(ev)
                        events.reverse()
                        cursor = max(cursor, self._rv)
                if expired is not None:
                    await resp.write(expired)
                    break
                out = [line for ev in events if (line := _filtered_line(ev, info, filt, table))]
                if out:
                    await resp.write(b"".join(out))
                if watch.dropped:
                    break
                now = loop.time()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark:
                    bookmark = {
                        "kind": info.kind,
                        "apiVersion": info.api_version,
                        "metadata": {"resourceVersion": str(cursor)},
                    }
                    await resp.write(_event_line("BOOKMARK", bookmark))
                    next_bookmark = now + self.bookmark_interval
                until = min(deadline, next_bookmark) if bookmarks else deadline
                if wake is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), max(0.0, until - loop.time()))
                else:
                    await asyncio.sleep(max(0.0, until - loop.time()))
        except (ConnectionResetError, ConnectionError):
            return resp
        finally:
            self._watches.discard(watch)
        if watch.dropped and watch.abrupt:
            transport = request.transport
            if transport is not None:
                transport.abort()
            return resp
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    # ---- discovery -------------------------------------------------------------------

    def _discovery(self, which: str) -> Any:
        if which == "health":
            return "ok"
        if which.startswith("openapi"):
            return _openapi(which.partition(":")[2])
        if which == "version":
            return {
                "major": "1",
                "minor": "32",
                "gitVersion": "v1.32.0-lbd-test",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2024-12-11T00:00:00Z",
                "goVersion": "go1.23.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if which == "api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                ],
            }
        groups = sorted({k.group for k in KINDS.values() if k.group})
        if which == "apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_api_group(g) for g in groups],
            }
        if which.startswith("group:"):
            group = which.split(":", 1)[1]
            return {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group)}
        group_version = which.split(":", 1)[1]
        group = group_version.rpartition("/")[0] if "/" in group_version else ""
        resources: list[JSON] = []
        for info in sorted(KINDS.values(), key=lambda k: k.plural):
            if info.group != group:
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append(
                {
                    "name": info.plural,
                    "singularName": info.singular,
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": verbs,
                    "shortNames": list(info.short_names),
                }
            )
            if info.has_status:
                resources.append(
                    {
                        "name": f"{info.plural}/status",
                        "singularName": "",
                        "namespaced": info.namespaced,
                        "kind": info.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    # ---- HTTP fault control -----------------------------------------------------------

    async def _handle_fault(self, request: web.Request) -> web.Response:
        action = request.path[len("/_fault") :].strip("/")
        if request.method == "GET" and action == "stats":
            with self._lock:
                counts = {p: len(objs) for p, objs in self._objects.items()}
            verbs = Counter(r.verb for r in list(self.requests))
            return _json_response(
                {
                    "resourceVersion": str(self._rv),
                    "compactedResourceVersion": str(self._compacted_rv),
                    "watches": len(self._watches),
                    "objects": counts,
                    "requests": dict(verbs),
                }
            )
        if request.method != "POST":
            raise StatusError(405, "MethodNotAllowed", "use POST")
        args: JSON = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                args = json.loads(raw)
        if action == "errors":
            self.fail_requests(
                args.get("count"),
                duration=args.get("duration"),
                status=int(args.get("status", 500)),
                retry_after=args.get("retry_after"),
                verbs=args.get("verbs"),
            )
        elif action == "throttle":
            self.throttle(
                args.get("count"),
                retry_after=float(args.get("retry_after", 1.0)),
                duration=args.get("duration"),
                verbs=args.get("verbs"),
            )
        elif action == "stall":
            self.stall(
                float(args.get("seconds", 1.0)),
                args.get("count"),
                duration=args.get("duration"),
                verbs=args.get("verbs"),
            )
        elif action == "drop-watches":
            return _json_response({"dropped": self.drop_watches(abrupt=bool(args.get("abrupt")))})
        elif action == "compact":
            self.compact()
        elif action == "clear":
            self.clear_faults()
        elif action == "reset":
            self.reset()
        elif action == "restart":
            if self._started_on_socket:
                raise _bad_request("started on a socket: restart it from Python")
            down_for = float(args.get("down_for", 0.0))
            keep = bool(args.get("keep_data", True))
            # Answer first: the restart cuts this very connection.
            self._restart_task = asyncio.get_running_loop().create_task(
                self._delayed_restart(down_for, keep)
            )
        else:
            raise StatusError(404, "NotFound", f"no fault {action!r}")
        return _json_response({"ok": True})

    async def _delayed_restart(self, down_for: float, keep_data: bool) -> None:
        await asyncio.sleep(0.05)
        await self.restart(down_for=down_for, keep_data=keep_data)


# --------------------------------------------------------------------------------------
# Helpers for the HTTP layer


@dataclass
class _Route:
    verb: str
    kind: KindInfo | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    discovery: str | None = None


def _parse_route(request: web.Request) -> _Route:
    parts = [p for p in request.path.split("/") if p]
    if parts == ["version"]:
        return _Route("discovery", discovery="version")
    if len(parts) == 1 and parts[0] in ("healthz", "livez", "readyz"):
        return _Route("discovery", discovery="health")
    if parts == ["openapi", "v3"]:
        return _Route("discovery", discovery="openapi")
    if parts[:2] == ["openapi", "v3"]:
        return _Route("discovery", discovery="openapi:" + "/".join(parts[2:]))
    if parts == ["api"]:
        return _Route("discovery", discovery="api")
    if parts == ["apis"]:
        return _Route("discovery", discovery="apis")
    groups = {k.group for k in KINDS.values()}
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
        if not rest:
            return _Route("discovery", discovery="gv:v1")
    elif len(parts) >= 2 and parts[0] == "apis" and parts[1] in groups:
        if len(parts) == 2:
            return _Route("discovery", discovery=f"group:{parts[1]}")
        if parts[2] != "v1":
            return _Route("other")
        group, rest = parts[1], parts[3:]
        if not rest:
            return _Route("discovery", discovery=f"gv:{parts[1]}/v1")
    else:
        return _Route("other")

    def lookup(plural: str) -> KindInfo | None:
        info = KINDS.get(plural)
        return info if info is not None and info.group == group else None

    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (info := lookup(rest[2])) is not None:
        if not info.namespaced:
            return _Route("other")
        namespace, rest = rest[1], rest[2:]
    else:
        info = lookup(rest[0])
        if info is None:
            return _Route("other")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if len(rest) > 3 or (name is not None and info.namespaced and namespace is None):
        return _Route("other")
    method = request.method
    if name is None:
        if method == "GET":
            watch = request.query.get("watch", "").lower() in ("1", "true")
            verb = "watch" if watch else "list"
        else:
            verb = {"POST": "create", "DELETE": "deletecollection"}.get(method, "other")
    else:
        verb = {
            "GET": "get",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(method, "other")
    return _Route(verb, info, namespace, name, sub)


def _openapi(group_version: str) -> JSON:
    """Just enough OpenAPI v3 for kubectl: the index, and per group-version the PATCH
    operations that say they accept `fieldValidation`, so kubectl validates on the
    server instead of downloading schemas. No strategic-merge content type is listed, so
    kubectl apply computes its patches from its compiled-in types."""
    gvs = {("api/v1" if not k.group else f"apis/{k.api_version}"): k.group for k in KINDS.values()}
    if not group_version:
        return {
            "paths": {
                gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=lbd-test"} for gv in sorted(gvs)
            }
        }
    if group_version not in gvs:
        raise StatusError(404, "NotFound", "the server could not find the requested resource")
    group = gvs[group_version]
    paths: JSON = {}
    for info in KINDS.values():
        if info.group != group:
            continue
        prefix = f"/{group_version}"
        item = (
            f"{prefix}/namespaces/{{namespace}}/{info.plural}/{{name}}"
            if info.namespaced
            else f"{prefix}/{info.plural}/{{name}}"
        )
        paths[item] = {
            "patch": {
                "operationId": f"patch{info.kind}",
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                ],
                "requestBody": {"content": {"application/merge-patch+json": {"schema": {}}}},
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {
                    "group": info.group,
                    "version": info.version,
                    "kind": info.kind,
                },
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "lbd test apiserver", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return "<unknown>"
    secs = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= 2 * size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _service_cells(obj: JSON) -> list[Any]:
    spec = obj.get("spec") or {}
    stype = spec.get("type", "ClusterIP")
    external = [i.get("ip") or i.get("hostname") for i in _ingress(obj)]
    external += spec.get("externalIPs") or []
    if stype == "ExternalName":
        ext = spec.get("externalName", "<none>")
    elif external:
        ext = ",".join(e for e in external if e)
    else:
        ext = "<pending>" if stype == "LoadBalancer" else "<none>"
    ports = []
    for p in spec.get("ports") or []:
        node_port = f":{p['nodePort']}" if p.get("nodePort") else ""
        ports.append(f"{p.get('port')}{node_port}/{p.get('protocol', 'TCP')}")
    selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items())
    return [
        stype,
        spec.get("clusterIP") or "<none>",
        ext,
        ",".join(ports) or "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        selector or "<none>",
    ]


def _ingress(obj: JSON) -> list[JSON]:
    return ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []


def _slice_cells(obj: JSON) -> list[Any]:
    ports = [str(p.get("port", "<unset>")) for p in obj.get("ports") or []]
    addresses = [a for e in obj.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addresses[:3]) + (
        f" + {len(addresses) - 3} more..." if len(addresses) > 3 else ""
    )
    return [
        obj.get("addressType", ""),
        ",".join(ports) or "<unset>",
        shown or "<unset>",
        _age(obj["metadata"].get("creationTimestamp")),
    ]


def _node_cells(obj: JSON) -> list[Any]:
    status = obj.get("status") or {}
    ready = next(
        (c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
        None,
    )
    state = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    labels = obj["metadata"].get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/"))
    return [
        state,
        ",".join(roles) or "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        (status.get("nodeInfo") or {}).get("kubeletVersion", ""),
    ]


def _namespace_cells(obj: JSON) -> list[Any]:
    return [
        (obj.get("status") or {}).get("phase", "Active"),
        _age(obj["metadata"].get("creationTimestamp")),
    ]


_TABLE_COLUMNS: dict[str, tuple[list[str], Callable[[JSON], list[Any]]]] = {
    "services": (
        ["Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"],
        _service_cells,
    ),
    "endpointslices": (["AddressType", "Ports", "Endpoints", "Age"], _slice_cells),
    "nodes": (["Status", "Roles", "Age", "Version"], _node_cells),
    "namespaces": (["Status", "Age"], _namespace_cells),
}


def _table(info: KindInfo, objs: list[JSON], meta: JSON) -> JSON:
    """The meta.k8s.io/v1 Table kubectl prints for `kubectl get` (its columns follow the
    real server's printers for these kinds)."""
    names, cells = _TABLE_COLUMNS[info.plural]
    columns = [
        {"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}
    ]
    for name in names:
        columns.append(
            {
                "name": name,
                "type": "string",
                "format": "",
                "description": "",
                "priority": 1 if name == "Selector" else 0,
            }
        )
    rows = [
        {
            "cells": [o["metadata"]["name"], *cells(o)],
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            },
        }
        for o in objs
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns,
        "rows": rows,
    }


def _api_group(group: str) -> JSON:
    gv = {"groupVersion": f"{group}/v1", "version": "v1"}
    return {"name": group, "versions": [gv], "preferredVersion": gv}


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=_dumps(body), content_type="application/json")


def _event_line(etype: str, obj: JSON) -> bytes:
    return (_dumps({"type": etype, "object": obj}) + "\n").encode()


def _filtered_line(
    ev: _Event, info: KindInfo, filt: ObjectFilter, table: bool = False
) -> bytes | None:
    if ev.plural != info.plural:
        return None
    etype: str | None
    if not filt.by_content or ev.type != "MODIFIED":
        etype = ev.type if filt(ev.obj) else None
    else:
        # Selectors: an update that moves an object into or out of the selection is
        # seen as ADDED or DELETED by this watcher, as with the real server.
        now = filt(ev.obj)
        before = ev.old is not None and filt(ev.old)
        etype = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
    if etype is None:
        return None
    if table:
        return _event_line(etype, _table(info, [ev.obj], {"resourceVersion": str(ev.rv)}))
    return ev.encoded() if etype == ev.type else _event_line(etype, ev.obj)


def _page(
    items: list[JSON], start: int, limit: int, filt: ObjectFilter
) -> tuple[list[JSON], int | None]:
    page: list[JSON] = []
    n = len(items)
    i = start
    namespace = filt.namespace
    plain = not filt.by_content
    while i < n:
        obj = items[i]
        if (plain and (namespace is None or obj["metadata"].get("namespace") == namespace)) or (
            not plain and filt(obj)
        ):
            if limit > 0 and len(page) >= limit:
                return page, i
            page.append(obj)
        i += 1
    return page, None


def _encode_continue(plural: str, rv: int, index: int) -> str:
    raw = _dumps({"p": plural, "rv": rv, "i": index}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str, plural: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["p"] != plural:
            raise ValueError("wrong resource")
        return int(data["rv"]), int(data["i"])
    except (ValueError, KeyError, TypeError):
        raise _bad_request("invalid continue token") from None


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise _bad_request(f"invalid {name}: {raw!r}") from None


async def _read_raw(request: web.Request) -> Any:
    raw = await request.read()
    ctype = request.headers.get("Content-Type", "")
    try:
        if "yaml" in ctype:
            return yaml.safe_load(raw)
        return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise _bad_request(f"cannot decode request body: {exc}") from None


async def _read_body(request: web.Request) -> JSON:
    body = await _read_raw(request)
    if not isinstance(body, dict):
        raise _bad_request("the request body must be an object")
    return body


def _apply_patch(content_type: str, target: JSON, patch: Any) -> Any:
    ctype = content_type.split(";", 1)[0].strip()
    if ctype == "application/merge-patch+json":
        return json_merge_patch(target, patch)
    if ctype == "application/strategic-merge-patch+json":
        return strategic_merge_patch(target, patch)
    if ctype == "application/json-patch+json":
        return json_patch(target, patch)
    raise StatusError(
        415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
    )


# --------------------------------------------------------------------------------------
# Running it in a thread (for synchronous tests and subprocess-free scripts)


class ThreadedApiServer:
    """An ApiServer running on its own event loop in a daemon thread.

    `with ThreadedApiServer(token="t") as srv: srv.server.put_object(...)`; use
    `srv.call(coro_fn)` to run a coroutine (e.g. `server.restart`) on the server's loop.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.server = ApiServer(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, fn: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        async def run() -> Any:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> ThreadedApiServer:
        self._thread.start()
        self.call(lambda: self.server.start(host, port))
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.call(self.server.stop)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ThreadedApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_self_signed_cert(
    directory: str, hosts: Iterable[str] = ("127.0.0.1", "localhost")
) -> tuple[str, str]:
    """Write a self-signed certificate (usable as its own CA) and key for `hosts` into
    `directory` with the openssl CLI; returns (cert_path, key_path)."""
    cert = f"{directory}/apiserver.crt"
    key = f"{directory}/apiserver.key"
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "365",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", key, "-out", cert,
            "-subj", "/CN=lbd-test-apiserver",
            "-addext", f"subjectAltName={sans}",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Command line


def load_objects(path: str) -> Iterator[JSON]:
    """Objects from a YAML or JSON file (several documents and `kind: List` allowed)."""
    with open(path) as fh:
        for doc in yaml.safe_load_all(fh):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind", "").endswith("List") and "items" in doc:
                yield from doc["items"]
            else:
                yield doc


def _parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def _serve_forever(args: argparse.Namespace) -> None:
    server = ApiServer(
        token=args.token,
        bookmark_interval=args.bookmark_interval,
        history_size=args.history_size,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    for path in args.seed:
        for obj in load_objects(path):
            server.put_object(obj["kind"], obj)
    host, port = _parse_listen(args.listen)
    await server.start(host, port)
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lbd.testing.apiserver", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--listen", default="127.0.0.1:6443", help="host:port (port 0 = any)")
    parser.add_argument("--token", default=None, help="require this bearer token")
    parser.add_argument("--bookmark-interval", type=float, default=5.0)
    parser.add_argument("--history-size", type=int, default=10000)
    parser.add_argument("--tls-cert", default=None, help="serve https with this cert")
    parser.add_argument("--tls-key", default=None)
    parser.add_argument(
        "--seed", action="append", default=[], help="YAML/JSON file of objects to load"
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()


if __name__ == "__main__":
    main()
