"""Property: whatever garbage arrives beside them, valid services are built unchanged."""

from __future__ import annotations

import copy
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbd.model.build import ModelConfig, NodeInfo, build_state
from lbd.model.state import IPFamily, ProxyState
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service

NODE = NodeInfo("node-1")
CFG = ModelConfig("node-1", cluster_cidrs=("10.244.0.0/16",))

GOOD_SVC = service("good", ["10.96.0.10"], [PortSpec(80, 8080, name="http")], type="NodePort")
GOOD_SLICE = endpoint_slice(
    "good", [EndpointSpec("10.244.1.10", "node-1")], [PortSpec(80, 8080, name="http")]
)
EXPECTED, _ = build_state([GOOD_SVC], [GOOD_SLICE], NODE, CFG)

# JSON-like values, including the hostile strings an attacker would try.
hostile_text = st.sampled_from(
    [
        "",
        "\n-A INPUT -j ACCEPT",
        '"',
        "a" * 5000,
        "\x00",
        "10.0.0.1\n",
        "::",
        "-j",
        "ALL",
        "1.2.3.4/99",
        "TCP ",
        "None",
        "0",
        "65536",
        "-1",
    ]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | hostile_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)


def mutate(obj: dict[str, Any], data: st.DataObject) -> Any:
    """Replace one field somewhere in the object with an arbitrary JSON value."""
    out = copy.deepcopy(obj)
    node: Any = out
    for _ in range(data.draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], dict | list) or not node[key]:
                break
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[data.draw(st.integers(0, len(node) - 1))]
            if not isinstance(node, dict | list):
                break
    value = data.draw(json_values)
    if isinstance(node, dict):
        node[data.draw(st.sampled_from(sorted(node) or ["x"]) | st.text(max_size=8))] = value
    elif isinstance(node, list) and node:
        node[data.draw(st.integers(0, len(node) - 1))] = value
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_malformed_objects_never_crash_the_build_nor_touch_valid_services(data):
    bad_svc = mutate(service("bad", ["10.96.0.11"], [PortSpec(80, 8080, name="http")]), data)
    if isinstance(bad_svc, dict) and isinstance(bad_svc.get("metadata"), dict):
        bad_svc["metadata"]["name"] = data.draw(st.sampled_from(["bad", "good-2"]) | hostile_text)
    bad_slice = mutate(
        endpoint_slice(
            "bad", [EndpointSpec("10.244.1.11", "node-1")], [PortSpec(80, 8080, name="http")]
        ),
        data,
    )
    extra = data.draw(st.lists(json_values, max_size=2))
    services = [GOOD_SVC, bad_svc, *extra]
    slices = [bad_slice, GOOD_SLICE, *extra]
    state, rejected = build_state(services, slices, NODE, CFG)  # must not raise
    good = {k: v for k, v in state.service_ports.items() if k[0].name == "good"}
    assert good == dict(EXPECTED.service_ports)
    for r in rejected:
        assert r.reason and "\n" not in r.ref and "\x00" not in r.ref
    assert_endpoint_contract(state)


def assert_endpoint_contract(state: ProxyState) -> None:
    """What the backends build on without checking again (ServicePort's endpoints):
    canonical addresses of the port's family, valid ports, one per ip:port, sorted."""
    for sp in state.service_ports.values():
        af = socket.AF_INET6 if sp.family == IPFamily.V6 else socket.AF_INET
        for endpoints in (sp.cluster_endpoints, sp.local_endpoints, sp.all_endpoints):
            keys = [(ep.ip, ep.port) for ep in endpoints]
            assert keys == sorted(set(keys)), sp
            for ep in endpoints:
                assert socket.inet_ntop(af, socket.inet_pton(af, ep.ip)) == ep.ip, ep
                assert 0 < ep.port < 65536, ep
