"""The IPVS planner (pure): frontends per service kind, diffs, graceful termination, the
constant iptables rules, and the status read-back. No kernel: views are built by hand or
taken from a previous plan's `expected` (what the kernel holds once the ops are applied).
"""

from __future__ import annotations

import dataclasses

from backends.ipvs import plan as p
from backends.ipvs.plan import (
    FWMARK_BASE,
    FWMARK_SLOTS,
    KernelView,
    Member,
    OpKind,
    RealServer,
    ServiceView,
    SetBase,
    VirtualServer,
    VSKey,
    set_name,
)
from backends.ipvs.status import frontends
from lbd.model.state import (
    Endpoint,
    IPFamily,
    Protocol,
    ProxyState,
    ServicePort,
    ServicePortName,
)

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
NODE = ("192.168.0.10", "fd00:192::10", "127.0.0.1", "::1", "fe80::1", "169.254.1.1")
EMPTY = KernelView(node_addresses=NODE)


def ep(ip: str, port: int = 8080, *, local: bool = False) -> Endpoint:
    return Endpoint(ip=ip, port=port, node_name="node-a" if local else "node-b", is_local=local)


def sport(
    name: str = "web",
    *,
    protocol: Protocol = TCP,
    family: IPFamily = V4,
    cluster_ip: str = "10.96.0.10",
    port: int = 80,
    endpoints: tuple[Endpoint, ...] = (),
    **kw: object,
) -> ServicePort:
    """A service port; `endpoints` are the cluster endpoints, the local ones the local."""
    kw.setdefault("cluster_endpoints", endpoints)
    kw.setdefault("local_endpoints", tuple(e for e in endpoints if e.is_local))
    kw.setdefault("all_endpoints", endpoints)
    return ServicePort(
        name=ServicePortName("default", name, "http", protocol),
        family=family,
        cluster_ip=cluster_ip,
        port=port,
        protocol=protocol,
        **kw,  # type: ignore[arg-type]
    )


def state(*ports: ServicePort, **kw: object) -> ProxyState:
    kw.setdefault("node_ips", ("192.168.0.10", "fd00:192::10"))
    kw.setdefault("cluster_cidrs", ("10.244.0.0/16", "fd00:244::/64"))
    return ProxyState(
        node_name="node-a",
        service_ports={(sp.name, sp.family): sp for sp in ports},
        **kw,  # type: ignore[arg-type]
    )


TWO = (ep("10.244.1.5"), ep("10.244.2.6"))


def vs(addr: str, port: int = 80, proto: Protocol = TCP) -> VSKey:
    family = V6 if ":" in addr else V4
    return VSKey(family, p.IPPROTO[proto], addr, port)


def services(result: p.Plan) -> dict[VSKey, set[tuple[str, int, int]]]:
    """Virtual server → {(ip, port, weight)} once the plan is applied."""
    return {
        k: {(rs.ip, rs.port, rs.weight) for rs in sv.dests.values()}
        for k, sv in result.expected.services.items()
    }


def members(result: p.Plan, base: SetBase, family: IPFamily = V4) -> set[Member]:
    return set(result.expected.sets[set_name(base, family)])


# --- frontends per service kind -----------------------------------------------------------


def test_cluster_ip_is_one_masqueraded_virtual_server_with_the_cluster_endpoints():
    here, there = ep("10.244.1.5", local=True), ep("10.244.2.6")
    result = p.plan(state(sport(endpoints=(here, there))), EMPTY)
    assert services(result) == {
        vs("10.96.0.10"): {("10.244.1.5", 8080, 1), ("10.244.2.6", 8080, 1)}
    }
    key = vs("10.96.0.10")
    assert result.expected.services[key].vs == VirtualServer(key, "rr", 0)
    assert result.expected.dummy_addresses == {"10.96.0.10"}
    cluster = result.expected.sets[set_name(SetBase.CLUSTER_IP)]
    assert cluster == {Member("10.96.0.10", 6, 80): p.Extension("default/web:http")}
    # hairpin: only this node's pods can reach themselves through the service here
    assert members(result, SetBase.LOOP_BACK) == {Member("10.244.1.5", 6, 8080, "10.244.1.5")}
    assert members(result, SetBase.IPVS_IPS) == {Member("10.96.0.10")}
    kinds = [op.kind for op in result.ops]
    # the order a kernel can take: sets and members before addresses before servers
    assert kinds.index(OpKind.CREATE_SET) < kinds.index(OpKind.ADD_MEMBER)
    assert kinds.index(OpKind.ADD_MEMBER) < kinds.index(OpKind.ADD_ADDRESS)
    assert kinds.index(OpKind.ADD_SERVICE) < kinds.index(OpKind.ADD_DEST)


def test_every_frontend_kind_gets_its_virtual_servers_and_sets():
    sp = sport(
        node_port=30080,
        external_ips=("203.0.113.5",),
        load_balancer_ips=("192.0.2.10",),
        health_check_node_port=32000,
        endpoints=TWO,
    )
    result = p.plan(state(sp), EMPTY)
    # node ports on the node's unicast addresses of the family, not loopback/link-local
    assert set(services(result)) == {
        vs("10.96.0.10"),
        vs("203.0.113.5"),
        vs("192.0.2.10"),
        vs("192.168.0.10", 30080),
    }
    assert result.expected.dummy_addresses == {"10.96.0.10", "203.0.113.5", "192.0.2.10"}
    assert members(result, SetBase.EXTERNAL_IP) == {Member("203.0.113.5", 6, 80)}
    assert members(result, SetBase.LOAD_BALANCER) == {Member("192.0.2.10", 6, 80)}
    assert members(result, SetBase.NODE_PORT_TCP) == {Member(port=30080)}
    assert members(result, SetBase.HEALTH_CHECK_NODE_PORT) == {Member(port=32000)}
    assert members(result, SetBase.NODE_PORT_LOCAL_TCP) == set()
    rows = {(f.kind, f.frontend, f.endpoints) for f in frontends(result.expected)}
    eps = ("10.244.1.5:8080", "10.244.2.6:8080")
    assert rows == {
        ("ClusterIP", "10.96.0.10:80/TCP", eps),
        ("ExternalIP", "203.0.113.5:80/TCP", eps),
        ("LoadBalancer", "192.0.2.10:80/TCP", eps),
        ("NodePort", "192.168.0.10:30080/TCP", eps),
    }
    assert {f.service for f in frontends(result.expected)} == {"default/web:http"}


def test_nodeport_addresses_select_the_node_port_frontends():
    sp = sport(node_port=30080, endpoints=TWO)
    view = KernelView(node_addresses=("192.168.0.10", "10.0.0.5"))
    result = p.plan(state(sp, nodeport_addresses=("10.0.0.0/8",)), view)
    assert vs("10.0.0.5", 30080) in result.expected.services
    assert vs("192.168.0.10", 30080) not in result.expected.services


def test_session_affinity_is_persistence_and_the_scheduler_is_configurable():
    sp = sport(endpoints=TWO, session_affinity_timeout=10800)
    result = p.plan(state(sp), EMPTY, scheduler="lc")
    key = vs("10.96.0.10")
    assert result.expected.services[key].vs == VirtualServer(key, "lc", 10800)
    # changing the scheduler edits the virtual server in place, nothing else
    again = p.plan(state(sp), result.expected, scheduler="sh")
    assert [op.kind for op in again.ops] == [OpKind.EDIT_SERVICE]
    assert again.ops[0].vs == VirtualServer(key, "sh", 10800)


def test_udp_sctp_and_ipv6():
    v6 = sport(
        "dns",
        protocol=UDP,
        family=V6,
        cluster_ip="fd00:96::000a",
        port=53,
        endpoints=(ep("fd00:244::5", 53),),
    )
    sctp = sport("sig", protocol=SCTP, cluster_ip="10.96.0.11", port=36412, node_port=30412)
    result = p.plan(state(v6, sctp), EMPTY)
    key6 = VSKey(V6, 17, "fd00:96::a", 53)  # canonical spelling
    assert services(result)[key6] == {("fd00:244::5", 53, 1)}
    assert members(result, SetBase.CLUSTER_IP, V6) == {Member("fd00:96::a", 17, 53)}
    assert set_name(SetBase.CLUSTER_IP, V6) == "LBD6-CLUSTER-IP"
    assert vs("10.96.0.11", 36412, SCTP) in result.expected.services
    assert members(result, SetBase.NODE_PORT_SCTP) == {Member(port=30412)}


# --- policies -----------------------------------------------------------------------------


def test_no_endpoints_is_an_empty_virtual_server_which_ipvs_rejects():
    sp = sport(node_port=30080, load_balancer_ips=("192.0.2.10",))
    result = p.plan(state(sp), EMPTY)
    assert all(not dests for dests in services(result).values())
    assert members(result, SetBase.NO_LOCAL_ENDPOINTS) == set()  # reject, not drop


def test_external_traffic_policy_local():
    local, remote = ep("10.244.1.5", local=True), ep("10.244.2.6")
    sp = sport(
        node_port=30080,
        load_balancer_ips=("192.0.2.10",),
        external_policy_local=True,
        endpoints=(local, remote),
    )
    result = p.plan(state(sp), EMPTY)
    got = services(result)
    assert got[vs("192.0.2.10")] == {("10.244.1.5", 8080, 1)}
    assert got[vs("192.168.0.10", 30080)] == {("10.244.1.5", 8080, 1)}
    assert got[vs("10.96.0.10")] == {("10.244.1.5", 8080, 1), ("10.244.2.6", 8080, 1)}
    assert members(result, SetBase.LOAD_BALANCER_LOCAL) == {Member("192.0.2.10", 6, 80)}
    assert members(result, SetBase.NODE_PORT_LOCAL_TCP) == {Member(port=30080)}
    # in-cluster traffic short-circuits to the cluster endpoints through a firewall mark
    marks = {k: sv for k, sv in result.expected.services.items() if k.fwmark}
    assert len(marks) == 1
    (mark_key,) = marks
    assert FWMARK_BASE < mark_key.fwmark <= FWMARK_BASE + FWMARK_SLOTS
    assert got[mark_key] == {("10.244.1.5", 8080, 1), ("10.244.2.6", 8080, 1)}
    short = result.expected.sets[set_name(SetBase.SHORT_CIRCUIT)]
    assert short == {
        Member("192.0.2.10", 6, 80): p.Extension(mark=mark_key.fwmark),
        Member("192.168.0.10", 6, 30080): p.Extension(mark=mark_key.fwmark),
    }


def test_local_policies_without_local_endpoints_drop():
    etp = sport(node_port=30080, external_policy_local=True, endpoints=TWO)
    itp = sport("itp", cluster_ip="10.96.0.11", internal_policy_local=True, endpoints=TWO)
    result = p.plan(state(etp, itp), EMPTY)
    assert members(result, SetBase.NO_LOCAL_ENDPOINTS) == {
        Member("192.168.0.10", 6, 30080),
        Member("10.96.0.11", 6, 80),
    }
    assert services(result)[vs("10.96.0.11")] == set()


def test_load_balancer_source_ranges():
    sp = sport(
        load_balancer_ips=("192.0.2.10",),
        load_balancer_source_ranges=("198.51.100.0/24", "192.168.0.0/16"),
        endpoints=TWO,
    )
    result = p.plan(state(sp), EMPTY)
    assert members(result, SetBase.LOAD_BALANCER_FW) == {Member("192.0.2.10", 6, 80)}
    # the node (192.168.0.10) is inside the ranges: the LB IP itself may be the source
    assert members(result, SetBase.LOAD_BALANCER_SOURCE_CIDR) == {
        Member("192.0.2.10", 6, 80, "198.51.100.0/24"),
        Member("192.0.2.10", 6, 80, "192.168.0.0/16"),
        Member("192.0.2.10", 6, 80, "192.0.2.10/32"),
    }


def test_invalid_addresses_are_skipped_and_conflicts_reported():
    bad = sport("bad", cluster_ip="not-an-ip", external_ips=("10.0.0.1\n-A INPUT",))
    first = sport("a", endpoints=TWO)
    second = sport("b", endpoints=(ep("10.244.9.9"),))  # same cluster IP:port
    result = p.plan(state(bad, first, second), EMPTY)
    assert set(services(result)) == {vs("10.96.0.10")}
    assert services(result)[vs("10.96.0.10")] == {("10.244.1.5", 8080, 1), ("10.244.2.6", 8080, 1)}
    assert len(result.conflicts) == 1 and "default/b:http" in result.conflicts[0]


# --- diffs --------------------------------------------------------------------------------


def test_a_second_plan_against_the_result_is_empty():
    sp = sport(
        node_port=30080,
        external_ips=("203.0.113.5",),
        load_balancer_ips=("192.0.2.10",),
        load_balancer_source_ranges=("198.51.100.0/24",),
        external_policy_local=True,
        session_affinity_timeout=60,
        endpoints=(ep("10.244.1.5", local=True), *TWO[1:]),
    )
    v6 = sport("v6", family=V6, cluster_ip="fd00:96::a", endpoints=(ep("fd00:244::5"),))
    s = state(sp, v6)
    first = p.plan(s, EMPTY)
    assert first.ops
    again = p.plan(s, first.expected)
    assert again.ops == [] and again.changed_service_ports == 0
    # the kernel's own link-local address on the dummy is left alone
    linked = dataclasses.replace(
        first.expected, dummy_addresses=first.expected.dummy_addresses | {"fe80::1"}
    )
    assert p.plan(s, linked).ops == []


def test_one_service_change_touches_only_its_own_entries():
    shared = (ep("10.244.1.5", local=True), ep("10.244.2.6"))
    a = sport("a", cluster_ip="10.96.0.10", node_port=30001, endpoints=shared)
    b = sport("b", cluster_ip="10.96.0.20", node_port=30002, endpoints=shared)
    view = p.plan(state(a, b), EMPTY).expected
    b2 = sport(
        "b", cluster_ip="10.96.0.20", node_port=30002, endpoints=(ep("10.244.3.7", local=True),)
    )
    result = p.plan(state(a, b2), view)
    keys = {op.vs.key for op in result.ops if op.vs is not None}
    assert keys == {vs("10.96.0.20"), vs("192.168.0.10", 30002)}
    assert result.changed_service_ports == 1
    touched_members = {op.member for op in result.ops if op.member is not None}
    assert touched_members == {Member("10.244.3.7", 6, 8080, "10.244.3.7")}  # hairpin entry
    # the old endpoints are shared with service a: their hairpin entries stay
    assert not [op for op in result.ops if op.kind == OpKind.DEL_MEMBER]


def test_deleting_a_service_removes_its_entries_and_leaves_foreign_servers():
    foreign = VSKey(V4, 6, "192.168.0.10", 8443)  # someone's own IPVS service
    a = sport("a", node_port=30001, external_ips=("203.0.113.5",), endpoints=TWO)
    view = p.plan(state(a), EMPTY).expected
    services_ = dict(view.services)
    services_[foreign] = ServiceView(VirtualServer(foreign, "wlc"), {})
    view = KernelView(
        services_,
        view.sets,
        view.set_kinds,
        True,
        view.dummy_addresses,
        view.node_addresses,
    )
    result = p.plan(state(), view)
    deleted = {op.vs.key for op in result.ops if op.kind == OpKind.DEL_SERVICE}
    assert deleted == {vs("10.96.0.10"), vs("203.0.113.5"), vs("192.168.0.10", 30001)}
    assert {op.address for op in result.ops if op.kind == OpKind.DEL_ADDRESS} == {
        "10.96.0.10",
        "203.0.113.5",
    }
    assert set(result.expected.services) == {foreign}
    assert all(not m for m in result.expected.sets.values())
    # deletions unbind the addresses first (no new packets), then remove the servers,
    # then the set members they relied on
    kinds = [op.kind for op in result.ops]
    assert kinds.index(OpKind.DEL_ADDRESS) < kinds.index(OpKind.DEL_SERVICE)
    assert kinds.index(OpKind.DEL_SERVICE) < kinds.index(OpKind.DEL_MEMBER)


def test_an_address_is_bound_only_after_its_servers_hold_their_endpoints():
    # A sync killed halfway must not leave a bound cluster IP whose virtual server has
    # no real server yet: pods' packets would reach an empty service.
    result = p.plan(state(sport(node_port=30080, endpoints=TWO)), EMPTY)
    kinds = [op.kind for op in result.ops]
    last_dest = max(i for i, k in enumerate(kinds) if k == OpKind.ADD_DEST)
    first_address = kinds.index(OpKind.ADD_ADDRESS)
    assert last_dest < first_address
    # ... while the set members the rules need are in place before any server exists
    assert max(i for i, k in enumerate(kinds) if k == OpKind.ADD_MEMBER) < kinds.index(
        OpKind.ADD_SERVICE
    )


def test_missing_pieces_are_recreated_from_a_fresh_view():
    sp = sport(node_port=30080, endpoints=TWO)
    full = p.plan(state(sp), EMPTY).expected
    # an admin ran `ipvsadm -C` and deleted the dummy interface
    flushed = KernelView({}, full.sets, full.set_kinds, False, frozenset(), NODE)
    result = p.plan(state(sp), flushed)
    kinds = {op.kind for op in result.ops}
    assert kinds == {OpKind.CREATE_DUMMY, OpKind.ADD_ADDRESS, OpKind.ADD_SERVICE, OpKind.ADD_DEST}


# --- graceful termination -----------------------------------------------------------------


def test_a_removed_tcp_real_server_drains_then_goes():
    a, b = ep("10.244.1.5"), ep("10.244.2.6", local=True)
    key = vs("10.96.0.10")
    view = p.plan(state(sport(endpoints=(a, b))), EMPTY).expected
    result = p.plan(state(sport(endpoints=(a,))), view, now=100.0, grace_period=60.0)
    # weight 0: no new connections (its hairpin entry goes too: only new ones need it)
    assert [(op.kind, op.dest.weight) for op in result.ops if op.dest] == [(OpKind.EDIT_DEST, 0)]
    assert [op.kind for op in result.ops if not op.dest] == [OpKind.DEL_MEMBER]
    assert result.draining == {(key, (b.ip, 8080)): 100.0}
    assert (b.ip, 8080, 0) in services(result)[key]
    assert [f.endpoints for f in frontends(result.expected)] == [("10.244.1.5:8080",)]

    def with_conns(view: KernelView, active: int, inactive: int) -> KernelView:
        sv = view.services[key]
        dests = dict(sv.dests)
        dests[(b.ip, 8080)] = RealServer(b.ip, 8080, 0, active, inactive)
        return dataclasses.replace(view, services={key: ServiceView(sv.vs, dests)})

    busy = with_conns(result.expected, 2, 5)
    drain = result.draining
    still = p.plan(state(sport(endpoints=(a,))), busy, now=130.0, draining=drain, grace_period=60)
    assert still.ops == [] and still.draining == result.draining
    # connections gone: deleted
    idle = with_conns(result.expected, 0, 0)
    gone = p.plan(state(sport(endpoints=(a,))), idle, now=130.0, draining=result.draining)
    assert [op.kind for op in gone.ops] == [OpKind.DEL_DEST] and gone.draining == {}
    # grace period over: deleted even with connections
    late = p.plan(state(sport(endpoints=(a,))), busy, now=161.0, draining=drain, grace_period=60)
    assert [op.kind for op in late.ops] == [OpKind.DEL_DEST]
    # wanted again while draining: serves again
    back = p.plan(state(sport(endpoints=(a, b))), busy, now=130.0, draining=result.draining)
    assert [(op.kind, op.dest.weight) for op in back.ops if op.dest] == [(OpKind.EDIT_DEST, 1)]
    assert back.draining == {}


def test_a_weight_zero_server_found_after_a_restart_starts_draining_now():
    a, b = TWO
    key = vs("10.96.0.10")
    view = p.plan(state(sport(endpoints=(a, b))), EMPTY).expected
    sv = view.services[key]
    dests = {**sv.dests, (b.ip, 8080): RealServer(b.ip, 8080, 0, 1, 0)}
    view = dataclasses.replace(view, services={key: ServiceView(sv.vs, dests)})
    result = p.plan(state(sport(endpoints=(a,))), view, now=500.0)
    assert not [op for op in result.ops if op.dest]
    assert result.draining == {(key, (b.ip, 8080)): 500.0}


def test_udp_real_servers_go_at_once():
    a, b = (ep("10.244.1.5", 53), ep("10.244.2.6", 53, local=True))
    view = p.plan(state(sport(protocol=UDP, port=53, endpoints=(a, b))), EMPTY).expected
    result = p.plan(state(sport(protocol=UDP, port=53, endpoints=(a,))), view)
    assert [op.kind for op in result.ops] == [OpKind.DEL_DEST, OpKind.DEL_MEMBER]
    assert result.draining == {}


# --- fwmarks, iptables --------------------------------------------------------------------


def test_fwmarks_are_stable_distinct_and_in_range():
    keys = [f"default/s{i}:http/tcp/v4" for i in range(500)]
    marks = p.fwmarks(keys)
    assert len(set(marks.values())) == 500
    assert all(p.owns_fwmark(m) and not m & 0x4000 for m in marks.values())
    # another service coming or going moves no mark (barring a hash collision)
    assert p.fwmarks(keys[:10]) == {k: marks[k] for k in keys[:10]}


def test_iptables_rules_do_not_grow_with_services():
    one = state(sport(endpoints=TWO))
    many = state(
        *(
            sport(f"s{i}", cluster_ip=f"10.96.1.{i}", node_port=30000 + i, endpoints=TWO)
            for i in range(100)
        )
    )
    for family in (V4, V6):
        assert p.iptables_payload(one, family) == p.iptables_payload(many, family)
    text = p.iptables_payload(one, V4)
    assert "LBD-CLUSTER-IP" in text and "LBD6-" not in text
    assert "-A LBDIPVS-SERVICES ! -s 10.244.0.0/16 -m set --match-set LBD-CLUSTER-IP" in text
    assert "-j SET --map-set LBD-SHORT-CIRCUIT dst,dst --map-mark" in text
    assert "icmp6" in p.iptables_payload(one, V6) and "LBD6-CLUSTER-IP" in p.iptables_payload(
        one, V6
    )
    rules = [line for line in text.splitlines() if line.startswith(("-A", "-I"))]
    assert len(rules) < 40
    # every chain lbd writes is its own (the iptables mode owns LBD-*, not LBDIPVS-*)
    for line in rules:
        chain = line.split()[1]
        assert chain.startswith("LBDIPVS-") or line.startswith("-I "), line
    assert p.iptables_payload(one, V4, jumps=()).count("-I ") == 0
    assert text.count("-I ") == len(p.JUMPS)


def test_masquerade_all_and_several_cluster_cidrs():
    text = p.iptables_payload(state(masquerade_all=True), V4, jumps=())
    assert (
        "-A LBDIPVS-SERVICES -m set --match-set LBD-CLUSTER-IP dst,dst -j LBDIPVS-MARK-MASQ" in text
    )
    two = state(cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"))
    text = p.iptables_payload(two, V4, jumps=())
    assert ":LBDIPVS-MASQ-OFF-CLUSTER - [0:0]" in text
    assert "-A LBDIPVS-MASQ-OFF-CLUSTER -s 10.245.0.0/16 -j RETURN" in text


def test_has_jump_reads_saved_rules():
    jump = p.JUMPS[2]
    saved = f'-m comment --comment "{jump.comment}" -j {jump.target}'
    assert p.has_jump([saved], jump)
    assert not p.has_jump(["-j LBDIPVS-SERVICES-OTHER"], jump)


def test_the_planner_changes_nothing_but_speed():
    planner = p.Planner()
    a = sport(
        "a",
        node_port=30001,
        endpoints=TWO,
        external_policy_local=True,
        load_balancer_ips=("192.0.2.10",),
    )
    b = sport("b", cluster_ip="10.96.0.20", endpoints=TWO)
    steps = [
        state(a, b),
        state(a, dataclasses.replace(b, cluster_endpoints=TWO[:1], all_endpoints=TWO[:1])),
        state(dataclasses.replace(a, session_affinity_timeout=30), b),
        state(b),
        state(b, nodeport_addresses=("192.168.0.0/24",)),
    ]
    view = EMPTY
    for s in steps:
        kept = p.plan(s, view, planner=planner, changes_only=True)
        fresh = p.plan(s, view)
        assert sorted(map(str, kept.ops)) == sorted(map(str, fresh.ops))
        assert kept.expected == fresh.expected
        view = kept.expected


def test_planning_only_the_changes_matches_planning_everything_through_random_churn():
    """A seeded walk of creates, updates and deletes (shared endpoints and node ports, a
    contested external IP, Local policies with firewall marks, IPv6, a --nodeport-addresses
    change): at every step the plan of the changes alone equals the plan of everything."""
    import random

    rng = random.Random(20261123)
    planner = p.Planner()

    def random_port(i: int) -> ServicePort:
        fam = V6 if i % 5 == 0 else V4
        pool = [
            ep(f"fd00:244::{n}" if fam == V6 else f"10.244.{n % 3}.{n}", local=n % 3 == 0)
            for n in range(1, 9)
        ]
        eps = tuple(rng.sample(pool, rng.randint(0, 3)))
        extra = rng.random()
        return sport(
            f"s{i}",
            family=fam,
            protocol=rng.choice((TCP, TCP, UDP)),
            cluster_ip=f"fd00:96::{i}" if fam == V6 else f"10.96.0.{i}",
            endpoints=eps,
            node_port=30000 + rng.randint(0, 3) if extra < 0.5 else 0,
            external_ips=("203.0.113.5",) if fam == V4 and extra > 0.8 else (),
            load_balancer_ips=(f"192.0.2.{i}",) if fam == V4 and 0.3 < extra < 0.6 else (),
            external_policy_local=rng.random() < 0.4,
            session_affinity_timeout=rng.choice((0, 0, 30)),
        )

    ports: dict[int, ServicePort] = {}
    view, draining, now = EMPTY, {}, 0.0
    for step in range(300):
        i = rng.randint(1, 12)
        if i in ports and rng.random() < 0.3:
            del ports[i]
        else:
            ports[i] = random_port(i)
        kw = {"nodeport_addresses": ("192.168.0.0/24",)} if step % 97 > 90 else {}
        s = state(*ports.values(), **kw)
        now += rng.choice((1.0, 100.0))
        kept = p.plan(s, view, now=now, draining=draining, planner=planner, changes_only=True)
        fresh = p.plan(s, view, now=now, draining=draining)
        assert sorted(map(str, kept.ops)) == sorted(map(str, fresh.ops)), step
        assert kept.expected == fresh.expected, step
        assert (kept.draining, kept.conflicts) == (fresh.draining, fresh.conflicts), step
        assert kept.owned_services == fresh.owned_services, step
        view, draining = kept.expected, kept.draining


def test_a_firewall_mark_that_moves_replans_its_service_port():
    """Two short-circuited service ports whose marks collide: when the first goes, the
    second's mark moves to its own slot, and a plan of the changes alone must move it."""

    def slot(i: int) -> int:
        key = sport(f"s{i}").key
        return int.from_bytes(p.hashlib.sha256(key.encode()).digest()[:4], "big") % FWMARK_SLOTS

    seen: dict[int, int] = {}
    for i in range(5000):
        if slot(i) in seen:
            first, second = sorted((seen[slot(i)], i), key=lambda n: sport(f"s{n}").key)
            break
        seen[slot(i)] = i
    local = (ep("10.244.1.5", local=True), ep("10.244.2.6"))

    def short_circuited(i: int) -> ServicePort:
        return sport(
            f"s{i}",
            cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}",
            node_port=30000 + i % 2000,
            external_policy_local=True,
            endpoints=local,
        )

    planner = p.Planner()
    view = p.plan(state(short_circuited(first), short_circuited(second)), EMPTY).expected
    p.plan(state(short_circuited(first), short_circuited(second)), view, planner=planner)
    kept = p.plan(state(short_circuited(second)), view, planner=planner, changes_only=True)
    fresh = p.plan(state(short_circuited(second)), view)
    assert kept.expected == fresh.expected
    marks = {k.fwmark for k in kept.expected.services if k.fwmark}
    assert marks == {FWMARK_BASE + 1 + slot(second)}
