"""The eBPF map planner (pure): what a ProxyState becomes, and minimal, ordered diffs.

A plan is applied to an in-memory MapView (the planner's model of the kernel), so every
test can check both the writes and what the maps would hold afterwards; re-planning an
applied plan must always be empty.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.ebpf.conntrack import CtTimeouts, expired, partner, stale_udp
from backends.ebpf.plan import (
    AFF_MATCH,
    BACKENDS,
    CONFIG,
    MAGLEV,
    REV_NAT,
    SERVICES,
    SRC_RANGE,
    SVC_NAMES,
    MapView,
    Op,
    Plan,
    PlanOptions,
    Run,
    apply_to_view,
    assign_slots,
    plan,
    runs_of,
    slot_value,
)
from bpf_lb import maglev
from bpf_lb.maps import (
    BACKEND_LOCAL,
    CFG_HOSTNS_ONLY,
    CFG_MAGLEV,
    CT_CLOSING,
    CT_FORWARD,
    CT_REPLY,
    CT_SEEN_REPLY,
    CT_SNAT,
    PROTO_TCP,
    PROTO_UDP,
    SCOPE_EXT,
    SCOPE_INT,
    SVC_AFFINITY,
    SVC_EXTERNAL,
    SVC_EXTERNAL_IP,
    SVC_LOADBALANCER,
    SVC_LOCAL,
    SVC_NODEPORT,
    SVC_REJECT,
    SVC_SRC_RANGE,
    SVC_TWO_SCOPES,
    Backend,
    CtEntry,
    CtTuple,
    Frontend,
    RevNat,
    ServiceValue,
    SourceRange,
)
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP = Protocol.TCP, Protocol.UDP
NODE_IP = "192.168.200.11"
VIP = "10.96.0.10"
M = 251  # a small prime keeps Maglev tables cheap in tests


def ep(ip: str, port: int = 8080, *, local: bool = False) -> Endpoint:
    return Endpoint(ip=ip, port=port, node_name="node-1" if local else "node-2", is_local=local)


def sport(
    name: str = "web",
    *,
    protocol: Protocol = TCP,
    family: IPFamily = V4,
    cluster_ip: str = VIP,
    port: int = 80,
    endpoints: tuple[Endpoint, ...] = (),
    **kw: object,
) -> ServicePort:
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
    kw.setdefault("node_ips", (NODE_IP, "fd00:200::11"))
    return ProxyState(
        node_name="node-1",
        service_ports={(p.name, p.family): p for p in ports},
        **kw,  # type: ignore[arg-type]
    )


def fe(addr: str = VIP, port: int = 80, proto: int = PROTO_TCP, scope: int = SCOPE_EXT) -> Frontend:
    return Frontend(addr, port, proto, 6 if ":" in addr else 4, scope)


EPS = (ep("10.244.1.11", local=True), ep("10.244.1.12", local=True), ep("10.244.2.11"))


def applied(s: ProxyState, view: MapView | None = None, **opts: object) -> tuple[Plan, MapView]:
    view = view or MapView()
    p = plan(s, view, PlanOptions(**opts))  # type: ignore[arg-type]
    after = apply_to_view(view, p.ops)
    assert plan(s, after, PlanOptions(**opts)).ops == (), "re-planning must be a no-op"  # type: ignore[arg-type]
    return p, after


def slots(view: MapView, frontend: Frontend) -> list[Backend]:
    head = view.services[(frontend, 0)]
    return [
        view.backends[view.services[(frontend, i)].backend_id] for i in range(1, head.count + 1)
    ]


def addrs(view: MapView, frontend: Frontend) -> set[str]:
    return {str(b) for b in slots(view, frontend)}


def ops_on(p: Plan, map_name: str) -> list[Op]:
    return [op for op in p.ops if op.map == map_name]


def slot_ops(p: Plan) -> list[tuple[Frontend, int, ServiceValue | None]]:
    """The plan's lbd_services writes entry by entry, in order: (frontend, slot, the value
    written, or None for a deletion)."""
    out: list[tuple[Frontend, int, ServiceValue | None]] = []
    for op in ops_on(p, SERVICES):
        frontend, numbers = op.key
        values = [None] * len(numbers) if op.is_delete else map(slot_value, op.value)
        out += [(frontend, i, v) for i, v in zip(numbers, values, strict=True)]
    return out


# --- what a state becomes ------------------------------------------------------------------


def test_cluster_ip_service_from_scratch() -> None:
    p, view = applied(state(sport(endpoints=EPS)))
    head = view.services[(fe(), 0)]
    assert head.count == 3 and head.flags == 0
    assert addrs(view, fe()) == {"10.244.1.11:8080", "10.244.1.12:8080", "10.244.2.11:8080"}
    assert view.rev_nat[head.rev_nat_id] == RevNat(VIP, 80, 4)
    assert view.svc_names[head.svc_id] == "default/web:http/tcp/v4#cluster"
    assert {b.flags for b in view.backends.values() if b.addr.startswith("10.244.1.")} == {
        BACKEND_LOCAL
    }
    assert view.config is not None and view.config.node_addr4 == NODE_IP
    assert view.config.node_addr6 == "fd00:200::11"
    assert p.changed_service_ports == 1 and p.frontends == 1 and p.backends == 3
    assert not view.maglev  # random selection needs no tables


def test_ordering_creates_before_references_and_deletes_last() -> None:
    p, _ = applied(state(sport(endpoints=EPS, node_port=30080)))
    kinds = [op.map for op in p.ops]
    assert kinds[0] == CONFIG
    last_backend = max(i for i, k in enumerate(kinds) if k == BACKENDS)
    first_service = min(i for i, k in enumerate(kinds) if k == SERVICES)
    assert last_backend < first_service
    assert max(i for i, k in enumerate(kinds) if k == REV_NAT) < first_service
    # within a new frontend, the slots come before the head that exposes them
    for frontend in (fe(), fe(NODE_IP, 30080)):
        mine = [i for f, i, _ in slot_ops(p) if f == frontend]
        assert mine[-1] == 0 and sorted(mine[:-1]) == [1, 2, 3]


def test_no_endpoints_rejects_and_local_policy_drops() -> None:
    _, view = applied(state(sport()))
    assert view.services[(fe(), 0)] == view.services[(fe(), 0)]._replace(count=0, flags=SVC_REJECT)
    # internalTrafficPolicy: Local with endpoints only elsewhere: an empty entry = drop
    remote = (ep("10.244.2.11"),)
    _, view = applied(state(sport(endpoints=remote, internal_policy_local=True)))
    head = view.services[(fe(), 0)]
    assert head.count == 0 and not head.flags & SVC_REJECT
    assert view.svc_names[head.svc_id].endswith("#local")


def test_node_ports_external_ips_and_load_balancer_ips() -> None:
    s = state(
        sport(
            endpoints=EPS,
            node_port=30080,
            external_ips=("198.51.100.7",),
            load_balancer_ips=("203.0.113.20",),
            load_balancer_source_ranges=("192.168.200.0/24", "fd00::/8"),
        )
    )
    _, view = applied(s)
    node = view.services[(fe(NODE_IP, 30080), 0)]
    assert node.flags == SVC_EXTERNAL | SVC_NODEPORT
    assert view.services[(fe("198.51.100.7"), 0)].flags == SVC_EXTERNAL | SVC_EXTERNAL_IP
    lb = view.services[(fe("203.0.113.20"), 0)]
    assert lb.flags == SVC_EXTERNAL | SVC_LOADBALANCER | SVC_SRC_RANGE
    # only the ranges of the frontend's own family, keyed by its rev-NAT id
    assert view.src_ranges == {SourceRange(lb.rev_nat_id, "192.168.200.0/24")}
    # the IPv6 node address has no IPv4 service port to expose
    assert not any(f.addr == "fd00:200::11" for f, _ in view.services)
    # same endpoints, same view: every frontend shares one svc id
    assert len({v.svc_id for (_, slot), v in view.services.items() if slot == 0}) == 1
    assert len({v.rev_nat_id for (_, slot), v in view.services.items() if slot == 0}) == 4


def test_nodeport_addresses_select_node_ips() -> None:
    s = state(
        sport(endpoints=EPS, node_port=30080),
        node_ips=(NODE_IP, "10.0.0.5"),
        nodeport_addresses=("10.0.0.0/8",),
    )
    _, view = applied(s)
    node_fes = {f.addr for (f, slot) in view.services if f.port == 30080}
    assert node_fes == {"10.0.0.5"}
    # only IPv6 CIDRs given: no IPv4 node ports at all (kube-proxy's per-family rule)
    _, view = applied(
        state(sport(endpoints=EPS, node_port=30080), nodeport_addresses=("fd00::/8",))
    )
    assert not [f for (f, _) in view.services if f.port == 30080]


def test_external_traffic_policy_local_has_two_scopes() -> None:
    s = state(sport(endpoints=EPS, node_port=30080, external_policy_local=True))
    p, view = applied(s)
    ext = view.services[(fe(NODE_IP, 30080), 0)]
    internal = view.services[(fe(NODE_IP, 30080, scope=SCOPE_INT), 0)]
    assert ext.flags == SVC_EXTERNAL | SVC_NODEPORT | SVC_LOCAL | SVC_TWO_SCOPES
    assert internal.flags == SVC_EXTERNAL | SVC_NODEPORT
    assert addrs(view, fe(NODE_IP, 30080)) == {"10.244.1.11:8080", "10.244.1.12:8080"}
    assert len(slots(view, fe(NODE_IP, 30080, scope=SCOPE_INT))) == 3
    assert ext.rev_nat_id == internal.rev_nat_id
    assert ext.svc_id != internal.svc_id
    # the cluster IP and the INT scope share the cluster view
    assert internal.svc_id == view.services[(fe(), 0)].svc_id
    # the INT entry is written before the EXT head that announces it
    heads = [f.scope for f, i, _ in slot_ops(p) if i == 0]
    assert heads.index(SCOPE_INT) < heads.index(SCOPE_EXT)


def test_affinity_lists_members_per_view() -> None:
    _, view = applied(state(sport(endpoints=EPS, session_affinity_timeout=300)))
    head = view.services[(fe(), 0)]
    assert head.flags == SVC_AFFINITY and head.affinity_timeout == 300
    assert view.aff_match == {(b.backend_id, head.svc_id) for b in _slot_values(view, fe())}


def _slot_values(view: MapView, frontend: Frontend) -> list[ServiceValue]:
    head = view.services[(frontend, 0)]
    return [view.services[(frontend, i)] for i in range(1, head.count + 1)]


def test_dual_stack_and_udp() -> None:
    v6 = sport(family=V6, cluster_ip="fd00:96::10", endpoints=(ep("fd00:244:1::11", local=True),))
    udp = sport("dns", protocol=UDP, port=53, endpoints=(ep("10.244.2.11", 53),))
    _, view = applied(state(sport(endpoints=EPS), v6, udp))
    assert addrs(view, fe("fd00:96::10")) == {"[fd00:244:1::11]:8080"}
    assert addrs(view, fe(port=53, proto=PROTO_UDP)) == {"10.244.2.11:53"}
    assert view.backends[_slot_values(view, fe("fd00:96::10"))[0].backend_id].family == 6


def test_invalid_frontend_addresses_are_skipped() -> None:
    # (endpoint addresses come checked by the model: test_model_fuzz asserts it)
    bad = sport(cluster_ip="not-an-ip", endpoints=(ep("10.244.1.11"),))
    s = state(bad, sport("b", cluster_ip="10.96.0.11", external_ips=("fd00::9",), endpoints=EPS))
    _, view = applied(s)
    assert {f.addr for f, _ in view.services} == {"10.96.0.11"}


def test_a_frontend_claimed_twice_keeps_the_first() -> None:
    a = sport("a", endpoints=(ep("10.244.1.11"),))
    b = sport("b", endpoints=(ep("10.244.2.11"),))
    _, view = applied(state(a, b))
    assert addrs(view, fe()) == {"10.244.1.11:8080"}


def test_hostns_only_and_maglev_flags_reach_the_config() -> None:
    s = state(sport(endpoints=EPS))
    opts = {"hostns_only": True, "host_netns_cookie": 4242, "lb_algorithm": "maglev"}
    _, view = applied(s, maglev_table_size=M, **opts)
    assert view.config is not None
    assert view.config.flags == CFG_HOSTNS_ONLY | CFG_MAGLEV
    assert view.config.host_netns_cookie == 4242


# --- diffs ------------------------------------------------------------------------------------


def test_adding_an_endpoint_touches_its_own_entries_only() -> None:
    _, view = applied(state(sport(endpoints=EPS, node_port=30080)))
    new = (*EPS, ep("10.244.2.12"))
    p, after = applied(state(sport(endpoints=new, node_port=30080)), view)
    assert [op.map for op in p.ops if op.map not in (SERVICES, BACKENDS)] == []
    assert ops_on(p, BACKENDS) == [Op(BACKENDS, 4, Backend("10.244.2.12", 8080, 4))]
    for frontend in (fe(), fe(NODE_IP, 30080)):
        mine = [(i, v) for f, i, v in slot_ops(p) if f == frontend]
        # the new slot, then the head with the new count
        assert [i for i, _ in mine] == [4, 0]
        assert mine[1][1] is not None and mine[1][1].count == 4
    assert p.changed_service_ports == 1


def test_replacing_an_endpoint_rewrites_one_slot_and_not_the_frontend() -> None:
    _, view = applied(state(sport(endpoints=EPS)))
    replaced = (EPS[0], ep("10.244.2.99"), EPS[2])
    p, after = applied(state(sport(endpoints=replaced)), view)
    assert [op.map for op in p.ops] == [BACKENDS, SERVICES, BACKENDS]
    write, slot, delete = p.ops
    assert write.value == Backend("10.244.2.99", 8080, 4)
    assert slot.key[1] != (0,) and slot.value == (write.key,)  # one backend slot
    assert delete.is_delete and view.backends[delete.key].addr == "10.244.1.12"
    assert addrs(after, fe()) == {str(Backend(e.ip, e.port, 4)) for e in replaced}


def test_removing_a_middle_endpoint_moves_the_last_slot() -> None:
    five = tuple(ep(f"10.244.2.{i}") for i in range(11, 16))
    _, view = applied(state(sport(endpoints=five)))
    before = [b.addr for b in slots(view, fe())]
    gone = before[1]
    p, after = applied(state(sport(endpoints=tuple(e for e in five if e.ip != gone))), view)
    services = slot_ops(p)
    # shrink: the head first (count 4), then slot 2 gets the old slot 5, then slot 5 goes
    assert [(i, v is None) for _, i, v in services] == [(0, False), (2, False), (5, True)]
    assert services[0][2] is not None and services[0][2].count == 4
    assert [b.addr for b in slots(after, fe())] == [before[0], before[4], before[2], before[3]]
    assert p.ops[-1].map == BACKENDS and p.ops[-1].is_delete


def test_a_backend_shared_by_two_services_lives_until_the_last_one_drops_it() -> None:
    shared = ep("10.244.1.11")
    a = sport("a", endpoints=(shared, ep("10.244.2.11")))
    b = sport("b", cluster_ip="10.96.0.11", endpoints=(shared,))
    _, view = applied(state(a, b))
    assert len(view.backends) == 2
    shared_id = next(k for k, v in view.backends.items() if v.addr == "10.244.1.11")
    p, view = applied(state(a, sport("b", cluster_ip="10.96.0.11")), view)
    assert not ops_on(p, BACKENDS)
    p, view = applied(state(sport("a", endpoints=(ep("10.244.2.11"),))), view)
    assert ops_on(p, BACKENDS) == [Op(BACKENDS, shared_id)]


def test_removing_a_service_deletes_everything_it_owned() -> None:
    s = state(
        sport(
            endpoints=EPS,
            node_port=30080,
            external_policy_local=True,
            session_affinity_timeout=60,
            load_balancer_ips=("203.0.113.20",),
            load_balancer_source_ranges=("192.168.200.0/24",),
        )
    )
    _, view = applied(s, lb_algorithm="maglev", maglev_table_size=M)
    p, after = applied(state(), view, lb_algorithm="maglev", maglev_table_size=M)
    assert all(op.is_delete for op in p.ops)
    assert after == MapView(config=view.config)
    # the heads go before their slots, and referenced maps after the services
    kinds = [op.map for op in p.ops]
    assert kinds.index(BACKENDS) > max(i for i, k in enumerate(kinds) if k == SERVICES)
    assert p.changed_service_ports == 1


def test_only_the_policy_changes() -> None:
    _, view = applied(state(sport(endpoints=EPS, node_port=30080)))
    p, _ = applied(state(sport(endpoints=EPS, node_port=30080, external_policy_local=True)), view)
    assert not ops_on(p, BACKENDS) and not ops_on(p, REV_NAT)
    changed = {op.key[0] for op in ops_on(p, SERVICES)}
    assert changed == {fe(NODE_IP, 30080), fe(NODE_IP, 30080, scope=SCOPE_INT)}


# --- Maglev -----------------------------------------------------------------------------------


def test_maglev_tables_follow_backend_sets() -> None:
    s = state(sport(endpoints=EPS, node_port=30080, external_policy_local=True))
    p, view = applied(s, lb_algorithm="maglev", maglev_table_size=M)
    tables = {op.key: op.value for op in ops_on(p, MAGLEV)}
    assert len(tables) == 2  # the cluster view and the local view
    for sid, table in tables.items():
        ids = {view.services[(f, i)].backend_id for f, i in view.services if i} & set(table)
        names = {str(view.backends[b]) for b in set(table)}
        assert len(table) == M and set(table) <= ids
        expected = maglev.lookup_table(names, M)
        assert [str(view.backends[b]) for b in table] == expected
        assert view.maglev[sid] == frozenset(table)
    # losing a local endpoint changes both views
    s2 = state(sport(endpoints=EPS[1:], node_port=30080, external_policy_local=True))
    p2, _ = applied(s2, view, lb_algorithm="maglev", maglev_table_size=M)
    assert len(ops_on(p2, MAGLEV)) == 2
    # a new remote endpoint changes the cluster view's table only
    s3 = state(
        sport(endpoints=(*EPS, ep("10.244.2.12")), node_port=30080, external_policy_local=True)
    )
    p3, _ = applied(s3, view, lb_algorithm="maglev", maglev_table_size=M)
    cluster_sid = view.services[(fe(), 0)].svc_id
    assert [op.key for op in ops_on(p3, MAGLEV)] == [cluster_sid]


def test_switching_algorithms_adds_and_drops_tables() -> None:
    _, view = applied(state(sport(endpoints=EPS)), lb_algorithm="maglev", maglev_table_size=M)
    p, view = applied(state(sport(endpoints=EPS)), view)
    assert [op.map for op in p.ops] == [CONFIG, MAGLEV] and p.ops[1].is_delete
    assert not view.maglev


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        PlanOptions(lb_algorithm="rr")
    with pytest.raises(ValueError):
        PlanOptions(maglev_table_size=1000)


# --- adoption after a restart -----------------------------------------------------------------


def _renumbered(view: MapView, offset: int) -> MapView:
    """The same maps as another daemon (different id allocation) would have left them."""
    bmap = {bid: bid + offset for bid in view.backends}
    rmap = {rid: rid + offset for rid in view.rev_nat}
    smap = {sid: sid + offset for sid in view.svc_names}
    frontends = {
        f: [head._replace(svc_id=smap[head.svc_id], rev_nat_id=rmap[head.rev_nat_id])]
        + [bmap[b] for b in rest]
        for f, (head, *rest) in view.frontends.items()
    }
    return MapView(
        frontends=frontends,
        backends={bmap[k]: v for k, v in view.backends.items()},
        rev_nat={rmap[k]: v for k, v in view.rev_nat.items()},
        maglev={smap[k]: frozenset(bmap[b] for b in v) for k, v in view.maglev.items()},
        aff_match={(bmap[b], smap[s]) for b, s in view.aff_match},
        src_ranges={SourceRange(rmap[r.rev_nat_id], r.cidr) for r in view.src_ranges},
        svc_names={smap[k]: v for k, v in view.svc_names.items()},
        config=view.config,
    )


def test_a_restarted_daemon_adopts_existing_ids_and_writes_nothing() -> None:
    s = state(
        sport(
            endpoints=EPS,
            node_port=30080,
            external_policy_local=True,
            session_affinity_timeout=60,
            load_balancer_ips=("203.0.113.20",),
            load_balancer_source_ranges=("192.168.200.0/24",),
        ),
        sport("dns", protocol=UDP, port=53, endpoints=(ep("10.244.2.11", 53),)),
    )
    opts = {"lb_algorithm": "maglev", "maglev_table_size": M}
    _, view = applied(s, **opts)
    foreign = _renumbered(view, 1000)
    assert plan(s, foreign, PlanOptions(**opts)).ops == ()  # type: ignore[arg-type]
    # without the names map (e.g. emptied by hand), ids are adopted through the frontends
    nameless = dataclasses.replace(foreign, svc_names={})
    p = plan(s, nameless, PlanOptions(**opts))  # type: ignore[arg-type]
    assert {op.map for op in p.ops} == {SVC_NAMES}
    assert {op.key for op in p.ops} == set(foreign.svc_names)


def test_new_ids_do_not_reuse_freed_ones() -> None:
    _, view = applied(state(sport(endpoints=EPS)))
    _, view = applied(state(sport(endpoints=EPS[:1])), view)
    p, _ = applied(state(sport(endpoints=(EPS[0], ep("10.244.9.9")))), view)
    assert [op.key for op in ops_on(p, BACKENDS)] == [4]


def test_sync_repairs_entries_changed_behind_its_back() -> None:
    s = state(sport(endpoints=EPS))
    _, view = applied(s)
    broken = view.copy()
    broken.frontends[fe()][2] = None  # slot 2's entry gone
    broken.backends[1] = Backend("10.9.9.9", 1, 4)
    broken.src_ranges.add(SourceRange(77, "10.0.0.0/8"))
    broken.aff_match.add((1, 1))
    p, fixed = applied(s, broken)
    assert addrs(fixed, fe()) == addrs(view, fe())
    assert not fixed.src_ranges and not fixed.aff_match
    assert Backend("10.9.9.9", 1, 4) not in fixed.backends.values()
    assert {op.map for op in p.ops} == {SERVICES, BACKENDS, SRC_RANGE, AFF_MATCH}


def test_svc_names_are_written_per_view() -> None:
    s = state(sport(endpoints=EPS, node_port=30080, external_policy_local=True))
    p, _ = applied(s)
    assert sorted(op.value for op in ops_on(p, SVC_NAMES)) == [
        "default/web:http/tcp/v4#cluster",
        "default/web:http/tcp/v4#local",
    ]


# --- slot assignment --------------------------------------------------------------------------


def test_assign_slots_basics() -> None:
    assert assign_slots({}, 0, [5, 6]) == [5, 6]
    assert assign_slots({1: 5, 2: 6, 3: 7}, 3, [5, 6, 7]) == [5, 6, 7]
    assert assign_slots({1: 5, 2: 6, 3: 7}, 3, [5, 7]) == [5, 7]
    assert assign_slots({1: 5, 2: 6, 3: 7}, 3, [6, 7]) == [7, 6]
    assert assign_slots({1: 5, 2: 6, 3: 7}, 3, [5, 7, 9]) == [5, 9, 7]
    assert assign_slots({1: 5, 2: 6, 3: 7}, 3, []) == []
    # slots beyond the live count are garbage, whatever they hold
    assert assign_slots({1: 5, 2: 6, 3: 7}, 2, [5, 6, 7]) == [5, 6, 7]
    # a duplicate slot (corrupted map) is repaired
    assert assign_slots({1: 5, 2: 5}, 2, [5, 6]) == [5, 6]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 30), unique=True, max_size=15),
    st.lists(st.integers(1, 30), unique=True, max_size=15),
)
def test_assign_slots_properties(old: list[int], new: list[int]) -> None:
    current = {i: b for i, b in enumerate(old, 1)}
    result = assign_slots(current, len(old), sorted(new))
    assert sorted(result) == sorted(new)
    changed = sum(1 for i, b in enumerate(result, 1) if current.get(i) != b)
    removed = len(set(old) - set(new))
    added = len(set(new) - set(old))
    # each added backend writes one slot; each removed one at most one (a move)
    assert changed <= added + removed
    # kept backends stay put unless moved into a hole
    for i, b in enumerate(result, 1):
        if b in old and current.get(i) != b:
            assert old.index(b) + 1 > len(result)


# --- conntrack decisions (backends/ebpf/conntrack.py) -----------------------------------------

S = 1_000_000_000


def _pair(
    *,
    proto: int = PROTO_TCP,
    snat: bool = False,
    flags: int = 0,
    last: int = 0,
    reply_last: int = 0,
) -> dict[CtTuple, CtEntry]:
    """A forward + reply pair as the datapath creates it (client → node port → backend)."""
    client, node, backend = "192.168.200.100", "192.168.200.11", "10.244.2.11"
    fwd_flags = flags | (CT_SNAT if snat else 0)
    fwd = CtTuple(client, node, 40000, 30080, proto, 4, CT_FORWARD)
    rev_dst, rev_port = (node, 50000) if snat else (client, 40000)
    rev = CtTuple(backend, rev_dst, 8080, rev_port, proto, 4, CT_REPLY)
    return {
        fwd: CtEntry(
            backend, node if snat else "", 8080, 50000 if snat else 0, 3, 4, fwd_flags, last
        ),
        rev: CtEntry(node, client, 30080, 40000, 3, 4, fwd_flags, reply_last),
    }


@pytest.mark.parametrize("snat", [False, True])
def test_conntrack_partners_find_each_other(snat: bool) -> None:
    entries = _pair(snat=snat)
    (fwd, fv), (rev, rv) = entries.items()
    assert partner(fwd, fv) == rev
    assert partner(rev, rv) == fwd


def test_conntrack_expiry_per_state() -> None:
    t = CtTimeouts()
    established = _pair(flags=CT_SEEN_REPLY, last=100 * S, reply_last=200 * S)
    assert expired(established, 200 * S + int(t.tcp - 1) * S) == []
    assert len(expired(established, 200 * S + int(t.tcp + 1) * S)) == 2
    # the most recent packet of either direction counts
    assert expired(established, 100 * S + int(t.tcp + 1) * S) == []
    syn_only = _pair(last=0, reply_last=0)
    assert len(expired(syn_only, int(t.tcp_syn + 1) * S)) == 2
    closing = _pair(flags=CT_SEEN_REPLY | CT_CLOSING)
    assert len(expired(closing, int(t.tcp_closing + 1) * S)) == 2
    udp = _pair(proto=PROTO_UDP, snat=True)
    assert expired(udp, int(t.other - 1) * S) == []
    assert len(expired(udp, int(t.other + 1) * S)) == 2
    # an orphan (its partner evicted by the LRU) is judged alone
    orphan = dict(list(_pair(flags=CT_SEEN_REPLY).items())[:1])
    assert len(expired(orphan, int(t.tcp + 1) * S)) == 1


def test_stale_udp_follows_the_frontends_backends() -> None:
    s = state(sport(protocol=UDP, endpoints=(ep("10.244.2.11"),), node_port=30080))
    _, view = applied(s)
    rid = view.services[(fe(NODE_IP, 30080, PROTO_UDP), 0)].rev_nat_id
    entries = {k: v._replace(rev_nat_id=rid) for k, v in _pair(proto=PROTO_UDP, snat=True).items()}
    assert stale_udp(entries, view) == []
    _, view = applied(
        state(sport(protocol=UDP, endpoints=(ep("10.244.2.12"),), node_port=30080)), view
    )
    assert len(stale_udp(entries, view)) == 2
    # TCP flows are left alone (kube-proxy lets them finish)
    tcp = {k: v._replace(rev_nat_id=rid) for k, v in _pair().items()}
    assert stale_udp(tcp, view) == []
    # a frontend that is gone takes its UDP flows with it
    _, gone = applied(state(), view)
    assert len(stale_udp(entries, gone)) == 2


def test_backend_from_config_reads_the_ebpf_section() -> None:
    from backends.ebpf import from_config
    from lbd.config import ProxyConfig

    cfg = ProxyConfig(
        mode="ebpf",
        extra={
            "ebpf": {
                "cgroup": "",
                "bpffs": "/sys/fs/bpf/lbd/unit",
                "lb_algorithm": "maglev",
                "maglev_table_size": 1021,
                "devices": ["eth0"],
                "pod_devices": ["lxc*"],
                "hostns_only": True,
                "snat_port_range": [40000, 50000],
                "map_sizes": {"conntrack": 4096},
            }
        },
    )
    b = from_config(cfg, netns="somewhere")  # builds only: nothing is loaded or attached
    assert b.cgroup is None and b.netns == "somewhere" and b.hostns_only
    assert b.devices == ["eth0"] and b.pod_devices == ["lxc*"]
    assert b.datapath.maglev_table_size == 1021 and b.datapath.sizes.conntrack == 4096
    assert not b.datapath.loaded
    with pytest.raises(ValueError):
        from_config(ProxyConfig(mode="ebpf", extra={"ebpf": {"cgroup": "", "lb_algorithm": "x"}}))


# --- incremental plans ------------------------------------------------------------------------

POD_POOL = ["10.244.1.11", "10.244.1.12", "10.244.2.11", "10.244.2.12", "10.244.3.11"]


@st.composite
def service_ports(draw: st.DrawFn, index: int) -> ServicePort:
    chosen = draw(st.lists(st.sampled_from(POD_POOL), unique=True, max_size=len(POD_POOL)))
    eps = tuple(ep(ip, local=ip.startswith("10.244.1.")) for ip in sorted(chosen))
    kw: dict[str, object] = {}
    if draw(st.booleans()):
        kw["node_port"] = 30000 + index
        kw["external_policy_local"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["load_balancer_ips"] = (f"203.0.113.{index}",)
        if draw(st.booleans()):
            kw["load_balancer_source_ranges"] = ("192.168.0.0/16",)
    if draw(st.booleans()):
        kw["session_affinity_timeout"] = 60
    kw["internal_policy_local"] = draw(st.booleans())
    protocol = draw(st.sampled_from([TCP, UDP]))
    return sport(f"s{index}", cluster_ip=f"10.96.0.{index}", protocol=protocol, endpoints=eps, **kw)


@st.composite
def states(draw: st.DrawFn) -> ProxyState:
    present = draw(st.lists(st.integers(1, 6), unique=True, max_size=6))
    return state(*(draw(service_ports(i)) for i in sorted(present)))


@settings(max_examples=150, deadline=None)
@given(st.lists(states(), min_size=1, max_size=6), st.sampled_from(["random", "maglev"]))
def test_incremental_plans_reach_what_a_full_plan_would(seq: list[ProxyState], algo: str) -> None:
    from backends.ebpf.plan import FrontendCache

    opts = PlanOptions(lb_algorithm=algo, maglev_table_size=M)
    cache = FrontendCache()
    view, previous = MapView(), None
    # what the backend keeps: one view, indexed and counted, recording each plan by runs
    live = MapView()
    live.index()
    live.counts()
    for s in seq:
        p = plan(s, view, opts, previous=previous, cache=cache)
        assert p.runs == runs_of(p.ops)  # recorded while assembling: the maximal runs
        before = view
        view = apply_to_view(view, p.ops)
        live.apply_all(p.ops, p.runs)
        assert live == view and live.counts() == view.counts()
        assert live.index().backend_refs == view.index().backend_refs
        assert live.index().sid_fes == view.index().sid_fes
        if previous is None:  # a plan from nothing: it brings the view it leaves
            full = plan(s, before, opts, cache=FrontendCache())
            assert full.expected is not None and full.ops == p.ops
            _assert_same_view(full.expected, view)
        previous = s
        # nothing left for a full comparison to do: the incremental plan was complete
        assert plan(s, view, opts).ops == ()
    # and an unchanged state plans nothing at all
    assert plan(seq[-1], view, opts, previous=seq[-1], cache=cache).ops == ()


def _assert_same_view(got: MapView, want: MapView) -> None:
    """Equal maps, indexes, counts and id high-water marks."""
    assert got == want and got.counts() == want.counts()
    assert got.high_water == want.high_water
    a, b = got.index(), want.index()
    for name in a.__slots__:
        assert getattr(a, name) == getattr(b, name), name


def test_a_plan_from_nothing_brings_the_view_it_leaves() -> None:
    s = state(
        sport(endpoints=EPS, node_port=30080, external_policy_local=True),
        sport("b", cluster_ip="10.96.0.11", endpoints=EPS[1:], session_affinity_timeout=9),
        sport(
            "lb",
            cluster_ip="10.96.0.12",
            load_balancer_ips=("203.0.113.20",),
            load_balancer_source_ranges=("192.168.200.0/24",),
            endpoints=EPS,
        ),
    )
    opts = PlanOptions(lb_algorithm="maglev", maglev_table_size=M)
    p = plan(s, MapView(), opts)
    assert p.expected is not None
    _assert_same_view(p.expected, apply_to_view(MapView(), p.ops))
    # also over leftovers of another run that held no frontend: they go, and are not in it
    stale = apply_to_view(
        MapView(),
        [
            Op(BACKENDS, 77, Backend("10.9.9.9", 1, 4)),  # unwanted
            Op(BACKENDS, 78, Backend("10.244.2.11", 8080, 4)),  # adopted by address
        ],
    )
    q = plan(s, stale, opts)
    assert q.expected is not None and Op(BACKENDS, 77) in q.ops
    assert q.expected.backends[78] == Backend("10.244.2.11", 8080, 4)
    _assert_same_view(q.expected, apply_to_view(stale, q.ops))
    # a plan over frontends that exist records its writes instead
    assert plan(s, p.expected, opts).expected is None


def test_runs_are_maximal_and_counted_per_map() -> None:
    b = Backend("10.244.1.11", 8080, 4)
    ops = [
        Op(BACKENDS, 1, b),
        Op(BACKENDS, 2, b),
        Op(SERVICES, (fe(), (1,)), (1,)),
        Op(SERVICES, (fe(), (0,)), (ServiceValue(0, 1, 1, 0, 1),)),
        Op(SERVICES, (fe(), (2, 3))),
        Op(BACKENDS, 3),
        Op(BACKENDS, 4),
    ]
    runs = runs_of(ops)
    assert runs == (
        Run(BACKENDS, False, 0, 2),
        Run(SERVICES, False, 2, 4),
        Run(SERVICES, True, 4, 5),
        Run(BACKENDS, True, 5, 7),
    )
    assert runs_of([]) == ()
    p = Plan(tuple(ops), 1, 1, 2)  # runs not given: found from the ops
    assert p.op_runs() == runs
    assert p.counts() == {
        "lbd_backends_write": 2,
        "lbd_services_write": 2,
        "lbd_services_delete": 2,
        "lbd_backends_delete": 2,
    }


def test_an_incremental_plan_touches_only_the_changed_service_port() -> None:
    from backends.ebpf.plan import FrontendCache

    many = [sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=EPS) for i in range(50)]
    before = state(*many)
    _, view = applied(before)
    after = state(*many[:10], sport("s10", cluster_ip="10.96.1.10", endpoints=EPS[:2]), *many[11:])
    p = plan(after, view, PlanOptions(), previous=before, cache=FrontendCache())
    assert p.changed_service_ports == 1
    assert {op.key[0].addr for op in ops_on(p, SERVICES)} == {"10.96.1.10"}
    assert plan(after, apply_to_view(view, p.ops), PlanOptions()).ops == ()


# --- scale: indexes, incremental work, capacity --------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(states(), min_size=1, max_size=5))
def test_the_view_index_follows_every_write(seq: list[ProxyState]) -> None:
    from backends.ebpf.plan import FrontendCache, _Index

    cache, view, previous = FrontendCache(), MapView(), None
    for s in seq:
        view.index()  # maintained from here on by apply_all
        p = plan(s, view, PlanOptions(), previous=previous, cache=cache)
        assert p.runs == runs_of(p.ops)
        view.apply_all(p.ops, p.runs)  # the loader's path: one apply_run per run
        previous = s
        fresh = _Index.build(view.copy())
        for name in _Index.__slots__:
            have, want = getattr(view.index(), name), getattr(fresh, name)
            if name in ("backend_ids", "sid_names"):  # lists whose order does not matter
                have = {k: sorted(v) for k, v in have.items()}
                want = {k: sorted(v) for k, v in want.items()}
            assert have == want, name


def test_an_incremental_plan_builds_frontends_of_the_changed_port_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from backends.ebpf import plan as plan_module

    many = [sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=EPS) for i in range(30)]
    before = state(*many)
    cache = plan_module.FrontendCache()
    view = apply_to_view(MapView(), plan(before, MapView(), PlanOptions(), cache=cache).ops)
    built: list[str] = []
    real = plan_module.frontends_of
    monkeypatch.setattr(
        plan_module, "frontends_of", lambda sp, ips: built.append(sp.name.name) or real(sp, ips)
    )
    after = state(*many[:7], sport("s7", cluster_ip="10.96.1.7", endpoints=EPS[:1]), *many[8:])
    p = plan(after, view, PlanOptions(), previous=before, cache=cache)
    assert built == ["s7"]
    assert {op.key[0].addr for op in ops_on(p, SERVICES)} == {"10.96.1.7"}
    assert plan(after, apply_to_view(view, p.ops), PlanOptions()).ops == ()


def test_a_port_taking_a_frontend_another_holds_is_planned_in_full() -> None:
    from backends.ebpf.plan import FrontendCache

    a = sport("a", cluster_ip="10.96.1.1", endpoints=EPS[:1])
    b = sport("b", cluster_ip="10.96.1.2", endpoints=EPS[1:2])
    before = state(a, b)
    cache = FrontendCache()
    view = apply_to_view(MapView(), plan(before, MapView(), PlanOptions(), cache=cache).ops)
    # "a" moves onto b's address: the first port (by name) wins the frontend
    after = state(sport("a", cluster_ip="10.96.1.2", endpoints=EPS[:1]), b)
    p = plan(after, view, PlanOptions(), previous=before, cache=cache)
    view = apply_to_view(view, p.ops)
    assert addrs(view, fe("10.96.1.2")) == {"10.244.1.11:8080"}
    assert (fe("10.96.1.1"), 0) not in view.services
    assert plan(after, view, PlanOptions()).ops == ()
    # and when "a" leaves it again, "b" gets it back
    p = plan(before, view, PlanOptions(), previous=after, cache=cache)
    view = apply_to_view(view, p.ops)
    assert addrs(view, fe("10.96.1.2")) == {"10.244.1.12:8080"}
    assert plan(before, view, PlanOptions()).ops == ()


def test_changed_service_ports_in_and_out_of_step() -> None:
    from backends.ebpf.plan import changed_service_ports

    ports = [sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=EPS) for i in range(4)]
    before = state(*ports)
    edited = sport("s2", cluster_ip="10.96.1.2", endpoints=EPS[:1])
    assert changed_service_ports(before, state(*ports[:2], edited, ports[3])) == {edited.key}
    # another order, one gone, one new: the general path
    added = sport("s9", cluster_ip="10.96.1.9")
    assert changed_service_ports(before, state(ports[3], added, *ports[:2])) == {
        ports[2].key,
        added.key,
    }
    assert changed_service_ports(before, before) == set()


def test_ids_wrap_around_to_free_ones() -> None:
    from backends.ebpf.plan import _MAX_ID, _Ids

    held = {1, 2, 4}
    ids = _Ids(held.__contains__, high_water=_MAX_ID - 2)
    assert [ids.take() for _ in range(4)] == [_MAX_ID - 1, _MAX_ID, 3, 5]


def test_a_plan_too_big_for_the_maps_is_refused_with_the_map_named() -> None:
    from backends.ebpf.plan import MapCapacityError, check_capacity, entries_needed

    s = state(sport(endpoints=EPS, node_port=30080))
    p = plan(s, MapView(), PlanOptions())
    need = entries_needed(MapView(), p.ops)
    # cluster IP + node port on the node's IPv4 address: 2 frontends x (1 + 3 slots)
    assert need[SERVICES] == 8 and need[BACKENDS] == 3
    roomy = {SERVICES: 8, BACKENDS: 3, REV_NAT: 2, SVC_NAMES: 1, MAGLEV: 0}
    check_capacity(MapView(), p.ops, roomy, p.counts())
    with pytest.raises(MapCapacityError) as e:
        check_capacity(MapView(), p.ops, {**roomy, SERVICES: 7}, p.counts())
    assert e.value.needs == {SERVICES: 8} and e.value.capacity == {SERVICES: 7}
    assert "lbd_services needs 8 entries and holds 7" in str(e.value)
    assert "--bpf-lb-map-max" in str(e.value)
    # replacing entries needs no room for the ones that go: only new keys count
    _, view = applied(s)
    p2 = plan(state(sport(endpoints=(EPS[0], ep("10.244.9.9")), node_port=30080)), view)
    assert entries_needed(view, p2.ops)[BACKENDS] == 4
    check_capacity(view, p2.ops, {**roomy, BACKENDS: 4}, p2.counts())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changed_service_ports_match_a_key_by_key_comparison(data: st.DataObject) -> None:
    from backends.ebpf.plan import changed_service_ports

    ports = [sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=EPS) for i in range(8)]
    new = list(ports)
    for _ in range(data.draw(st.integers(0, 4))):
        what = data.draw(st.sampled_from(["edit", "remove", "add", "to-end", "shuffle"]))
        if not new and what != "add":
            continue
        i = data.draw(st.integers(0, max(len(new) - 1, 0)))
        if what == "edit":
            new[i] = sport(new[i].name.name, cluster_ip=new[i].cluster_ip, endpoints=EPS[:1])
        elif what == "remove":
            del new[i]
        elif what == "add":
            new.append(sport(f"n{len(new)}", cluster_ip="10.96.2.1"))
        elif what == "to-end":
            new.append(new.pop(i))
        else:
            new = data.draw(st.permutations(new))
    before, after = state(*ports), state(*new)
    brute = {
        sp.key
        for k in before.service_ports.keys() | after.service_ports.keys()
        if (sp := before.service_ports.get(k) or after.service_ports[k])
        and before.service_ports.get(k) != after.service_ports.get(k)
    }
    assert changed_service_ports(before, after) == brute
