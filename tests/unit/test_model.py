"""The model, one case per rule of SEMANTICS.md: objects in, ProxyState out."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lbd.model.build import ModelConfig, NodeInfo, ParseCache, build_state, parse_node
from lbd.model.state import IPFamily, Protocol, ServicePortName

NODE = NodeInfo("node-1", ("192.168.200.11",), "zone-a")
CFG = ModelConfig("node-1", cluster_cidrs=("10.244.0.0/16",))


def svc(name: str = "web", ns: str = "default", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "clusterIPs": ["10.96.0.10"],
        "ports": [{"port": 80, "protocol": "TCP"}],
    }
    base.update(spec)
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": ns}, "spec": base}
    if "status" in spec:
        obj["status"] = base.pop("status")
    return obj


def ep(ip: str, node: str = "node-1", **cond: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip], "nodeName": node}
    hints = cond.pop("zones", None)
    if cond:
        out["conditions"] = cond
    if hints is not None:
        out["hints"] = {"forZones": [{"name": z} for z in hints]}
    return out


def eps(
    service: str = "web",
    endpoints: list[dict[str, Any]] | None = None,
    *,
    name: str | None = None,
    ports: list[dict[str, Any]] | None = None,
    family: str = "IPv4",
    ns: str = "default",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name or f"{service}-abc",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": ports if ports is not None else [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints or [],
    }


def build(services: list[dict], slices: list[dict], node: NodeInfo = NODE):
    state, rejected = build_state(services, slices, node, CFG)
    return state, rejected


def only(state):
    ports = list(state.ports())
    assert len(ports) == 1, ports
    return ports[0]


def ips(endpoints) -> list[str]:
    return sorted(e.ip for e in endpoints)


# --- which objects are ours -------------------------------------------------------------


@pytest.mark.parametrize(
    "service",
    [
        svc(clusterIPs=["None"], clusterIP="None"),
        svc(type="ExternalName", externalName="example.org", clusterIPs=[]),
        {
            **svc(),
            "metadata": {
                "name": "web",
                "namespace": "default",
                "labels": {"service.kubernetes.io/service-proxy-name": "other"},
            },
        },
    ],
    ids=["headless", "externalname", "other-proxy"],
)
def test_services_that_are_not_ours_are_ignored_without_error(service):
    state, rejected = build([service], [eps(endpoints=[ep("10.244.1.10")])])
    assert not state.service_ports
    assert rejected == []


def test_fqdn_and_headless_slices_are_ignored():
    fqdn = eps(endpoints=[{"addresses": ["a.example"]}], family="FQDN")
    headless = eps(endpoints=[ep("10.244.1.10")])
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    state, rejected = build([svc()], [fqdn, headless])
    assert only(state).all_endpoints == ()
    assert rejected == []


def test_slice_of_another_namespace_does_not_serve_the_service():
    state, _ = build([svc()], [eps(endpoints=[ep("10.244.1.10")], ns="other")])
    assert only(state).cluster_endpoints == ()


# --- service ports and frontends ------------------------------------------------------


def test_multi_port_endpoints_matched_by_port_name():
    service = svc(
        ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    )
    sl = eps(
        endpoints=[ep("10.244.1.10")],
        ports=[
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
        ],
    )
    state, _ = build([service], [sl])
    by_name = {sp.name.port: sp for sp in state.ports()}
    assert by_name["http"].cluster_endpoints[0].port == 8080
    assert by_name["dns"].cluster_endpoints[0].port == 5353
    assert by_name["dns"].protocol is Protocol.UDP


def test_dual_stack_yields_one_service_port_per_family_with_family_endpoints():
    service = svc(
        clusterIPs=["10.96.0.10", "fd00:96::10"], externalIPs=["203.0.113.5", "2001:db8:203::5"]
    )
    v4 = eps(endpoints=[ep("10.244.1.10")], name="web-v4")
    v6 = eps(endpoints=[ep("fd00:244:1::10")], name="web-v6", family="IPv6")
    state, _ = build([service], [v4, v6])
    (p4,) = state.ports(IPFamily.V4)
    (p6,) = state.ports(IPFamily.V6)
    assert (p4.cluster_ip, ips(p4.cluster_endpoints), p4.external_ips) == (
        "10.96.0.10",
        ["10.244.1.10"],
        ("203.0.113.5",),
    )
    assert (p6.cluster_ip, ips(p6.cluster_endpoints), p6.external_ips) == (
        "fd00:96::10",
        ["fd00:244:1::10"],
        ("2001:db8:203::5",),
    )


def test_load_balancer_frontends_skip_proxy_ip_mode_and_keep_source_ranges():
    service = svc(
        type="LoadBalancer",
        ports=[{"port": 80, "nodePort": 30080}],
        loadBalancerSourceRanges=["192.168.200.0/24", "10.0.0.1/8"],
        status={
            "loadBalancer": {
                "ingress": [
                    {"ip": "203.0.113.10"},
                    {"ip": "203.0.113.11", "ipMode": "Proxy"},
                    {"hostname": "lb.example"},
                ]
            }
        },
    )
    sp = only(build([service], [])[0])
    assert sp.load_balancer_ips == ("203.0.113.10",)
    assert sp.node_port == 30080
    assert sp.load_balancer_source_ranges == ("192.168.200.0/24", "10.0.0.0/8")


def test_allocate_load_balancer_node_ports_false_means_no_node_port():
    service = svc(
        type="LoadBalancer",
        allocateLoadBalancerNodePorts=False,
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}},
    )
    assert only(build([service], [])[0]).node_port == 0


def test_cluster_ip_service_ignores_a_stray_node_port():
    assert only(build([svc(ports=[{"port": 80, "nodePort": 30001}])], [])[0]).node_port == 0


def test_session_affinity_default_and_explicit_timeout():
    default = only(build([svc(sessionAffinity="ClientIP")], [])[0])
    explicit = only(
        build(
            [
                svc(
                    sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}},
                )
            ],
            [],
        )[0]
    )
    none = only(build([svc()], [])[0])
    assert (
        default.session_affinity_timeout,
        explicit.session_affinity_timeout,
        none.session_affinity_timeout,
    ) == (10800, 5, 0)


# --- endpoint conditions and selection --------------------------------------------------


def test_ready_endpoints_serve_and_not_ready_do_not():
    sl = eps(endpoints=[ep("10.244.1.10"), ep("10.244.1.11", ready=False, serving=False)])
    sp = only(build([svc()], [sl])[0])
    assert ips(sp.cluster_endpoints) == ["10.244.1.10"]
    assert ips(sp.all_endpoints) == ["10.244.1.10", "10.244.1.11"]


def test_terminating_endpoints_serve_only_when_none_is_ready():
    terminating = ep("10.244.1.11", ready=False, serving=True, terminating=True)
    with_ready = only(build([svc()], [eps(endpoints=[ep("10.244.1.10"), terminating])])[0])
    only_term = only(build([svc()], [eps(endpoints=[terminating])])[0])
    not_serving = only(
        build(
            [svc()],
            [eps(endpoints=[ep("10.244.1.11", ready=False, serving=False, terminating=True)])],
        )[0]
    )
    assert ips(with_ready.cluster_endpoints) == ["10.244.1.10"]
    assert ips(only_term.cluster_endpoints) == ["10.244.1.11"]
    assert not_serving.cluster_endpoints == ()


def test_duplicate_endpoint_in_two_slices_counts_once_and_ready_copy_wins():
    a = eps(endpoints=[ep("10.244.1.10", ready=False, serving=False)], name="web-a")
    b = eps(endpoints=[ep("10.244.1.10")], name="web-b")
    sp = only(build([svc()], [a, b])[0])
    assert len(sp.all_endpoints) == 1 and sp.cluster_endpoints[0].ready


def test_endpoints_reach_the_backends_canonical_unique_and_sorted():
    """The backends build on these endpoints without parsing them again."""
    service = svc(clusterIPs=["fd00:96::10"])
    a = eps(endpoints=[ep("fd00:244:0:0::b"), ep("fd00:244::a")], name="web-a", family="IPv6")
    b = eps(endpoints=[ep("FD00:244::B"), ep("fd00:244::9")], name="web-b", family="IPv6")
    # a slice with an address out of its family, or none at all, serves nothing
    c = eps(endpoints=[ep("10.244.1.10")], name="web-c", family="IPv6")
    d = eps(endpoints=[ep("fd00:244::x")], name="web-d", family="IPv6")
    state, rejected = build([service], [a, b, c, d])
    assert sorted(r.ref for r in rejected) == ["default/web-c", "default/web-d"], rejected
    sp = only(state)
    expected = ["fd00:244::9", "fd00:244::a", "fd00:244::b"]
    assert [e.ip for e in sp.cluster_endpoints] == expected
    assert [e.ip for e in sp.all_endpoints] == expected


def test_local_endpoints_and_traffic_policies():
    sl = eps(endpoints=[ep("10.244.1.10", "node-1"), ep("10.244.2.10", "node-2")])
    service = svc(
        type="NodePort",
        ports=[{"port": 80, "nodePort": 30080}],
        externalTrafficPolicy="Local",
        healthCheckNodePort=31000,
        internalTrafficPolicy="Local",
    )
    sp = only(build([service], [sl])[0])
    assert ips(sp.cluster_endpoints) == ["10.244.1.10", "10.244.2.10"]
    assert ips(sp.local_endpoints) == ["10.244.1.10"]
    assert ips(sp.internal_endpoints) == ["10.244.1.10"]
    assert ips(sp.external_endpoints) == ["10.244.1.10"]
    assert sp.health_check_node_port == 31000
    on_node_3 = only(build([service], [sl], NodeInfo("node-3"))[0])
    assert on_node_3.local_endpoints == ()


def test_external_policy_local_means_nothing_without_external_frontends():
    sp = only(build([svc(externalTrafficPolicy="Local")], [])[0])
    assert not sp.external_policy_local


def test_local_terminating_fallback_is_per_node():
    sl = eps(
        endpoints=[
            ep("10.244.1.10", "node-1", ready=False, serving=True, terminating=True),
            ep("10.244.2.10", "node-2"),
        ]
    )
    sp = only(build([svc(externalIPs=["203.0.113.5"], externalTrafficPolicy="Local")], [sl])[0])
    assert ips(sp.cluster_endpoints) == ["10.244.2.10"]
    assert ips(sp.local_endpoints) == ["10.244.1.10"]


@pytest.mark.parametrize(
    ("spec", "endpoints", "expected"),
    [
        # hints honoured: only zone-a endpoints
        (
            {"trafficDistribution": "PreferClose"},
            [ep("10.244.1.10", zones=["zone-a"]), ep("10.244.2.10", zones=["zone-b"])],
            ["10.244.1.10"],
        ),
        # not asked for: hints ignored
        (
            {},
            [ep("10.244.1.10", zones=["zone-a"]), ep("10.244.2.10", zones=["zone-b"])],
            ["10.244.1.10", "10.244.2.10"],
        ),
        # one ready endpoint without hints: all hints ignored
        (
            {"trafficDistribution": "PreferClose"},
            [ep("10.244.1.10", zones=["zone-a"]), ep("10.244.2.10")],
            ["10.244.1.10", "10.244.2.10"],
        ),
        # no endpoint hinted for this zone: ignored
        (
            {"trafficDistribution": "PreferClose"},
            [ep("10.244.1.10", zones=["zone-b"]), ep("10.244.2.10", zones=["zone-b"])],
            ["10.244.1.10", "10.244.2.10"],
        ),
    ],
    ids=["prefer-close", "not-requested", "incomplete-hints", "no-zone-match"],
)
def test_topology_hints(spec, endpoints, expected):
    sp = only(build([svc(**spec)], [eps(endpoints=endpoints)])[0])
    assert ips(sp.cluster_endpoints) == expected


def test_topology_annotation_auto_and_node_without_zone():
    service = svc()
    service["metadata"]["annotations"] = {"service.kubernetes.io/topology-mode": "Auto"}
    sl = eps(endpoints=[ep("10.244.1.10", zones=["zone-a"]), ep("10.244.2.10", zones=["zone-b"])])
    assert ips(only(build([service], [sl])[0]).cluster_endpoints) == ["10.244.1.10"]
    no_zone = NodeInfo("node-1")
    assert len(only(build([service], [sl], no_zone)[0]).cluster_endpoints) == 2


# --- malformed objects ------------------------------------------------------------------


BAD_SERVICES = {
    "bad-cluster-ip": {"clusterIPs": ["10.96.0.300"]},
    "two-v4-cluster-ips": {"clusterIPs": ["10.96.0.1", "10.96.0.2"]},
    "port-zero": {"ports": [{"port": 0}]},
    "port-too-big": {"ports": [{"port": 65536}]},
    "port-negative": {"ports": [{"port": -1}]},
    "port-bool": {"ports": [{"port": True}]},
    "unknown-protocol": {"ports": [{"port": 80, "protocol": "ICMP"}]},
    "duplicate-port": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]},
    "duplicate-name": {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
    "unnamed-multi": {"ports": [{"port": 80}, {"port": 81}]},
    "no-ports": {"ports": []},
    "ports-not-list": {"ports": "80"},
    "bad-external-ip": {"externalIPs": ["1.2.3"]},
    "bad-source-range": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["x/33"]},
    "bad-port-name": {"ports": [{"name": "x\n-A INPUT -j ACCEPT", "port": 80}]},
    "affinity-timeout": {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
    },
    "unknown-type": {"type": "Weird"},
    "huge-port-list": {"ports": [{"name": f"p{i}", "port": i + 1} for i in range(300)]},
}


@pytest.mark.parametrize("spec", BAD_SERVICES.values(), ids=BAD_SERVICES.keys())
def test_malformed_service_is_rejected_with_a_reason_and_others_survive(spec):
    good = svc("good")
    bad = svc("bad", **spec)
    state, rejected = build([good, bad], [])
    assert [sp.name.name for sp in state.ports()] == ["good"]
    assert len(rejected) == 1 and rejected[0].kind == "Service"
    assert rejected[0].ref == "default/bad" and rejected[0].reason


def test_hostile_names_are_rejected_and_logged_safely():
    bad = svc('x"\n-A PREROUTING -j ACCEPT')
    state, rejected = build([bad, svc("good")], [])
    assert len(state.service_ports) == 1
    assert "\n" not in rejected[0].ref and rejected[0].reason.startswith("metadata.name")


BAD_SLICES = {
    "out-of-family": {"endpoints": [ep("fd00::1")]},
    "bad-address": {"endpoints": [ep("10.244.1.999")]},
    "no-address": {"endpoints": [{"addresses": []}]},
    "bad-port": {"ports": [{"name": "", "port": 70000, "protocol": "TCP"}]},
    "bad-condition": {"endpoints": [ep("10.244.1.10", ready="yes")]},
    "bad-node-name": {"endpoints": [ep("10.244.1.10", node="Node 1")]},
    "too-many": {"endpoints": [ep(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(1001)]},
}


@pytest.mark.parametrize("change", BAD_SLICES.values(), ids=BAD_SLICES.keys())
def test_malformed_slice_is_rejected_and_good_slice_still_serves(change):
    bad = eps(name="web-bad")
    bad.update(change)
    good = eps(endpoints=[ep("10.244.1.10")], name="web-good")
    state, rejected = build([svc()], [bad, good])
    assert ips(only(state).cluster_endpoints) == ["10.244.1.10"]
    assert [r.kind for r in rejected] == ["EndpointSlice"]


def test_out_of_family_external_ip_is_dropped_for_single_stack():
    sp = only(build([svc(externalIPs=["2001:db8::1", "203.0.113.7"])], [])[0])
    assert sp.external_ips == ("203.0.113.7",)


# --- caching and node parsing -----------------------------------------------------------


def test_parse_cache_reuses_unchanged_objects_and_forgets_deleted_ones():
    service = svc()
    service["metadata"]["resourceVersion"] = "7"
    sl = eps(endpoints=[ep("10.244.1.10")])
    sl["metadata"]["resourceVersion"] = "8"
    cache = ParseCache()
    s1, _ = build_state([service], [sl], NODE, CFG, cache)
    assert len(cache.entries) == 2
    changed = copy.deepcopy(sl)
    changed["metadata"]["resourceVersion"] = "9"
    changed["endpoints"].append(ep("10.244.1.11"))
    s2, _ = build_state([service], [changed], NODE, CFG, cache)
    assert ips(only(s2).cluster_endpoints) == ["10.244.1.10", "10.244.1.11"]
    s3, _ = build_state([], [], NODE, CFG, cache)
    assert cache.entries == {} and not s3.service_ports
    assert s1 != s2


def test_service_port_name_and_key_are_kubernetes_words():
    sp = only(build([svc(ports=[{"name": "http", "port": 80}])], [])[0])
    assert sp.name == ServicePortName("default", "web", "http", Protocol.TCP)
    assert str(sp.name) == "default/web:http"


def test_parse_node_zone_and_addresses():
    node = parse_node(
        {
            "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "192.168.200.11"},
                    {"type": "Hostname", "address": "node-1"},
                    {"type": "InternalIP", "address": "garbage"},
                ]
            },
        },
        "node-1",
    )
    assert node == NodeInfo("node-1", ("192.168.200.11",), "zone-a")


def test_rebuild_reuses_unchanged_service_ports_by_identity():
    objs = [svc(f"s{i}") for i in range(3)]
    slices = [eps(f"s{i}", [ep(f"10.244.1.{i + 10}")]) for i in range(3)]
    for i, o in enumerate(objs + slices):
        o["metadata"]["resourceVersion"] = str(i + 1)
    for i, o in enumerate(objs):
        o["spec"]["clusterIPs"] = [f"10.96.0.{i + 10}"]
    cache = ParseCache()
    before, _ = build_state(objs, slices, NODE, CFG, cache)
    changed = copy.deepcopy(slices[1])
    changed["metadata"]["resourceVersion"] = "99"
    changed["endpoints"].append(ep("10.244.1.99"))
    after, _ = build_state(objs, [slices[0], changed, slices[2]], NODE, CFG, cache)
    same = [k for k in before.service_ports if before.service_ports[k] is after.service_ports[k]]
    assert sorted(k[0].name for k in same) == ["s0", "s2"]
    assert (
        len(
            after.service_ports[
                next(k for k in after.service_ports if k[0].name == "s1")
            ].cluster_endpoints
        )
        == 2
    )


def _differences(got, want) -> list:
    keys = got.service_ports.keys() | want.service_ports.keys()
    return [
        (str(k[0]), got.service_ports.get(k), want.service_ports.get(k))
        for k in sorted(keys, key=str)
        if got.service_ports.get(k) != want.service_ports.get(k)
    ]


def test_incremental_builds_equal_full_builds_through_random_churn():
    """StateBuilder told what changed must produce exactly what a from-scratch build
    does, through adds, updates, deletes, slices moving between services, invalid
    objects and node changes; and services it did not touch keep their ServicePorts."""
    import random

    from lbd.model.build import Changes, StateBuilder

    rng = random.Random(20261123)
    names = [f"s{i}" for i in range(8)]
    services: dict[str, dict] = {}
    slices: dict[str, dict] = {}
    builder = StateBuilder(CFG)
    node = NODE
    prev = builder.build(services, slices, node)[0]

    def random_service(name: str) -> dict:
        obj = svc(name, clusterIPs=[f"10.96.0.{names.index(name) + 10}"])
        roll = rng.random()
        if roll < 0.1:
            obj["spec"]["ports"] = [{"port": 70000}]  # invalid: rejected with a reason
        elif roll < 0.3:
            obj["spec"]["internalTrafficPolicy"] = "Local"
        elif roll < 0.4:
            obj["spec"]["ports"].append({"name": "b", "port": 81, "protocol": "UDP"})
            obj["spec"]["ports"][0]["name"] = "a"
        return obj

    def random_slice(key: str) -> dict:
        owner = rng.choice(names)
        endpoints = [
            ep(f"10.244.{rng.randrange(3)}.{rng.randrange(1, 6)}", rng.choice(["node-1", "n2"]),
               ready=rng.random() > 0.2)
            for _ in range(rng.randrange(0, 4))
        ]  # fmt: skip
        obj = eps(owner, endpoints, name=key)
        if rng.random() < 0.05:
            obj["endpoints"] = "garbage"
        return obj

    def owner(sl: dict | None) -> str | None:
        return sl["metadata"]["labels"]["kubernetes.io/service-name"] if sl else None

    for step in range(400):
        changes = Changes()
        old_slices = dict(slices)
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.4:
                name = rng.choice(names)
                key = f"default/{name}"
                if key in services and rng.random() < 0.3:
                    del services[key]
                else:
                    services[key] = random_service(name)
                changes.services.add(key)
            else:
                key = f"default/slice-{rng.randrange(12)}"
                if key in slices and rng.random() < 0.3:
                    del slices[key]
                else:
                    slices[key] = random_slice(key.split("/")[1])
                changes.slices.add(key)
        node_changed = rng.random() < 0.03
        if node_changed:  # a new zone: every service's endpoint choice may change
            node = NodeInfo("node-1", node.ips, "zone-b" if node.zone == "zone-a" else "zone-a")
        got, got_rejected = builder.build(services, slices, node, changes)
        want, want_rejected = build_state(services.values(), slices.values(), node, CFG)
        assert got == want, (step, _differences(got, want))
        assert sorted(r.reason for r in got_rejected) == sorted(r.reason for r in want_rejected)
        touched = {k.split("/")[1] for k in changes.services}
        for k in changes.slices:  # a moved or deleted slice touches its old service too
            touched |= {owner(slices.get(k)), owner(old_slices.get(k))}
        if not node_changed:
            for key, sp in got.service_ports.items():
                before = prev.service_ports.get(key)
                if key[0].name not in touched and before is not None and before == sp:
                    assert before is sp, f"step {step}: untouched {key[0]} rebuilt"
            # what the state says changed since the previous one covers every difference
            listed = got.changes_since(prev.revision)
            assert listed is not None, step
            differ = {
                k
                for k in prev.service_ports.keys() | got.service_ports.keys()
                if prev.service_ports.get(k) is not got.service_ports.get(k)
            }
            assert differ <= listed, (step, differ - listed)
            assert got.changes_since(prev.revision - 1) is None
        else:
            assert got.changes_since(prev.revision) is None  # a full build: unknown
        prev = got
