"""The iptables renderer (pure): golden payloads, rule-level semantics, partial syncs.

Golden files live in tests/unit/golden/iptables/; regenerate them after an intended
change with `LBD_UPDATE_GOLDEN=1 venv/bin/pytest tests/unit/test_iptables_render.py` and
review the diff like code. The read-back parsers (status, cleanup) and the pure half of the
UDP conntrack hygiene are tested here too: they are the renderer's inverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import FrontendStatus
from backends.conntrack import stale_udp_flows
from backends.iptables import render
from backends.iptables.render import JUMPS, Renderer, render_full, render_partial
from backends.iptables.status import frontends, parse_save, removal_payload
from lbd.model.state import (
    Endpoint,
    IPFamily,
    Protocol,
    ProxyState,
    ServicePort,
    ServicePortName,
)

GOLDEN = Path(__file__).parent / "golden" / "iptables"
V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
BUILTIN = {
    "nat": {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
    "filter": {"INPUT", "FORWARD", "OUTPUT"},
    "mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
}


# --- building states ---------------------------------------------------------------------


def ep(ip: str, port: int = 8080, *, local: bool = False) -> Endpoint:
    return Endpoint(ip=ip, port=port, node_name="node-a" if local else "node-b", is_local=local)


def sport(
    name: str = "web",
    *,
    ns: str = "default",
    port_name: str = "http",
    protocol: Protocol = TCP,
    family: IPFamily = V4,
    cluster_ip: str = "10.96.0.10",
    port: int = 80,
    endpoints: tuple[Endpoint, ...] = (),
    **kw: object,
) -> ServicePort:
    """A service port; `endpoints` become the cluster endpoints, the local ones the local."""
    kw.setdefault("cluster_endpoints", endpoints)
    kw.setdefault("local_endpoints", tuple(e for e in endpoints if e.is_local))
    kw.setdefault("all_endpoints", endpoints)
    return ServicePort(
        name=ServicePortName(ns, name, port_name, protocol),
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
        service_ports={(p.name, p.family): p for p in ports},
        **kw,  # type: ignore[arg-type]
    )


THREE = (ep("10.244.1.5"), ep("10.244.2.6"), ep("10.244.3.7"))
THREE_LOCAL = tuple(e._replace(is_local=True, node_name="node-a") for e in THREE)


def golden_states() -> dict[str, tuple[ProxyState, IPFamily]]:
    v6_eps = (ep("fd00:244::5"), ep("fd00:244::6"))
    return {
        "clusterip_three_endpoints": (state(sport(endpoints=THREE)), V4),
        "session_affinity": (
            state(sport(endpoints=THREE[:2], session_affinity_timeout=10800)),
            V4,
        ),
        "nodeport_etp_local": (
            state(
                sport(
                    node_port=30080,
                    external_policy_local=True,
                    health_check_node_port=32000,
                    endpoints=(ep("10.244.1.5", local=True), ep("10.244.2.6")),
                )
            ),
            V4,
        ),
        "loadbalancer_source_ranges": (
            state(
                sport(
                    "lb",
                    port=443,
                    node_port=30443,
                    load_balancer_ips=("192.0.2.10",),
                    load_balancer_source_ranges=("198.51.100.0/24", "192.168.0.0/24"),
                    endpoints=THREE[:2],
                )
            ),
            V4,
        ),
        "external_ips": (
            state(sport(external_ips=("203.0.113.5",), port=443, endpoints=THREE[:2])),
            V4,
        ),
        "no_endpoints": (
            state(
                sport(
                    node_port=30080,
                    external_ips=("203.0.113.5",),
                    load_balancer_ips=("192.0.2.10",),
                )
            ),
            V4,
        ),
        "itp_local_no_local_endpoints": (
            state(sport(internal_policy_local=True, endpoints=THREE[:2])),
            V4,
        ),
        "dual_stack_v6": (
            state(
                sport(endpoints=THREE[:2]),
                sport(family=V6, cluster_ip="fd00:96::10", endpoints=v6_eps, node_port=30080),
                sport("idle", family=V6, cluster_ip="fd00:96::11"),
            ),
            V6,
        ),
        "sctp": (state(sport("sig", protocol=SCTP, port=3868, endpoints=THREE[:2])), V4),
        "masquerade_helper_nodeport_addresses": (
            state(
                sport(node_port=30080, endpoints=THREE[:1]),
                cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"),
                nodeport_addresses=("192.168.0.0/24", "fd00::/8"),
            ),
            V4,
        ),
    }


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("LBD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} missing: run with LBD_UPDATE_GOLDEN=1 to create it"
    want = path.read_text()
    if text != want:
        diff = "".join(
            difflib.unified_diff(
                want.splitlines(True), text.splitlines(True), "golden", "rendered", n=2
            )
        )
        pytest.fail(f"{name}: rendering differs from {path.name}:\n{diff[:6000]}")


# --- parsing payloads ---------------------------------------------------------------------


def rules(payload: str, table: str = "nat") -> list[list[str]]:
    """The -A/-I lines of one table, tokenised like iptables-restore does."""
    out, current = [], None
    for line in payload.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(("-A ", "-I ")):
            out.append(shlex.split(line))
    return out


def chain_rules(payload: str, chain: str, table: str = "nat") -> list[list[str]]:
    return [r for r in rules(payload, table) if r[0] == "-A" and r[1] == chain]


def opt(rule: list[str], name: str) -> str | None:
    return rule[rule.index(name) + 1] if name in rule else None


def endpoint_picks(rules_: list[list[str]]) -> list[list[str]]:
    """The rules of an SVC/SVL chain that pick an endpoint: a jump to its SEP chain, or a
    DNAT straight to it."""
    return [r for r in rules_ if opt(r, "-j") == "DNAT" or opt(r, "-j").startswith("LBD-SEP-")]


def chain_of(payload: str, prefix: str) -> str:
    names = [ln[1:].split()[0] for ln in payload.splitlines() if ln.startswith(f":{prefix}")]
    assert len(names) == 1, names
    return names[0]


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(golden_states()))
def test_golden_full_payload(name: str) -> None:
    st_, family = golden_states()[name]
    check_golden(name, render_full(st_, family))


def test_golden_partial_payload_after_one_endpoint_change() -> None:
    other = sport("api", cluster_ip="10.96.0.20", endpoints=(ep("10.244.4.8"),))
    before = state(sport(endpoints=THREE), other)
    after = state(sport(endpoints=(THREE[0], THREE[2], ep("10.244.9.9"))), other)
    render_full(before, V4)
    payload = render_partial(before, after, V4)
    assert payload is not None
    check_golden("partial_endpoint_change", payload)


# --- what a packet meets -----------------------------------------------------------------


def test_endpoint_choice_is_uniform_over_three_endpoints() -> None:
    payload = render_full(state(sport(endpoints=THREE)), V4)
    svc = chain_of(payload, "LBD-SVC-")
    to_endpoints = endpoint_picks(chain_rules(payload, svc))
    probs = [opt(r, "--probability") for r in to_endpoints]
    assert probs == ["0.3333333333", "0.5000000000", None]  # the last rule always matches
    # Each endpoint is reached with probability 1/3 (up to the 10-decimal formatting).
    remaining, shares = Fraction(1), []
    for p in probs:
        share = remaining * (Fraction(p) if p else 1)
        shares.append(share)
        remaining -= share
    assert all(abs(s - Fraction(1, 3)) < Fraction(1, 10**9) for s in shares)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 64])
def test_every_endpoint_gets_one_statistic_rule_and_the_last_is_unconditional(n: int) -> None:
    eps = tuple(ep(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(n))
    payload = render_full(state(sport(endpoints=eps)), V4)
    svc = chain_rules(payload, chain_of(payload, "LBD-SVC-"))
    jumps = endpoint_picks(svc)
    assert len(jumps) == n
    assert [opt(r, "--probability") for r in jumps] == [
        f"{1 / (n - i):.10f}" for i in range(n - 1)
    ] + [None]
    # Remote endpoints without affinity are DNATed straight from the SVC chain: no SEP
    # chain (no hairpin rule is needed for a pod on another node).
    assert [opt(r, "--to-destination") for r in jumps] == [f"{e.ip}:{e.port}" for e in eps]
    assert not [c for c in declared(payload) if c.startswith("LBD-SEP-")]


def test_client_ip_affinity_checks_recent_lists_before_choosing_and_records_the_choice() -> None:
    payload = render_full(state(sport(endpoints=THREE, session_affinity_timeout=600)), V4)
    svc = chain_rules(payload, chain_of(payload, "LBD-SVC-"))
    svc = [r for r in svc if opt(r, "-j").startswith("LBD-SEP-")]
    recent = [r for r in svc if "recent" in r]
    assert len(recent) == 3 and svc[:3] == recent  # before any statistic rule
    for r in recent:
        assert opt(r, "--name") == opt(r, "-j") and opt(r, "--seconds") == "600"
        assert "--rcheck" in r and "--reap" in r
        sep = chain_rules(payload, opt(r, "-j"))
        (dnat,) = [x for x in sep if "DNAT" in x]
        assert "--set" in dnat and opt(dnat, "--name") == opt(r, "-j")


def test_hairpin_and_off_cluster_clients_are_masqueraded_but_pods_are_not() -> None:
    payload = render_full(state(sport(endpoints=THREE_LOCAL[:1] + THREE[1:2])), V4)
    svc = chain_rules(payload, chain_of(payload, "LBD-SVC-"))
    masq = [r for r in svc if opt(r, "-j") == "LBD-MARK-MASQ"]
    assert len(masq) == 1 and masq[0][masq[0].index("-s") - 1] == "!"
    assert opt(masq[0], "-s") == "10.244.0.0/16"
    # Only the local endpoint has a SEP chain, which masquerades the endpoint reaching
    # itself (hairpin); the remote one is DNATed straight from the SVC chain.
    sep = chain_rules(payload, chain_of(payload, "LBD-SEP-"))
    assert opt(sep[0], "-s") == "10.244.1.5" and opt(sep[0], "-j") == "LBD-MARK-MASQ"
    assert opt(sep[1], "--to-destination") == "10.244.1.5:8080"
    (direct,) = [r for r in svc if opt(r, "-j") == "DNAT"]
    assert opt(direct, "--to-destination") == "10.244.2.6:8080"
    post = chain_rules(payload, "LBD-POSTROUTING")
    assert post[-1][-2:] == ["MASQUERADE", "--random-fully"]


def test_masquerade_all_marks_every_cluster_ip_connection() -> None:
    payload = render_full(state(sport(endpoints=THREE[:1]), masquerade_all=True), V4)
    svc = chain_rules(payload, chain_of(payload, "LBD-SVC-"))
    (masq,) = [r for r in svc if opt(r, "-j") == "LBD-MARK-MASQ"]
    assert "-s" not in masq


def test_without_cluster_cidrs_nothing_is_masqueraded_for_cluster_ips() -> None:
    payload = render_full(state(sport(endpoints=THREE[:1]), cluster_cidrs=()), V4)
    svc = chain_rules(payload, chain_of(payload, "LBD-SVC-"))
    assert not [r for r in svc if opt(r, "-j") == "LBD-MARK-MASQ"]


def test_external_traffic_policy_cluster_masquerades_and_uses_all_endpoints() -> None:
    sp = sport(node_port=30080, endpoints=(ep("10.244.1.5", local=True), ep("10.244.2.6")))
    payload = render_full(state(sp), V4)
    ext = chain_rules(payload, chain_of(payload, "LBD-EXT-"))
    assert opt(ext[0], "-j") == "LBD-MARK-MASQ" and "-s" not in ext[0]
    assert opt(ext[-1], "-j").startswith("LBD-SVC-")
    assert "LBD-SVL-" not in payload


def test_external_traffic_policy_local_keeps_source_but_short_circuits_cluster_traffic() -> None:
    sp = sport(
        node_port=30080,
        external_policy_local=True,
        endpoints=(ep("10.244.1.5", local=True), ep("10.244.2.6")),
    )
    payload = render_full(state(sp), V4)
    svc, svl = chain_of(payload, "LBD-SVC-"), chain_of(payload, "LBD-SVL-")
    ext = chain_rules(payload, chain_of(payload, "LBD-EXT-"))
    # Pods (cluster CIDR) and the node itself (src-type LOCAL, masqueraded) go to all
    # endpoints; everyone else goes to this node's endpoints with their source intact.
    assert [opt(r, "-s") for r in ext if opt(r, "-j") == svc] == ["10.244.0.0/16", None]
    assert [opt(r, "--src-type") for r in ext if opt(r, "-j") == "LBD-MARK-MASQ"] == ["LOCAL"]
    assert ext[-1] == ["-A", ext[-1][1], "-j", svl]
    local = [opt(r, "-j") for r in chain_rules(payload, svl)]
    assert len(local) == 1
    dnat = [r for r in chain_rules(payload, local[0]) if "DNAT" in r]
    assert opt(dnat[0], "--to-destination") == "10.244.1.5:8080"


def test_external_traffic_policy_local_without_local_endpoints_drops_outside_traffic() -> None:
    sp = sport(node_port=30080, external_policy_local=True, endpoints=(ep("10.244.2.6"),))
    payload = render_full(state(sp), V4)
    ext = chain_rules(payload, chain_of(payload, "LBD-EXT-"))
    assert not [r for r in ext if opt(r, "-j").startswith("LBD-SVL-")]  # falls through...
    drops = rules(payload, "filter")
    (drop,) = [r for r in drops if opt(r, "--dport") == "30080"]
    assert drop[1] == "LBD-EXTERNAL-SERVICES" and drop[-1] == "DROP"  # ...to this DROP
    assert opt(drop, "--dst-type") == "LOCAL"


def test_no_endpoints_rejects_every_frontend_and_programs_no_nat() -> None:
    sp = sport(node_port=30080, external_ips=("203.0.113.5",), load_balancer_ips=("192.0.2.1",))
    payload = render_full(state(sp), V4)
    assert not [r for r in rules(payload) if "default/web:http" in " ".join(r)]
    rejects = [r for r in rules(payload, "filter") if "REJECT" in r]
    assert {opt(r, "-d") for r in rejects} == {"10.96.0.10", "203.0.113.5", "192.0.2.1", None}
    assert all(opt(r, "--reject-with") == "icmp-port-unreachable" for r in rejects)


def test_ipv6_rejects_with_icmp6() -> None:
    payload = render_full(state(sport(family=V6, cluster_ip="fd00:96::1")), V6)
    (reject,) = [r for r in rules(payload, "filter") if "REJECT" in r]
    assert opt(reject, "--reject-with") == "icmp6-port-unreachable"
    assert "! -d ::1/128" in payload and "127.0.0.0/8" not in payload


def test_internal_traffic_policy_local_without_local_endpoints_drops_cluster_ip() -> None:
    payload = render_full(state(sport(internal_policy_local=True, endpoints=THREE)), V4)
    (drop,) = [r for r in rules(payload, "filter") if opt(r, "-d") == "10.96.0.10"]
    assert drop[1] == "LBD-SERVICES" and drop[-1] == "DROP"
    assert not [r for r in rules(payload) if opt(r, "-d") == "10.96.0.10"]


def test_load_balancer_source_ranges_let_listed_sources_in_and_drop_the_rest() -> None:
    sp = sport(
        load_balancer_ips=("192.0.2.10",),
        load_balancer_source_ranges=("198.51.100.0/24",),
        endpoints=THREE,
    )
    payload = render_full(state(sp), V4)
    fw = chain_of(payload, "LBD-FW-")
    (lb,) = [r for r in chain_rules(payload, "LBD-SERVICES") if opt(r, "-d") == "192.0.2.10"]
    assert opt(lb, "-j") == fw
    allowed = [opt(r, "-s") for r in chain_rules(payload, fw) if opt(r, "-j")]
    assert allowed == ["198.51.100.0/24"]  # the node (192.168.0.10) is not in the range
    (drop,) = chain_rules(payload, "LBD-PROXY-FIREWALL", "filter")
    assert opt(drop, "-d") == "192.0.2.10" and drop[-1] == "DROP"


def test_external_and_lb_ips_claim_only_the_service_port_and_protocol() -> None:
    sp = sport(
        protocol=UDP, port=53, external_ips=("203.0.113.5",), load_balancer_ips=("192.0.2.9",)
    )
    payload = render_full(state(dataclasses.replace(sp, cluster_endpoints=THREE)), V4)
    for r in chain_rules(payload, "LBD-SERVICES"):
        if opt(r, "-d") in ("203.0.113.5", "192.0.2.9"):
            assert opt(r, "-p") == "udp" and opt(r, "--dport") == "53"


def test_node_ports_match_local_addresses_except_loopback_by_default() -> None:
    payload = render_full(state(sport(node_port=30080, endpoints=THREE)), V4)
    last = chain_rules(payload, "LBD-SERVICES")[-1]
    assert opt(last, "-j") == "LBD-NODEPORTS" and opt(last, "--dst-type") == "LOCAL"
    assert last[last.index("-d") - 1] == "!" and opt(last, "-d") == "127.0.0.0/8"
    (np,) = chain_rules(payload, "LBD-NODEPORTS")
    assert opt(np, "--dport") == "30080" and opt(np, "-j").startswith("LBD-EXT-")


def test_nodeport_addresses_restrict_node_ports_to_those_cidrs() -> None:
    st_ = state(sport(node_port=30080, endpoints=THREE), nodeport_addresses=("192.168.0.0/24",))
    jumps = [r for r in chain_rules(render_full(st_, V4), "LBD-SERVICES") if "LBD-NODEPORTS" in r]
    assert [opt(r, "-d") for r in jumps] == ["192.168.0.0/24"]


def test_nodeport_addresses_never_include_loopback() -> None:
    def nodeport_rules(*cidrs: str) -> list[list[str]]:
        st_ = state(sport(node_port=30080, endpoints=THREE), nodeport_addresses=cidrs)
        tail = chain_rules(render_full(st_, V4), "LBD-SERVICES")
        return [r for r in tail if opt(r, "-j") in ("LBD-NODEPORTS", "RETURN")]

    assert not [r for r in nodeport_rules("127.0.0.0/8") if "LBD-NODEPORTS" in r]
    guard, jump = nodeport_rules("0.0.0.0/1")
    assert (opt(guard, "-d"), opt(guard, "-j")) == ("127.0.0.0/8", "RETURN")
    assert (opt(jump, "-d"), opt(jump, "-j")) == ("0.0.0.0/1", "LBD-NODEPORTS")
    (everywhere,) = nodeport_rules("0.0.0.0/0")
    assert opt(everywhere, "-d") == "127.0.0.0/8" and "!" in everywhere


def test_several_cluster_cidrs_masquerade_sources_outside_all_of_them() -> None:
    st_ = state(sport(endpoints=THREE), cluster_cidrs=("10.244.0.0/16", "10.245.0.0/16"))
    payload = render_full(st_, V4)
    helper = chain_rules(payload, "LBD-MASQ-OFF-CLUSTER")
    assert [(opt(r, "-s"), opt(r, "-j")) for r in helper] == [
        ("10.244.0.0/16", "RETURN"),
        ("10.245.0.0/16", "RETURN"),
        (None, "LBD-MARK-MASQ"),
    ]


@pytest.mark.parametrize("protocol", [TCP, UDP, SCTP])
def test_each_protocol_matches_its_own_module(protocol: Protocol) -> None:
    payload = render_full(state(sport(protocol=protocol, endpoints=THREE[:1])), V4)
    p = protocol.value.lower()
    for r in rules(payload):
        if "--dport" in r or "DNAT" in r:
            assert opt(r, "-p") == p and opt(r, "-m") in (p, "comment")


# --- what lbd may touch ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(golden_states()))
def test_rules_are_written_only_to_lbd_chains_plus_one_jump_per_builtin_hook(name: str) -> None:
    st_, family = golden_states()[name]
    payload = render_full(st_, family)
    table = None
    inserted = []
    for line in payload.splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        tokens = shlex.split(line)
        op = tokens[0]
        assert op in (":", "-A", "-I", "-X", "COMMIT") or op.startswith(":"), line
        if op.startswith(":"):
            assert op[1:].startswith("LBD-"), line
        elif op in ("-A", "-X"):
            assert tokens[1].startswith("LBD-"), line
        elif op == "-I":
            assert tokens[1] in BUILTIN[table] and tokens[2] == "1", line
            assert opt(tokens, "-j").startswith("LBD-"), line
            inserted.append((table, tokens[1], opt(tokens, "-j")))
    assert sorted(inserted) == sorted((j.table, j.chain, j.target) for j in JUMPS)


def test_jumps_are_only_inserted_when_asked_and_keep_their_order() -> None:
    st_ = state(sport(endpoints=THREE))
    assert "-I " not in render_full(st_, V4, jumps=())
    payload = render_full(st_, V4)
    # Inserting each at position 1 in reverse leaves them in JUMPS order.
    inserted = [(r[1], opt(r, "-j")) for r in rules(payload, "filter") if r[0] == "-I"]
    inserted.reverse()
    want = [(j.chain, j.target) for j in JUMPS if j.table == "filter"]
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        assert [t for c, t in inserted if c == chain] == [t for c, t in want if c == chain]


def test_untrusted_text_never_breaks_a_line_or_its_quoting() -> None:
    evil = sport(
        'x" -j ACCEPT\n-A INPUT',
        ns="ns\r\n*filter",
        port_name="p'$(reboot)",
        endpoints=(ep("10.244.1.5"), ep("10.0.0.1 -j ACCEPT")),
        external_ips=("1.2.3.4\n-F",),
    )
    payload = render_full(state(evil, sport("fine", cluster_ip="10.96.0.11")), V4)
    for line in payload.splitlines():
        tokens = shlex.split(line)  # balanced quotes on every line
        assert tokens[0] in ("COMMIT", "-A", "-I", "-X") or line[0] in "*:", line
        if "--comment" in tokens:
            comment = opt(tokens, "--comment")
            assert set(comment) <= render._SAFE_CHARS | {" ", ";", ",", ">"}, comment
    assert "ACCEPT\n" not in payload.replace("-j ACCEPT\n", "")
    assert "10.0.0.1" not in payload and "1.2.3.4" not in payload
    assert payload.count("*filter") == 1


def test_chain_names_are_kube_proxy_shaped_and_distinct_per_family_and_endpoint() -> None:
    a, b = sport(endpoints=THREE), sport(family=V6, cluster_ip="fd00::1")
    assert render.service_chain_suffix(a) != render.service_chain_suffix(b)
    seps = {render.endpoint_chain(a, e) for e in THREE}
    assert len(seps) == 3
    for name in seps | {"LBD-SVC-" + render.service_chain_suffix(a)}:
        assert len(name) <= 28
        assert set(name.split("-")[-1]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        assert len(name.split("-")[-1]) == 16


def test_chain_hash_matches_base32_of_sha256() -> None:
    import base64
    import hashlib

    for text in ("", "default/web:http/tcp/v4", "x" * 300):
        want = base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()
        assert render.chain_hash(text) == want


# --- partial syncs -----------------------------------------------------------------------


def declared(payload: str, table: str = "nat") -> set[str]:
    out, current = set(), None
    for line in payload.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(":"):
            out.add(line[1:].split()[0])
    return out


def test_partial_mentions_only_changed_service_ports_chains() -> None:
    web = sport(endpoints=THREE_LOCAL)
    api = sport("api", cluster_ip="10.96.0.20", endpoints=THREE_LOCAL)
    before = state(web, api)
    full = render_full(before, V4)
    after = state(
        dataclasses.replace(
            web, cluster_endpoints=THREE_LOCAL[:2], local_endpoints=THREE_LOCAL[:2]
        ),
        api,
    )
    payload = render_partial(before, after, V4)
    assert payload is not None
    api_chains = {c for c in declared(full) if c.startswith("LBD-")} - declared(
        render_full(state(web), V4)
    )
    # api's chains are neither declared (flushed), appended to, nor deleted; only
    # LBD-SERVICES still jumps to its SVC chain.
    assert api_chains and not (api_chains & declared(payload))
    assert not [r for r in rules(payload) if r[1] in api_chains]
    assert not [ln for ln in payload.splitlines() if ln.startswith("-X") and ln[3:] in api_chains]
    removed_sep = render.endpoint_chain(web, THREE_LOCAL[2])
    assert f"-X {removed_sep}" in payload.splitlines()
    assert "*mangle" not in payload  # the canary is left alone
    # LBD-SERVICES is rewritten whole: both services' cluster IPs are in it.
    assert {opt(r, "-d") for r in chain_rules(payload, "LBD-SERVICES")} >= {
        "10.96.0.10",
        "10.96.0.20",
    }


def test_partial_deletes_every_chain_of_a_deleted_service_port() -> None:
    web, api = sport(endpoints=THREE), sport("api", cluster_ip="10.96.0.20", node_port=30001)
    api = dataclasses.replace(api, cluster_endpoints=THREE[:1])
    before = state(web, api)
    only_api = declared(render_full(before, V4)) - declared(render_full(state(web), V4))
    payload = render_partial(before, state(web), V4)
    assert payload is not None
    assert {ln.split()[1] for ln in payload.splitlines() if ln.startswith("-X ")} == only_api


def test_partial_needs_a_previous_state_and_unchanged_node_settings() -> None:
    st_ = state(sport(endpoints=THREE))
    assert render_partial(None, st_, V4) is None
    moved = dataclasses.replace(st_, cluster_cidrs=("10.250.0.0/16",))
    assert render_partial(st_, moved, V4) is None
    np = dataclasses.replace(st_, nodeport_addresses=("192.168.0.0/24",))
    assert render_partial(st_, np, V4) is None


def test_full_render_deletes_stale_chains_the_kernel_still_holds() -> None:
    payload = render_full(
        state(sport(endpoints=THREE)),
        V4,
        existing_chains=["LBD-SVC-GONEGONEGONEGONE", "LBD-SERVICES", "KUBE-SVC-X", "MYCHAIN"],
    )
    assert [ln for ln in payload.splitlines() if ln.startswith("-X")] == [
        "-X LBD-SVC-GONEGONEGONEGONE"
    ]


def test_memoised_rendering_follows_changes() -> None:
    r = Renderer()
    a = state(sport(endpoints=THREE))
    first = r.full(a, V4).text
    assert r.full(state(sport(endpoints=THREE)), V4).text == first  # equal, new objects
    changed = r.full(state(sport(endpoints=THREE[:1])), V4).text
    assert changed != first and "10.244.2.6" not in changed
    assert r.full(a, V4).text == first


class FakeKernel:
    """iptables-restore --noflush semantics, enough to replay lbd's payloads."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {}

    def restore(self, payload: str) -> None:
        t: dict[str, list[str]] = {}
        for line in payload.splitlines():
            if line.startswith("*"):
                t = self.tables.setdefault(line[1:], {})
            elif line == "COMMIT":
                continue
            elif line.startswith(":"):
                t[line[1:].split()[0]] = []  # declaring an existing chain flushes it
            elif line.startswith("-A "):
                chain, spec = line[3:].split(" ", 1)
                assert chain in t, f"append to missing chain: {line}"
                target = spec.split(" -j ")[-1].split()[0] if " -j " in spec else ""
                assert not target.startswith("LBD-") or target in t, f"missing target: {line}"
                t[chain].append(spec)
            elif line.startswith("-I "):
                chain, pos, spec = line[3:].split(" ", 2)
                t.setdefault(chain, []).insert(int(pos) - 1, spec)
            elif line.startswith("-D "):
                chain, spec = line[3:].split(" ", 1)
                assert chain in t and spec in t[chain], f"deleting a missing rule: {line}"
                t[chain].remove(spec)
            elif line.startswith("-X "):
                chain = line[3:]
                assert not t[chain], f"deleting non-empty {chain}"
                assert not any(f"-j {chain}" in r for rs in t.values() for r in rs), line
                del t[chain]
            else:
                raise AssertionError(f"unexpected line {line!r}")


NAMES = ["a", "b", "c", "d"]
IPS = ["10.244.1.1", "10.244.1.2", "10.244.2.3", "10.244.3.4"]


@st.composite
def states(draw: st.DrawFn) -> ProxyState:
    ports = []
    for i, name in enumerate(draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))):
        eps = tuple(
            ep(ip, local=ip.startswith("10.244.1."))
            for ip in draw(st.lists(st.sampled_from(IPS), unique=True, max_size=4))
        )
        ports.append(
            sport(
                name,
                cluster_ip=f"10.96.0.{i + 1}",
                protocol=draw(st.sampled_from([TCP, UDP])),
                node_port=draw(st.sampled_from([0, 30000 + i])),
                load_balancer_ips=draw(st.sampled_from([(), (f"192.0.2.{i + 1}",)])),
                load_balancer_source_ranges=draw(st.sampled_from([(), ("198.51.100.0/24",)])),
                external_policy_local=draw(st.booleans()),
                internal_policy_local=draw(st.booleans()),
                session_affinity_timeout=draw(st.sampled_from([0, 30])),
                endpoints=eps,
            )
        )
    return state(*ports)


@settings(max_examples=150, deadline=None)
@given(states(), states())
def test_partial_after_full_leaves_the_same_tables_as_a_fresh_full(
    before: ProxyState, after: ProxyState
) -> None:
    incremental = FakeKernel()
    r = Renderer()
    first = r.full(before, V4)
    incremental.restore(first.text)
    partial = r.partial(before, after, V4, first.chains)
    assert partial is not None
    incremental.restore(partial.text)
    fresh = FakeKernel()
    fresh.restore(Renderer().full(after, V4).text)
    assert incremental.tables == fresh.tables
    assert partial.chains == {c for c in fresh.tables["nat"] if c.startswith("LBD-")} - {
        *render.NAT_BASE_CHAINS,
        render.CANARY,
    }
    # A full render on top of an older kernel removes what is stale just the same.
    again = FakeKernel()
    again.restore(first.text)
    again.restore(Renderer().full(after, V4, existing_chains=first.chains, jumps=()).text)
    assert again.tables == fresh.tables


# --- reading back ------------------------------------------------------------------------


def test_status_reads_every_frontend_and_its_endpoints_back_from_a_payload() -> None:
    sp = sport(
        node_port=30080,
        load_balancer_ips=("192.0.2.10",),
        load_balancer_source_ranges=("198.51.100.0/24",),
        external_ips=("203.0.113.5",),
        external_policy_local=True,
        endpoints=(ep("10.244.1.5", local=True), ep("10.244.2.6")),
    )
    idle = sport("idle", cluster_ip="10.96.0.99", protocol=UDP, port=53, node_port=30053)
    v6 = sport(family=V6, cluster_ip="fd00:96::10", endpoints=(ep("fd00:244::5"),))
    v4_payload = render_full(state(sp, idle, v6), V4)
    v6_payload = render_full(state(sp, idle, v6), V6)
    got = frontends(v4_payload, v4_payload) + frontends(v6_payload, v6_payload)
    both, local = ("10.244.1.5:8080", "10.244.2.6:8080"), ("10.244.1.5:8080",)
    assert set(got) == set(
        [
            FrontendStatus("default/web:http", "ClusterIP", "10.96.0.10:80/TCP", both),
            FrontendStatus("default/web:http", "ExternalIP", "203.0.113.5:80/TCP", local),
            FrontendStatus("default/web:http", "LoadBalancer", "192.0.2.10:80/TCP", local),
            FrontendStatus("default/web:http", "NodePort", "*:30080/TCP", local),
            FrontendStatus("default/idle:http", "ClusterIP", "10.96.0.99:53/UDP", ()),
            FrontendStatus("default/idle:http", "NodePort", "*:30053/UDP", ()),
            FrontendStatus(
                "default/web:http", "ClusterIP", "[fd00:96::10]:80/TCP", ("[fd00:244::5]:8080",)
            ),
        ]
    )


def test_status_parses_iptables_save_spelling() -> None:
    saved = """# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:LBD-SERVICES - [0:0]
:LBD-SVC-AAAA - [0:0]
:LBD-SEP-BBBB - [0:0]
-A PREROUTING -m comment --comment "lbd service portals" -j LBD-SERVICES
-A LBD-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" \
-m tcp --dport 80 -j LBD-SVC-AAAA
-A LBD-SVC-AAAA -m comment --comment "default/web:http -> 10.244.1.5:8080" -j LBD-SEP-BBBB
-A LBD-SEP-BBBB -p tcp -m comment --comment default/web:http -m tcp \
-j DNAT --to-destination 10.244.1.5:8080
COMMIT
""".replace("\\\n", "")
    assert frontends(saved) == [
        FrontendStatus("default/web:http", "ClusterIP", "10.96.0.10:80/TCP", ("10.244.1.5:8080",))
    ]


def test_removal_payload_deletes_owned_chains_and_jumps_to_them_only() -> None:
    saved = """*nat
:PREROUTING ACCEPT [0:0]
:LBD-SERVICES - [0:0]
:KUBE-SERVICES - [0:0]
:MYCHAIN - [0:0]
-A PREROUTING -m comment --comment "lbd service portals" -j LBD-SERVICES
-A PREROUTING -j KUBE-SERVICES
-A PREROUTING -s 10.0.0.0/8 -j MYCHAIN
-A MYCHAIN -j RETURN
-A LBD-SERVICES -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
"""
    payload = removal_payload(saved, lambda c: c.startswith("LBD-"))
    assert payload == (
        "*nat\n:LBD-SERVICES - [0:0]\n"
        '-D PREROUTING -m comment --comment "lbd service portals" -j LBD-SERVICES\n'
        "-X LBD-SERVICES\nCOMMIT\n"
    )
    assert removal_payload(saved, lambda c: c.startswith("NONE-")) is None
    assert parse_save(saved)["nat"].chains["PREROUTING"] == "ACCEPT"


# --- UDP conntrack hygiene (pure half) ---------------------------------------------------


def udp(*eps: Endpoint, **kw: object) -> ServicePort:
    return sport("dns", protocol=UDP, port=53, endpoints=eps, **kw)


def test_removed_udp_endpoint_makes_its_flows_stale_but_not_the_others() -> None:
    before = state(udp(ep("10.244.1.5", 53), ep("10.244.2.6", 53), node_port=30053))
    after = state(udp(ep("10.244.2.6", 53), node_port=30053))
    (flows,) = stale_udp_flows(before, after)
    assert flows.reason == "endpoints removed"
    assert flows.matches("10.96.0.10", 53, "10.244.1.5", 53)
    assert flows.matches("192.168.0.10", 30053, "10.244.1.5", 53)  # via the node port
    assert not flows.matches("10.96.0.10", 53, "10.244.2.6", 53)
    assert not flows.matches("10.96.0.99", 53, "10.244.1.5", 53)  # another service's IP


def test_first_udp_endpoints_make_flows_to_the_frontends_stale() -> None:
    before, after = state(udp()), state(udp(ep("10.244.2.6", 53)))
    (flows,) = stale_udp_flows(before, after)
    assert flows.reason == "first endpoints"
    assert flows.matches("10.96.0.10", 53, "10.96.0.10", 53)  # never DNATed
    assert not flows.matches("10.96.0.10", 53, "10.244.2.6", 53)


def test_deleted_udp_service_port_makes_all_its_flows_stale() -> None:
    (flows,) = stale_udp_flows(state(udp(ep("10.244.2.6", 53))), state())
    assert flows.reason == "service port deleted"
    assert flows.matches("10.96.0.10", 53, "10.244.2.6", 53)


def test_unchanged_tcp_or_growing_services_need_no_conntrack_cleanup() -> None:
    tcp = sport(endpoints=THREE[:1])
    grown = udp(ep("10.244.1.5", 53), ep("10.244.2.6", 53))
    before = state(tcp, udp(ep("10.244.1.5", 53)))
    assert stale_udp_flows(before, before) == []
    assert stale_udp_flows(before, state(sport(endpoints=THREE), grown)) == []


def test_a_state_that_lists_its_changes_is_checked_only_there() -> None:
    dns = udp(ep("10.244.1.5", 53), ep("10.244.2.6", 53))
    other = sport("other", protocol=UDP, port=54, endpoints=(ep("10.244.1.5", 54),))
    before = dataclasses.replace(state(dns, other), revision=7)
    shrunk = udp(ep("10.244.2.6", 53))
    after = state(shrunk)  # "other" deleted too
    listed = dataclasses.replace(
        after, revision=8, changed_from=7, changed=frozenset({(shrunk.name, V4), (other.name, V4)})
    )
    assert stale_udp_flows(before, listed) == stale_udp_flows(before, after)
    assert {f.reason for f in stale_udp_flows(before, listed)} == {
        "endpoints removed",
        "service port deleted",
    }
    # the list is trusted: a change it leaves out is not looked for
    partial = dataclasses.replace(listed, changed=frozenset({(other.name, V4)}))
    assert [f.reason for f in stale_udp_flows(before, partial)] == ["service port deleted"]


def test_first_sync_checks_every_udp_service_with_endpoints() -> None:
    new = state(udp(ep("10.244.1.5", 53)), sport(endpoints=THREE))
    (flows,) = stale_udp_flows(None, new)
    assert flows.reason == "resync" and flows.keep == {("10.244.1.5", 53)}


def test_large_clusters_leave_per_endpoint_comments_out() -> None:
    # kube-proxy's threshold: more than 1000 endpoints in all. Service-level rules keep
    # their comments (lbd status reads frontends from them); endpoint rules lose them.
    eps = tuple(ep(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(11))
    small = state(*(sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=eps) for i in range(90)))
    large = state(*(sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=eps) for i in range(91)))
    for cluster, commented in ((small, True), (large, False)):
        payload = render_full(cluster, V4)
        picks = endpoint_picks(chain_rules(payload, chain_of_service(payload, "s7")))
        assert len(picks) == 11
        assert all(("--comment" in r) == commented for r in picks)
        assert all("--comment" in r for r in chain_rules(payload, "LBD-SERVICES"))


def chain_of_service(payload: str, name: str) -> str:
    (rule,) = [
        r
        for r in chain_rules(payload, "LBD-SERVICES")
        if opt(r, "--comment") == f"default/{name}:http cluster IP"
    ]
    return opt(rule, "-j") or ""


def test_a_partial_payload_fails_as_a_whole_when_lbds_nat_chains_were_flushed() -> None:
    kernel = FakeKernel()
    before = state(sport(endpoints=THREE))
    kernel.restore(render_full(before, V4))
    kernel.tables["nat"]["LBD-PROXY-CANARY"] = []  # iptables -t nat -F
    payload = render_partial(before, state(sport(endpoints=THREE[:2])), V4)
    assert payload is not None
    with pytest.raises(AssertionError, match="deleting a missing rule"):
        kernel.restore(payload)
    # nat comes first, so the failing check comes before any table is committed.
    assert payload.index("*nat") < payload.index("*filter")
    assert payload.index("-D LBD-PROXY-CANARY") < payload.index("COMMIT")


def test_an_endpoint_coming_and_going_at_the_large_cluster_threshold_keeps_syncs_partial() -> None:
    eps = tuple(ep(f"10.244.{i // 250}.{i % 250 + 1}") for i in range(10))
    at = state(*(sport(f"s{i}", cluster_ip=f"10.96.1.{i}", endpoints=eps) for i in range(100)))
    ports = dict(at.service_ports)
    key = next(iter(ports))
    over = dataclasses.replace(at, service_ports={
        **ports, key: dataclasses.replace(ports[key], cluster_endpoints=eps + (ep("10.244.9.9"),))
    })  # fmt: skip
    r = render.Renderer()
    r.full(at, V4)  # 1,000 endpoints: not large
    assert r.partial(at, over, V4, frozenset()) is None  # 1,001: large, every rule changes
    r.full(over, V4)
    for prev, new in ((over, at), (at, over), (over, at)):
        payload = r.partial(prev, new, V4, frozenset())
        assert payload is not None and not payload.full  # stays large: partial syncs
        assert "--comment" not in "".join(ln for ln in payload.text.splitlines() if "DNAT" in ln)
