"""The daemon's state follows the API through changes and API-server faults.

The daemon runs as a real process; its /state endpoint (what the datapath was last
programmed with) must equal the state built from what the API server holds, after
create/update/delete, an API-server restart, a compacted history (410 → relist) and
dropped watches. While the API server is down, traffic keeps flowing.
"""

from __future__ import annotations

import json
import time

import pytest

from lbd.model.build import ModelConfig, build_state, parse_node
from lbd.model.state import state_to_json
from lbd.testing.env import CLUSTER_CIDRS, METRICS_PORT, LbdEnv, eventually, http_get
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service
from lbd.testing.traffic import SteadyTraffic

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

HTTP = PortSpec(80, 8080, "TCP", "http")


@pytest.fixture(scope="module")
def env():
    with LbdEnv("iptables") as e:
        yield e


def expected(env: LbdEnv, node: str) -> dict:
    server = env.api.server
    cfg = ModelConfig(node, cluster_cidrs=tuple(CLUSTER_CIDRS.split(",")))
    state, _ = build_state(
        server.list_objects("services"),
        server.list_objects("endpointslices"),
        parse_node(server.get_object("nodes", None, node), node),
        cfg,
    )
    return state_to_json(state)


def daemon_state(env: LbdEnv, node: str) -> dict:
    status, body = http_get(env.cluster.netns_of(node), "127.0.0.1", METRICS_PORT, "/state")
    assert status == 200, body
    return json.loads(body)


def assert_converged(env: LbdEnv, timeout: float = 15.0) -> None:
    def check() -> None:
        for n in env.cluster.nodes:
            assert daemon_state(env, n.name) == expected(env, n.name), n.name

    eventually(check, timeout)


def add(env: LbdEnv, i: int, pods: list[str] | None = None) -> None:
    chosen = [p for p in env.cluster.pods if pods is None or p.name in pods]
    env.apply(service(f"s{i}", [f"10.96.50.{i}"], [HTTP]))
    env.apply(endpoint_slice(f"s{i}", [EndpointSpec(p.ipv4, p.node) for p in chosen], [HTTP]))


def test_state_follows_create_update_delete(env):
    for i in range(1, 6):
        add(env, i)
    assert_converged(env)
    env.apply(service("s1", ["10.96.50.1"], [PortSpec(81, 8080, "TCP", "http")]))
    add(env, 2, ["pod-1-1"])
    env.delete("Service", "s3")
    env.delete("EndpointSlice", "s4-v4")
    assert_converged(env)
    assert len(daemon_state(env, "node-1")["servicePorts"]) == 4


def test_api_server_down_keeps_datapath_and_restart_converges(env):
    add(env, 10)
    assert_converged(env)
    ns = env.cluster.pod("pod-1-1").netns
    with SteadyTraffic(ns, "10.96.50.10", 80, rate=20) as traffic:
        env.api.stop()
        time.sleep(3)
        # written while the API server is unreachable: seen after it comes back
        add(env, 11)
        env.delete("Service", "s5")
        env.api.start()
        assert_converged(env)
    assert traffic.failures == [] and len(traffic.successes) > 40, traffic.summary()


def test_compacted_history_forces_a_relist_that_drops_deleted_objects(env):
    add(env, 20)
    add(env, 21)
    assert_converged(env)
    env.api.stop()
    env.delete("Service", "s20")
    env.delete("EndpointSlice", "s20-v4")
    add(env, 22)
    env.api.server.compact()  # resuming watches now get 410 Gone
    env.api.start()
    assert_converged(env)
    names = {sp["service"] for sp in daemon_state(env, "node-2")["servicePorts"]}
    assert "default/s20:http" not in names and "default/s22:http" in names


def test_dropped_watches_lose_no_event(env):
    for round_ in range(5):
        add(env, 30 + round_)
        env.api.server.drop_watches(abrupt=round_ % 2 == 0)
        if round_:
            env.delete("Service", f"s{30 + round_ - 1}")
    assert_converged(env)
