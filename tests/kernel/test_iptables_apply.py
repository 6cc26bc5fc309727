"""The iptables backend against a real kernel, each test in its own network namespace.

Every test creates `lbdt-ipt-<random>`, programs it from outside (`IptablesBackend(netns=)`
runs every tool through `ip netns exec`) and deletes it afterwards; nothing here touches
the namespace pytest runs in. `iptables-save`, `conntrack -L` and real sockets inside the
namespace are the independent witnesses of what the kernel holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from backends.base import FrontendStatus
from backends.iptables import IptablesBackend
from backends.iptables import render as r
from backends.iptables.apply import IptablesError, Tools
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName
from lbd.testing import netns

pytestmark = pytest.mark.kernel

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP = Protocol.TCP, Protocol.UDP
VARIANTS = ["legacy", "nft"]


@pytest.fixture
def ns() -> Iterator[str]:
    with netns.scratch("ipt") as name:
        yield name


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


# --- helpers ------------------------------------------------------------------------------


def ipt(ns: str, variant: str, *args: str, family: IPFamily = V4, check: bool = True) -> str:
    tool = f"{'iptables' if family == V4 else 'ip6tables'}-{variant}"
    return netns.run(ns, [tool, "-w", *args], check=check).stdout


def save(ns: str, variant: str, table: str = "nat", family: IPFamily = V4) -> str:
    tool = f"{'iptables' if family == V4 else 'ip6tables'}-{variant}-save"
    return netns.run(ns, [tool, "-t", table]).stdout


def restore(ns: str, variant: str, payload: str, family: IPFamily = V4) -> None:
    tool = f"{'iptables' if family == V4 else 'ip6tables'}-{variant}-restore"
    netns.run(ns, [tool, "--noflush"], input=payload)


def chains(saved: str) -> set[str]:
    return {ln[1:].split()[0] for ln in saved.splitlines() if ln.startswith(":")}


def ep(ip: str, port: int = 8080, *, local: bool = False) -> Endpoint:
    return Endpoint(ip=ip, port=port, node_name="node-a" if local else "node-b", is_local=local)


def sport(
    name: str = "web",
    *,
    cluster_ip: str = "10.96.0.10",
    port: int = 80,
    protocol: Protocol = TCP,
    family: IPFamily = V4,
    endpoints: tuple[Endpoint, ...] = (),
    **kw: object,
) -> ServicePort:
    kw.setdefault("local_endpoints", tuple(e for e in endpoints if e.is_local))
    return ServicePort(
        name=ServicePortName("default", name, "p", protocol),
        family=family,
        cluster_ip=cluster_ip,
        port=port,
        protocol=protocol,
        cluster_endpoints=endpoints,
        all_endpoints=endpoints,
        **kw,  # type: ignore[arg-type]
    )


def state(*ports: ServicePort, **kw: object) -> ProxyState:
    kw.setdefault("cluster_cidrs", ("10.244.0.0/16", "fd00:244::/64"))
    return ProxyState(
        node_name="node-a",
        node_ips=("192.168.0.10",),
        service_ports={(p.name, p.family): p for p in ports},
        **kw,  # type: ignore[arg-type]
    )


# One endpoint of each service is on this node, so it has its own SEP chain (the others
# are DNATed straight from the SVC chain).
WEB = sport(endpoints=(ep("10.244.1.5"), ep("10.244.2.6"), ep("10.244.3.7", local=True)))
API = sport(
    "api", cluster_ip="10.96.0.20", node_port=30020, endpoints=(ep("10.244.4.8", local=True),)
)


def svc_chain(sp: ServicePort) -> str:
    return r.SVC_PREFIX + r.service_chain_suffix(sp)


# --- syncing ------------------------------------------------------------------------------


def test_full_sync_installs_lbd_chains_and_the_builtin_jumps(ns: str, variant: str) -> None:
    backend = IptablesBackend(variant=variant, netns=ns)
    result = backend.sync(state(WEB, API), full=False)
    assert result.full and result.changed_service_ports == 2

    nat = save(ns, variant)
    assert '-A PREROUTING -m comment --comment "lbd service portals" -j LBD-SERVICES' in nat
    assert '-A OUTPUT -m comment --comment "lbd service portals" -j LBD-SERVICES' in nat
    assert '-A POSTROUTING -m comment --comment "lbd postrouting rules" -j LBD-POSTROUTING' in nat
    assert {svc_chain(WEB), svc_chain(API), "LBD-NODEPORTS", "LBD-MARK-MASQ"} <= chains(nat)
    assert "--to-destination 10.244.3.7:8080" in nat
    filt = save(ns, variant, "filter")
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        assert f"-A {builtin} -m conntrack --ctstate NEW" in filt
    assert ":LBD-PROXY-CANARY" in save(ns, variant, "mangle")
    assert backend.variant == variant and not backend.needs_full_sync()

    # A second sync of the same state changes nothing and inserts no duplicate jumps.
    again = backend.sync(state(WEB, API), full=True)
    assert again.full
    assert save(ns, variant).count("-j LBD-SERVICES") == 2


def test_partial_sync_rewrites_only_the_changed_service_port(ns: str, variant: str) -> None:
    backend = IptablesBackend(variant=variant, netns=ns)
    backend.sync(state(WEB, API), full=True)
    # A hand-made marker in each service's chain shows which chains a sync rewrote.
    for sp in (WEB, API):
        ipt(ns, variant, "-t", "nat", "-A", svc_chain(sp), "-m", "comment", "--comment",
            "hand-made", "-j", "RETURN")  # fmt: skip
    gone = r.endpoint_chain(WEB, WEB.cluster_endpoints[2])
    assert gone in chains(save(ns, variant))

    web2 = dataclasses.replace(WEB, cluster_endpoints=WEB.cluster_endpoints[:2])
    result = backend.sync(state(web2, API), full=False)
    assert not result.full and result.changed_service_ports == 1
    nat = save(ns, variant)
    marked = {ln.split()[1] for ln in nat.splitlines() if "hand-made" in ln}
    assert marked == {svc_chain(API)}  # web's chain was rewritten, api's left alone
    assert gone not in chains(nat) and "10.244.3.7" not in nat

    backend.sync(state(web2, API), full=True)
    assert "hand-made" not in save(ns, variant)  # a full sync rewrites everything


def test_deleted_service_loses_all_its_chains(ns: str, variant: str) -> None:
    backend = IptablesBackend(variant=variant, netns=ns)
    backend.sync(state(WEB, API), full=False)
    suffix = r.service_chain_suffix(API)
    api_chains = {c for c in chains(save(ns, variant)) if c.endswith(suffix)}
    api_chains.add(r.endpoint_chain(API, API.cluster_endpoints[0]))
    assert len(api_chains) == 3  # SVC, EXT (node port), SEP

    result = backend.sync(state(WEB), full=False)
    assert not result.full
    nat = save(ns, variant)
    assert not (api_chains & chains(nat))
    assert "10.96.0.20" not in nat and "30020" not in nat


def test_a_flushed_or_deleted_table_is_noticed_and_restored(ns: str, variant: str) -> None:
    backend = IptablesBackend(variant=variant, netns=ns)
    st = state(WEB, API)
    backend.sync(st, full=True)
    assert not backend.needs_full_sync()

    ipt(ns, variant, "-t", "nat", "-F")  # chains stay, rules (and jumps) are gone
    assert backend.needs_full_sync()
    result = backend.sync(st, full=False)
    assert result.full  # the emptied canary rules out a partial sync
    assert not backend.needs_full_sync()
    assert "--to-destination 10.244.1.5:8080" in save(ns, variant)

    ipt(ns, variant, "-t", "nat", "-F")
    ipt(ns, variant, "-t", "nat", "-X")  # every lbd chain deleted
    assert backend.needs_full_sync()
    assert backend.sync(st, full=False).full
    assert not backend.needs_full_sync()

    ipt(ns, variant, "-t", "filter", "-F", "INPUT")  # only one built-in chain's jumps
    assert backend.needs_full_sync()
    backend.sync(st, full=True)
    assert not backend.needs_full_sync()
    filt = save(ns, variant, "filter")
    for chain in ("INPUT", "FORWARD", "OUTPUT"):  # restored, and none duplicated
        want = sorted(j.target for j in r.JUMPS if j.chain == chain and j.table == "filter")
        got = [ln.rsplit(" ", 1)[1] for ln in filt.splitlines() if ln.startswith(f"-A {chain} ")]
        assert sorted(got) == want

    ipt(ns, variant, "-t", "mangle", "-F")
    assert backend.needs_full_sync()


def test_failed_partial_restore_falls_back_to_a_full_one(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = IptablesBackend(variant="legacy", netns=ns)
    backend.sync(state(WEB), full=True)
    real = Tools.restore

    def flaky(self: Tools, payload: str) -> None:
        if "*mangle" not in payload:  # partial payloads leave the canary alone
            raise IptablesError("simulated failure")
        real(self, payload)

    monkeypatch.setattr(Tools, "restore", flaky)
    result = backend.sync(state(WEB, API), full=False)
    assert result.full and result.detail["partial_fallbacks"] == 1
    assert svc_chain(API) in chains(save(ns, "legacy"))

    monkeypatch.setattr(Tools, "restore", lambda self, payload: flaky(self, "x"))
    with pytest.raises(IptablesError):
        backend.sync(state(WEB), full=True)
    monkeypatch.setattr(Tools, "restore", real)
    # The failed sync was not recorded: the kernel still holds API, and the next sync
    # (which cannot trust its memory) removes it.
    assert svc_chain(API) in chains(save(ns, "legacy"))
    assert backend.sync(state(WEB), full=False).full
    assert svc_chain(API) not in chains(save(ns, "legacy"))


# --- status -------------------------------------------------------------------------------


def test_status_reads_the_programmed_frontends_back(ns: str, variant: str) -> None:
    lb = sport(
        "lb",
        cluster_ip="10.96.0.30",
        port=443,
        node_port=30443,
        load_balancer_ips=("192.0.2.10",),
        load_balancer_source_ranges=("198.51.100.0/24",),
        external_ips=("203.0.113.5",),
        external_policy_local=True,
        endpoints=(ep("10.244.1.5", local=True), ep("10.244.2.6")),
    )
    idle = sport("idle", cluster_ip="10.96.0.40", protocol=UDP, port=53)
    v6 = sport(family=V6, cluster_ip="fd00:96::10", endpoints=(ep("fd00:244::5"),))
    backend = IptablesBackend(variant=variant, netns=ns)
    backend.sync(state(WEB, lb, idle, v6), full=False)

    web_eps = ("10.244.1.5:8080", "10.244.2.6:8080", "10.244.3.7:8080")
    local, lb_eps = ("10.244.1.5:8080",), ("10.244.1.5:8080", "10.244.2.6:8080")
    v6_eps = ("[fd00:244::5]:8080",)
    assert set(backend.status()) == {
        FrontendStatus("default/web:p", "ClusterIP", "10.96.0.10:80/TCP", web_eps),
        FrontendStatus("default/lb:p", "ClusterIP", "10.96.0.30:443/TCP", lb_eps),
        FrontendStatus("default/lb:p", "LoadBalancer", "192.0.2.10:443/TCP", local),
        FrontendStatus("default/lb:p", "ExternalIP", "203.0.113.5:443/TCP", local),
        FrontendStatus("default/lb:p", "NodePort", "*:30443/TCP", local),
        FrontendStatus("default/idle:p", "ClusterIP", "10.96.0.40:53/UDP", ()),
        FrontendStatus("default/web:p", "ClusterIP", "[fd00:96::10]:80/TCP", v6_eps),
    }  # fmt: skip


def test_ipv6_payload_applies_with_ip6tables_restore(ns: str, variant: str) -> None:
    v6 = sport(family=V6, cluster_ip="fd00:96::10", endpoints=(ep("fd00:244::5"),))
    idle = sport("idle", family=V6, cluster_ip="fd00:96::11")
    IptablesBackend(variant=variant, netns=ns).sync(state(v6, idle), full=False)
    nat = save(ns, variant, family=V6)
    assert "--to-destination [fd00:244::5]:8080" in nat
    assert '-A PREROUTING -m comment --comment "lbd service portals" -j LBD-SERVICES' in nat
    filt = save(ns, variant, "filter", family=V6)
    assert "-d fd00:96::11/128" in filt and "icmp6-port-unreachable" in filt


# --- variants -----------------------------------------------------------------------------


def test_auto_variant_follows_existing_rules_then_the_system_default(ns: str) -> None:
    default = netns.run(ns, ["iptables", "-V"]).stdout
    expected = "legacy" if "legacy" in default else "nft"
    assert IptablesBackend(netns=ns).variant == expected
    # Probing did not instantiate legacy tables (iptables-nft would warn about them).
    assert netns.run(ns, ["cat", "/proc/net/ip_tables_names"]).stdout == ""

    other = "legacy" if expected == "nft" else "nft"
    IptablesBackend(variant=other, netns=ns).sync(state(WEB), full=False)
    assert IptablesBackend(netns=ns).variant == other  # lbd's own rules win


def test_auto_variant_follows_kube_proxy_marker_chains(ns: str) -> None:
    restore(ns, "legacy", "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")
    assert IptablesBackend(netns=ns).variant == "legacy"


# --- cleanup ------------------------------------------------------------------------------

FOREIGN = """*nat
:MYCHAIN - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XXXXXXXXXXXXXXXX - [0:0]
-A MYCHAIN -s 10.0.0.0/8 -j RETURN
-A PREROUTING -s 192.0.2.0/24 -j MYCHAIN
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-XXXXXXXXXXXXXXXX
-A KUBE-SVC-XXXXXXXXXXXXXXXX -p tcp -j DNAT --to-destination 192.168.0.1:6443
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j KUBE-FIREWALL
COMMIT
*mangle
:KUBE-IPTABLES-HINT - [0:0]
COMMIT
"""


def test_cleanup_removes_lbd_and_optionally_kube_proxy_rules_only(ns: str, variant: str) -> None:
    restore(ns, variant, FOREIGN)
    backend = IptablesBackend(variant=variant, netns=ns)
    v6 = sport(family=V6, cluster_ip="fd00:96::10", endpoints=(ep("fd00:244::5"),))
    backend.sync(state(WEB, API, v6), full=False)

    def everything() -> str:
        return "".join(
            save(ns, variant, t, f) for t in ("nat", "filter", "mangle") for f in (V4, V6)
        )

    assert "LBD-" in everything()
    backend.cleanup()
    after = everything()
    assert "LBD-" not in after
    for foreign in (
        "-A MYCHAIN -s 10.0.0.0/8 -j RETURN",
        "-A PREROUTING -s 192.0.2.0/24 -j MYCHAIN",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-j KUBE-SERVICES",
        "-A KUBE-SVC-XXXXXXXXXXXXXXXX -p tcp -j DNAT --to-destination 192.168.0.1:6443",
        ":KUBE-IPTABLES-HINT",
    ):
        assert foreign in after

    backend.cleanup(remove_kube_leftovers=True)
    after = everything()
    assert "KUBE-SERVICES" not in after and "KUBE-SVC-" not in after
    # Foreign rules and kubelet's own chains stay.
    for foreign in (
        "-A MYCHAIN",
        "-j MYCHAIN",
        "--dport 22",
        ":KUBE-FIREWALL",
        ":KUBE-IPTABLES-HINT",
    ):
        assert foreign in after  # fmt: skip
    assert backend.needs_full_sync()
    assert backend.sync(state(WEB), full=False).full  # and lbd can start over


# --- packets ------------------------------------------------------------------------------


@pytest.fixture
def pod_net(ns: str) -> str:
    """ "Pod" addresses on a device (a veth: this kernel has no dummy driver), and a route
    sending the service range there (a local packet needs a route before OUTPUT's DNAT)."""
    netns.ip_batch(
        ns,
        [
            "link add pods type veth peer name pods-peer",
            "link set pods up",
            "link set pods-peer up",
            "addr add 10.244.1.5/32 dev pods",
            "addr add 10.244.1.6/32 dev pods",
            "addr add 10.244.2.2/32 dev pods",
            "route add 10.96.0.0/12 dev pods",
        ],
    )
    return ns


def test_cluster_ip_connects_to_the_endpoint_and_no_endpoints_is_refused(
    pod_net: str, variant: str
) -> None:
    web = sport(port=80, endpoints=(ep("10.244.1.5", 8080),))
    idle = sport("idle", cluster_ip="10.96.0.11")
    IptablesBackend(variant=variant, netns=pod_net).sync(state(web, idle), full=False)

    server = netns.socket_in(pod_net)
    client = netns.socket_in(pod_net)
    refused = netns.socket_in(pod_net)
    try:
        server.bind(("10.244.1.5", 8080))
        server.listen()
        client.settimeout(5)
        client.bind(("10.244.2.2", 0))  # a pod address, so no hairpin masquerade applies
        client.connect(("10.96.0.10", 80))
        conn, peer = server.accept()
        with conn:
            assert peer[0] == "10.244.2.2"  # the pod's source address is preserved
            conn.sendall(b"hello")
            assert client.recv(5) == b"hello"

        refused.settimeout(5)
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            refused.connect(("10.96.0.11", 80))
        assert time.monotonic() - started < 2  # refused at once, not a timeout
    finally:
        for s in (server, client, refused):
            s.close()


def conntrack(ns: str, *args: str) -> str:
    proc = netns.run(ns, ["conntrack", *args], check=False)
    return proc.stdout


def test_udp_flows_to_a_removed_endpoint_are_deleted(pod_net: str, variant: str) -> None:
    both = (ep("10.244.1.5", 5353), ep("10.244.1.6", 5353))
    dns = sport("dns", protocol=UDP, port=53, endpoints=both)
    backend = IptablesBackend(variant=variant, netns=pod_net)
    backend.sync(state(dns), full=False)

    senders = []
    try:
        for _ in range(24):  # 24 flows: both endpoints get some (p of not: 2^-23)
            s = netns.socket_in(pod_net, socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("10.244.2.2", 0))
            s.sendto(b"q", ("10.96.0.10", 53))
            senders.append(s)
        before = conntrack(pod_net, "-L", "-p", "udp", "--orig-dst", "10.96.0.10")
        assert "src=10.244.1.5 dst=10.244.2.2 sport=5353" in before
        assert "src=10.244.1.6 dst=10.244.2.2 sport=5353" in before

        result = backend.sync(state(dataclasses.replace(dns, cluster_endpoints=both[1:])), False)
        assert result.detail["conntrack_deleted"] >= 1
        after = conntrack(pod_net, "-L", "-p", "udp", "--orig-dst", "10.96.0.10")
        assert "src=10.244.1.5" not in after  # DNATed to the removed endpoint: gone
        assert "src=10.244.1.6 dst=10.244.2.2 sport=5353" in after  # the other kept
    finally:
        for s in senders:
            s.close()


@pytest.fixture
def uvloop_policy() -> Iterator[None]:
    """The daemon runs under uvloop, whose loops cannot carry netlink sockets."""
    uvloop = pytest.importorskip("uvloop")
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)


def test_udp_flows_from_before_the_first_endpoint_are_deleted(
    pod_net: str, uvloop_policy: None
) -> None:
    dns = sport("dns", protocol=UDP, port=53)
    backend = IptablesBackend(variant="nft", netns=pod_net)
    backend.sync(state(dns), full=False)
    # An entry that never got DNATed, as one created while nothing served the service.
    subprocess.run(
        netns.exec_argv(pod_net, ["conntrack", "-I", "-p", "udp", "-s", "10.244.2.2",
                                  "-d", "10.96.0.10", "--sport", "40000", "--dport", "53",
                                  "-t", "120"]),
        check=True, capture_output=True,
    )  # fmt: skip
    unrelated = ["-p", "udp", "-s", "10.244.2.2", "-d", "10.96.0.99", "--sport", "40001"]
    netns.run(pod_net, ["conntrack", "-I", *unrelated, "--dport", "53", "-t", "120"])
    assert "dport=40000" in conntrack(pod_net, "-L", "-p", "udp")

    with_eps = dataclasses.replace(dns, cluster_endpoints=(ep("10.244.1.5", 5353),))
    result = backend.sync(state(with_eps), full=False)
    assert result.detail["conntrack_deleted"] == 1
    left = conntrack(pod_net, "-L", "-p", "udp")
    assert "sport=40000" not in left and "sport=40001" in left
