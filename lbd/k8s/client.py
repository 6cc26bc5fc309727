"""A thin asyncio client for the Kubernetes API that speaks raw JSON.

It owns the connection to the API server: loading a kubeconfig or the in-cluster
settings (through kubernetes_asyncio.config, so exec plugins, client certificates and
token rotation keep working), the aiohttp session, and the two calls a reflector needs,
list and watch, returning plain dicts. The generated models are deliberately not used:
they are far too slow to deserialize at 10,000 objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

JSON = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Resource:
    """One API resource type, described well enough to build its URLs."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def collection_path(self, namespace: str | None = None) -> str:
        """The list/watch URL path; all namespaces when `namespace` is None."""
        if namespace is not None and self.namespaced:
            return f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        return f"{self.prefix}/{self.plural}"

    def item_path(self, namespace: str | None, name: str) -> str:
        return f"{self.collection_path(namespace)}/{name}"


SERVICES = Resource("Service", "", "v1", "services", True)
ENDPOINTSLICES = Resource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True)
NODES = Resource("Node", "", "v1", "nodes", False)


class ApiError(Exception):
    """An HTTP error from the API server (or a watch ERROR event)."""

    def __init__(
        self,
        status: int,
        reason: str = "",
        retry_after: float | None = None,
        message: str = "",
        body: JSON | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.message = message
        self.body = body

    @classmethod
    def from_status(
        cls, status: JSON, http_status: int | None = None, retry_after: float | None = None
    ) -> ApiError:
        """Build from a `kind: Status` body."""
        code = status.get("code") or http_status or 500
        details = status.get("details") or {}
        if retry_after is None and details.get("retryAfterSeconds"):
            retry_after = float(details["retryAfterSeconds"])
        return cls(
            int(code),
            str(status.get("reason") or ""),
            retry_after,
            str(status.get("message") or ""),
            status,
        )

    @property
    def expired(self) -> bool:
        """410 Gone: the resourceVersion or continue token is no longer served."""
        return self.status == 410


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; the API server never sends one


class ApiClient:
    """Raw-JSON access to one API server.

    Build it with `ApiClient(url, token=...)` (tests), `await ApiClient.from_kubeconfig(
    path)` or `await ApiClient.from_in_cluster()`; `await client.close()` when done (or
    use `async with`). The aiohttp session is created lazily inside the running loop.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        configuration: Any = None,
        user_agent: str = "lbd",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        # A kubernetes_asyncio Configuration whose token can rotate (in-cluster token
        # files, exec plugins); consulted before every request when present.
        self._configuration = configuration
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._refresh_task: asyncio.Task[None] | None = None

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, token: str | None = None, **kwargs: Any) -> ApiClient:
        return cls(url, token=token, **kwargs)

    @classmethod
    async def from_kubeconfig(
        cls, path: str | None = None, *, context: str | None = None, **kwargs: Any
    ) -> ApiClient:
        """Load a kubeconfig (default: $KUBECONFIG or ~/.kube/config)."""
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.client import Configuration

        cfg = Configuration()
        loader = await kconfig.load_kube_config(
            config_file=path, context=context, client_configuration=cfg, persist_config=False
        )
        client = cls._from_configuration(cfg, **kwargs)
        # Exec-plugin and GCP tokens expire; kubernetes_asyncio refreshes them in a loop
        # (the coroutine returns at once for other kinds of credentials).
        client._refresh_task = asyncio.get_running_loop().create_task(
            kconfig.kube_config.refresh_token(loader, cfg)
        )
        return client

    @classmethod
    async def from_in_cluster(cls, **kwargs: Any) -> ApiClient:
        """Use the pod's service account (token file re-read as it rotates)."""
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.client import Configuration

        cfg = Configuration()
        kconfig.load_incluster_config(client_configuration=cfg)
        return cls._from_configuration(cfg, **kwargs)

    @classmethod
    async def from_config(cls, kubeconfig: str | None = None, **kwargs: Any) -> ApiClient:
        """The kubeconfig when given, else in-cluster settings when running in a pod,
        else the default kubeconfig."""
        import os

        if kubeconfig:
            return await cls.from_kubeconfig(kubeconfig, **kwargs)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return await cls.from_in_cluster(**kwargs)
        return await cls.from_kubeconfig(None, **kwargs)

    @classmethod
    def _from_configuration(cls, cfg: Any, **kwargs: Any) -> ApiClient:
        host: str = cfg.host
        ctx: ssl.SSLContext | None = None
        if urlsplit(host).scheme == "https":
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
            if not cfg.verify_ssl:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        return cls(
            host,
            ssl_context=ctx,
            server_hostname=getattr(cfg, "tls_server_name", None) or None,
            configuration=cfg,
            **kwargs,
        )

    # ---- plumbing --------------------------------------------------------------------

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
            self._refresh_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        auth: str | None = None
        if self._configuration is not None:
            auth = await self._configuration.get_api_key_with_prefix("BearerToken")
        elif self._token:
            auth = f"Bearer {self._token}"
        if auth:
            headers["Authorization"] = auth
        return headers

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        raw = await resp.read()
        retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("kind") == "Status":
            raise ApiError.from_status(body, resp.status, retry_after)
        raise ApiError(
            resp.status,
            resp.reason or "",
            retry_after,
            raw[:200].decode(errors="replace"),
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One request; returns the parsed JSON body. Raises ApiError on HTTP errors."""
        headers = await self._headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        client_timeout = aiohttp.ClientTimeout(
            total=timeout or self.request_timeout, sock_connect=self.connect_timeout
        )
        async with self._get_session().request(
            method,
            self.base_url + path,
            params=params,
            data=data,
            headers=headers,
            timeout=client_timeout,
            server_hostname=self._server_hostname,
        ) as resp:
            await self._raise_for_status(resp)
            raw = await resp.read()
        return loads_without_gc(raw) if raw else None

    # ---- the calls a reflector makes -------------------------------------------------

    async def list(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_: str | None = None,
        resource_version: str | None = None,
    ) -> JSON:
        """One page of a list (the raw `...List` dict, items included)."""
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        if limit:
            params["limit"] = str(limit)
        if continue_:
            params["continue"] = continue_
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        result = await self.request("GET", resource.collection_path(namespace), params=params)
        if not isinstance(result, dict):
            raise ValueError(f"list of {resource.plural} returned {type(result).__name__}")
        return result

    async def get(self, resource: Resource, namespace: str | None, name: str) -> JSON:
        result = await self.request("GET", resource.item_path(namespace, name))
        if not isinstance(result, dict):
            raise ValueError(f"get of {resource.plural} returned {type(result).__name__}")
        return result

    async def watch(
        self,
        resource: Resource,
        *,
        resource_version: str | None,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int | None = None,
        allow_bookmarks: bool = True,
        read_timeout: float | None = 300.0,
    ) -> AsyncIterator[JSON]:
        """Yield watch events ({"type": ..., "object": {...}}) until the server ends the
        stream. ERROR events are yielded like the others; the caller decides.

        The connection is bounded twice: `read_timeout` (no byte for that long means a
        half-dead connection) and a total deadline a little past `timeout_seconds`.
        Malformed JSON raises ValueError.
        """
        params: dict[str, str] = {"watch": "true"}
        if resource_version:
            params["resourceVersion"] = resource_version
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        if timeout_seconds:
            params["timeoutSeconds"] = str(int(timeout_seconds))
        if allow_bookmarks:
            params["allowWatchBookmarks"] = "true"
        headers = await self._headers()
        client_timeout = aiohttp.ClientTimeout(
            total=(timeout_seconds + 30.0) if timeout_seconds else None,
            sock_connect=self.connect_timeout,
            sock_read=read_timeout,
        )
        async with self._get_session().get(
            self.base_url + resource.collection_path(namespace),
            params=params,
            headers=headers,
            timeout=client_timeout,
            server_hostname=self._server_hostname,
        ) as resp:
            await self._raise_for_status(resp)
            # One object can be larger than any sane line limit (an EndpointSlice with
            # 1,000 endpoints), so split the stream ourselves instead of readline().
            pending: list[bytes] = []
            async for chunk in resp.content.iter_any():
                pending.append(chunk)
                if b"\n" not in chunk:
                    continue
                lines = b"".join(pending).split(b"\n")
                rest = lines.pop()
                pending = [rest] if rest else []
                for line in lines:
                    if line.strip():
                        yield _parse_event(line)
            tail = b"".join(pending)
            if tail.strip():
                yield _parse_event(tail)


def loads_without_gc(raw: bytes) -> Any:
    """json.loads with the cyclic GC paused: a 500-object list page is ~10^5 new
    containers, which would otherwise trigger collections that scan the whole heap."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    finally:
        if was_enabled:
            gc.enable()


def _parse_event(line: bytes) -> JSON:
    event = json.loads(line)
    if not isinstance(event, dict) or "type" not in event:
        raise ValueError(f"not a watch event: {line[:200]!r}")
    return event
