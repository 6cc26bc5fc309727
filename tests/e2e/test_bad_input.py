"""Hostile and malformed objects reach a running daemon: it rejects each with a reason,
keeps running, keeps every valid service working, and writes no rule outside its own
chains."""

from __future__ import annotations

import copy
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import HostUnsupported
from backends.registry import check_host
from lbd.testing.env import LbdEnv
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service
from lbd.testing.traffic import tcp_request

pytestmark = [pytest.mark.e2e, pytest.mark.kernel, pytest.mark.reliability]

HTTP = PortSpec(80, 8080, "TCP", "http")
GOOD_VIP = "10.96.9.9"

HOSTILE = [
    'x"\n-A PREROUTING -j ACCEPT',
    "-A INPUT -j DROP",
    "a\x00b",
    "COMMIT",
    "x" * 300,
    "'; rm -rf /",
    "lbd-$(reboot)",
    "\n*filter\n:INPUT DROP",
]


def corpus() -> list[dict]:
    base = service("bad", ["10.96.9.10"], [HTTP])
    out: list[dict] = []

    def svc(mutator) -> dict:
        obj = copy.deepcopy(base)
        mutator(obj)
        return obj

    for i, text in enumerate(HOSTILE):
        out.append(svc(lambda o, t=text: o["spec"]["ports"][0].update(name=t)))
        out.append(svc(lambda o, t=text: o["metadata"]["labels"].update(app=t)))
        sl = endpoint_slice(
            "bad", [EndpointSpec("10.244.1.11", "node-1")], [HTTP], name=f"bad-hostile-{i}"
        )
        sl["endpoints"][0]["nodeName"] = text
        out.append(sl)
    for mutate in (
        lambda o: o["spec"].update(clusterIPs=["10.96.9.300"], clusterIP="10.96.9.300"),
        lambda o: o["spec"].update(clusterIPs=["fd00::1", "fd00::2"]),
        lambda o: o["spec"]["ports"][0].update(port=0),
        lambda o: o["spec"]["ports"][0].update(port=65536),
        lambda o: o["spec"]["ports"][0].update(port=-5),
        lambda o: o["spec"]["ports"][0].update(protocol="ICMP"),
        lambda o: o["spec"].update(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}]),
        lambda o: o["spec"].update(externalIPs=["not-an-ip"]),
        lambda o: o["spec"].update(externalIPs=["10.0.0.1\n-A INPUT -j ACCEPT"]),
        lambda o: o["spec"].update(type="LoadBalancer", loadBalancerSourceRanges=["1.2.3.4/40"]),
    ):
        out.append(svc(mutate))
    huge = endpoint_slice(
        "bad",
        [EndpointSpec(f"10.244.{i // 250}.{i % 250 + 1}", "node-1") for i in range(2000)],
        [HTTP],
        name="bad-huge",
    )
    out.append(huge)
    wrong_family = endpoint_slice(
        "bad", [EndpointSpec("fd00::5", "node-1")], [HTTP], name="bad-family"
    )
    out.append(wrong_family)
    return out


@pytest.fixture(scope="module", params=["iptables", "ebpf", "ipvs"])
def env(request):
    try:
        check_host(request.param)
    except HostUnsupported as err:
        pytest.skip(str(err))
    with LbdEnv(request.param) as e:
        e.apply(service("good", [GOOD_VIP], [HTTP]))
        e.apply(
            endpoint_slice("good", [EndpointSpec(p.ipv4, p.node) for p in e.cluster.pods], [HTTP])
        )
        e.wait_synced()
        yield e


def assert_healthy_and_contained(env: LbdEnv) -> None:
    for node, proc in env.daemons.items():
        assert proc.poll() is None, f"lbd on {node} died:\n{env.logs(node)}"
    env.wait_synced()
    assert tcp_request(env.cluster.pod("pod-1-1").netns, GOOD_VIP, 80).pod
    if env.mode == "iptables":
        for tool in ("iptables-save", "ip6tables-save"):
            dump = subprocess.run(
                ["ip", "netns", "exec", env.cluster.netns_of("node-1"), tool],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for line in dump.splitlines():
                if line.startswith("-A "):
                    chain = line.split()[1]
                    target = line.split(" -j ")[-1].split()[0] if " -j " in line else ""
                    # lbd writes only into its own chains, plus single jumps into them
                    assert chain.startswith("LBD-") or target.startswith("LBD-"), line


def test_hostile_corpus_is_rejected_and_valid_services_keep_working(env):
    before = env.metrics("node-1")
    rejected_before = sum(v for k, v in before.items() if k.startswith("lbd_invalid_objects_total"))
    for obj in corpus():
        env.apply(obj)
    assert_healthy_and_contained(env)
    after = env.metrics("node-1")
    rejected = sum(v for k, v in after.items() if k.startswith("lbd_invalid_objects_total"))
    assert rejected - rejected_before >= len(HOSTILE)
    assert "rejected" in env.logs("node-1", 400)


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-70000, 70000)
    | st.sampled_from(HOSTILE)
    | st.text(max_size=10)
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
spec_fields = st.sampled_from(
    [
        "clusterIPs",
        "ports",
        "type",
        "externalIPs",
        "sessionAffinity",
        "externalTrafficPolicy",
        "loadBalancerSourceRanges",
        "healthCheckNodePort",
        "sessionAffinityConfig",
    ]
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(field=spec_fields, value=json_value)
def test_fuzzed_services_never_take_the_daemon_down(env, field, value):
    obj = service("fuzz", ["10.96.9.11"], [HTTP])
    obj["spec"][field] = value
    env.apply(obj)
    assert_healthy_and_contained(env)
