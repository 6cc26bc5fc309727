"""The node's HTTP surfaces: /healthz + /livez, /metrics + /proxyMode, and the per-service
health-check node ports that cloud load balancers probe for externalTrafficPolicy: Local.

All handlers are read-only (GET/HEAD); anything else is answered 405 by aiohttp's router.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lbd.model.state import ProxyState, state_to_json
from lbd.sync import SyncStatus

log = structlog.get_logger()


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def _hide_server_version(_: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would announce "Python/x.y aiohttp/x.y.z" on every response, also on the
    # health-check node ports anyone can reach; kube-proxy announces nothing.
    response.headers["Server"] = "lbd"


def _application() -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_hide_server_version)
    return app


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def start_site(app: web.Application, address: str) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_host_port(address)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


def healthz_app(status: SyncStatus, health_timeout: float) -> web.Application:
    """kube-proxy's healthz: 200 while the datapath is recent enough, else 503."""

    async def healthz(_: web.Request) -> web.Response:
        now = time.monotonic()
        healthy = status.syncs > 0 and (
            # A change queued but not programmed for too long makes the node unhealthy,
            # and so does a sync loop that stopped running altogether.
            (status.last_queued == 0.0 or now - status.last_queued < health_timeout)
            and now - status.last_success < health_timeout
        )
        body = {
            "lastUpdated": _rfc3339(status.last_success_wall) if status.syncs else "",
            "currentTime": _rfc3339(time.time()),
            "nodeEligible": True,
        }
        return web.json_response(body, status=200 if healthy else 503)

    app = _application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    return app


def metrics_app(mode: str, status: SyncStatus | None = None) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def proxy_mode(_: web.Request) -> web.Response:
        return web.Response(text=mode)

    # /state's body for the state last programmed, built once per state. Encoding 2,000
    # service ports takes seconds of the event loop's (and the GIL's) time under the IPVS
    # VM's emulation; tests poll /state every 0.25 s while a restarted daemon converges,
    # with a 2 s timeout, so an encoding per request starved the daemon's syncs and was
    # abandoned by its client before it was done, again and again (a kill -9 restart took
    # 229 s to be seen converged whose first sync was done after 52 s).
    cached: list[tuple[ProxyState, bytes]] = []

    async def state(_: web.Request) -> web.Response:
        # What the datapath was last programmed with (not what the API holds now).
        synced = status.state if status is not None else None
        if synced is None:
            return web.json_response({"error": "not synced yet"}, status=503)
        if not cached or (cached[0][0] is not synced and cached[0][0] != synced):
            # (An equal state, as a periodic full sync builds, compares in a few identity
            # checks: the builder keeps the ServicePort objects that did not change.)
            cached[:] = [(synced, json.dumps(state_to_json(synced)).encode())]
        return web.Response(body=cached[0][1], content_type="application/json")

    app = _application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/proxyMode", proxy_mode)
    app.router.add_get("/state", state)
    return app


def local_endpoint_counts(state: ProxyState) -> dict[tuple[str, str, int], int]:
    """(namespace, name, healthCheckNodePort) → local endpoints, for ETP Local services."""
    counts: dict[tuple[str, str, int], set[str]] = {}
    for sp in state.ports():
        if sp.external_policy_local and sp.health_check_node_port:
            key = (sp.name.namespace, sp.name.name, sp.health_check_node_port)
            counts.setdefault(key, set()).update(ep.ip for ep in sp.local_endpoints)
    return {k: len(v) for k, v in counts.items()}


class HealthCheckServers:
    """One HTTP server per healthCheckNodePort, answering as kube-proxy's do."""

    def __init__(self, addresses: Callable[[], list[str]]) -> None:
        self._addresses = addresses  # hosts to bind (node port addresses)
        self._counts: dict[tuple[str, str], int] = {}
        self._runners: dict[tuple[str, str, int], web.AppRunner] = {}

    def _app(self, namespace: str, name: str) -> web.Application:
        async def handle(_: web.Request) -> web.Response:
            n = self._counts.get((namespace, name), 0)
            body = {
                "service": {"namespace": namespace, "name": name},
                "localEndpoints": n,
                "serviceProxyHealthy": True,
            }
            return web.Response(
                text=json.dumps(body),
                status=200 if n > 0 else 503,
                content_type="application/json",
                headers={
                    "X-Content-Type-Options": "nosniff",
                    "X-Load-Balancing-Endpoint-Weight": str(n),
                },
            )

        app = _application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    async def update(self, state: ProxyState) -> None:
        wanted = local_endpoint_counts(state)
        self._counts = {(ns, name): n for (ns, name, _), n in wanted.items()}
        for key in [k for k in self._runners if k not in wanted]:
            await self._runners.pop(key).cleanup()
        for key in wanted:
            if key in self._runners:
                continue
            ns, name, port = key
            runner = web.AppRunner(self._app(ns, name), access_log=None)
            await runner.setup()
            try:
                for host in self._addresses():
                    await web.TCPSite(runner, host, port, reuse_address=True).start()
            except OSError as err:
                # Another service (or process) holds the port: report, keep the others.
                log.error(
                    "healthcheck.bind_failed", service=f"{ns}/{name}", port=port, error=str(err)
                )
                await runner.cleanup()
                continue
            self._runners[key] = runner

    async def close(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()
