"""The IPVS backend against a real IPVS kernel, each test in its own network namespace.

`IpvsBackend(netns=)` programs a scratch namespace from outside; `ipvsadm -Ln`, `ipset
list`, `ip addr` and `iptables-save` inside it are the independent witnesses of what the
kernel holds (none of them is on lbd's own sync path, which is netlink only).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from backends.base import FrontendStatus
from backends.ipvs.apply import Kernel, parse_proc_ip_vs
from backends.ipvs.backend import IpvsBackend
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort, ServicePortName
from lbd.testing import netns

pytestmark = pytest.mark.kernel

V4, V6 = IPFamily.V4, IPFamily.V6
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


@pytest.fixture
def ns() -> Iterator[str]:
    with netns.scratch("ipvs") as name:
        # A node: an uplink with addresses and default routes (IPVS accepts only unicast
        # real servers, which needs routes to them).
        netns.ip_batch(
            name,
            [
                "link add eth0 type dummy",
                "link set eth0 up",
                "addr add 192.168.0.10/24 dev eth0",
                "addr add fd00:192::10/64 dev eth0 nodad",
                "route add default via 192.168.0.1",
                "route add default via fd00:192::1",
            ],
        )
        yield name


def ep(ip: str, port: int = 8080, local: bool = False) -> Endpoint:
    return Endpoint(ip, port, node_name="node-a" if local else "node-b", is_local=local)


def sport(
    name: str,
    cluster_ip: str,
    *,
    protocol: Protocol = TCP,
    port: int = 80,
    family: IPFamily = V4,
    endpoints: tuple[Endpoint, ...] = (),
    **kw: object,
) -> ServicePort:
    kw.setdefault("cluster_endpoints", endpoints)
    kw.setdefault("local_endpoints", tuple(e for e in endpoints if e.is_local))
    kw.setdefault("all_endpoints", endpoints)
    return ServicePort(
        ServicePortName("default", name, "p", protocol),
        family,
        cluster_ip,
        port,
        protocol,
        **kw,  # type: ignore[arg-type]
    )


def state(*ports: ServicePort) -> ProxyState:
    return ProxyState(
        node_name="node-a",
        node_ips=("192.168.0.10", "fd00:192::10"),
        cluster_cidrs=("10.244.0.0/16", "fd00:244::/64"),
        service_ports={(sp.name, sp.family): sp for sp in ports},
    )


A, B = ep("10.244.1.5"), ep("10.244.2.6")


def web(*endpoints: Endpoint, **kw: object) -> ServicePort:
    kw.setdefault("session_affinity_timeout", 60)
    return sport("web", "10.96.0.10", node_port=30080, endpoints=endpoints, **kw)


def dns(*endpoints: Endpoint) -> ServicePort:
    return sport("dns", "10.96.0.53", protocol=UDP, port=53, endpoints=endpoints)


BASE = (
    web(A, B),
    dns(ep("10.244.1.5", 53, local=True), ep("10.244.2.6", 53)),
    sport("v6", "fd00:96::a", family=V6, endpoints=(ep("fd00:244::5"),)),
    sport("sig", "10.96.0.11", protocol=SCTP, port=36412, endpoints=(ep("10.244.1.5", 36412),)),
    sport(
        "lb",
        "10.96.0.12",
        load_balancer_ips=("203.0.113.20",),
        load_balancer_source_ranges=("198.51.100.0/24",),
        external_policy_local=True,
        node_port=30443,
        endpoints=(ep("10.244.1.5", local=True), B),
    ),
)


def run(ns: str, *argv: str) -> str:
    return netns.run(ns, list(argv)).stdout


def ipvsadm(ns: str) -> dict[str, dict[str, str]]:
    """`ipvsadm -Ln` as {"TCP 10.96.0.10:80": {"header": ..., "10.244.1.5:8080": "Masq 1"}}."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in run(ns, "ipvsadm", "-Ln").splitlines():
        m = re.match(r"^(TCP|UDP|SCTP|FWM)\s+(\S+)\s+(.*)$", line)
        if m:
            current = out.setdefault(f"{m[1]} {m[2]}", {"header": m[3].strip()})
            continue
        m = re.match(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m and current is not None:
            current[m[1]] = f"{m[2]} {m[3]}"
    return out


def test_sync_programs_virtual_servers_ipsets_addresses_and_rules(ns):
    backend = IpvsBackend(netns=ns, scheduler="lc")
    result = backend.sync(state(*BASE), full=True)
    assert result.full and result.detail["ops_add_service"] >= 7

    got = ipvsadm(ns)
    assert got["TCP 10.96.0.10:80"] == {
        "header": "lc persistent 60",
        "10.244.1.5:8080": "Masq 1",
        "10.244.2.6:8080": "Masq 1",
    }
    assert got["TCP 192.168.0.10:30080"]["10.244.2.6:8080"] == "Masq 1"
    assert set(got["UDP 10.96.0.53:53"]) == {"header", "10.244.1.5:53", "10.244.2.6:53"}
    assert got["TCP [fd00:96::a]:80"]["[fd00:244::5]:8080"] == "Masq 1"
    assert got["SCTP 10.96.0.11:36412"]["10.244.1.5:36412"] == "Masq 1"
    # externalTrafficPolicy: Local: the LB IP has the local endpoint, the short-circuit
    # firewall-mark server the cluster endpoints
    assert set(got["TCP 203.0.113.20:80"]) == {"header", "10.244.1.5:8080"}
    (fwm,) = [v for k, v in got.items() if k.startswith("FWM")]
    assert set(fwm) == {"header", "10.244.1.5:8080", "10.244.2.6:8080"}

    addrs = run(ns, "ip", "-o", "addr", "show", "dev", "lbd-ipvs0")
    assert re.search(r"inet 10\.96\.0\.10/32 scope host", addrs), addrs
    assert "inet 203.0.113.20/32" in addrs and "fd00:96::a/128" in addrs
    assert "deprecated" in addrs  # IPv6 virtual addresses are never a preferred source
    assert "192.168.0.10" not in addrs

    sets = run(ns, "ipset", "list")
    assert '10.96.0.10,tcp:80 comment "default/web:p"' in sets
    assert "203.0.113.20,tcp:80,198.51.100.0/24" in sets
    assert re.search(r"203\.0\.113\.20,tcp:80 skbmark 0x10[0-9a-f]{5}", sets), sets
    # hairpin: this node's endpoints only (a remote pod cannot hairpin through this node)
    assert "10.244.1.5,udp:53,10.244.1.5" in sets
    assert "10.244.2.6,udp:53,10.244.2.6" not in sets
    assert "fd00:96::a,tcp:80" in run(ns, "ipset", "list", "LBD6-CLUSTER-IP")

    saved = run(ns, "iptables-save")
    assert (
        '-A PREROUTING -m comment --comment "lbd ipvs service portals" -j LBDIPVS-SERVICES' in saved
    )
    assert "--match-set LBD-CLUSTER-IP dst,dst" in saved
    assert "LBDIPVS-" in run(ns, "ip6tables-save")
    for key, value in {"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1"}.items():
        assert run(ns, "cat", f"/proc/sys/{key}").strip() == value

    rows = {(s.service, s.kind, s.frontend): s.endpoints for s in backend.status()}
    assert rows[("default/web:p", "ClusterIP", "10.96.0.10:80/TCP")] == (
        "10.244.1.5:8080",
        "10.244.2.6:8080",
    )
    assert rows[("default/web:p", "NodePort", "192.168.0.10:30080/TCP")]
    assert rows[("default/lb:p", "LoadBalancer", "203.0.113.20:80/TCP")] == ("10.244.1.5:8080",)
    assert rows[("default/v6:p", "ClusterIP", "[fd00:96::a]:80/TCP")] == ("[fd00:244::5]:8080",)

    # nothing changed: a second sync, partial or full, changes nothing
    again = backend.sync(state(*BASE), full=False)
    assert not again.full and not [k for k in again.detail if k.startswith("ops_")]
    assert again.detail["iptables_restores"] == 0
    fresh = IpvsBackend(netns=ns, scheduler="lc").sync(state(*BASE), full=True)
    assert not [k for k in fresh.detail if k.startswith("ops_")]


def test_partial_syncs_drain_tcp_and_drop_udp_real_servers(ns):
    backend = IpvsBackend(netns=ns)
    backend.sync(state(*BASE), full=True)
    changed = (web(A), dns(ep("10.244.1.5", 53, local=True)), *BASE[2:])
    result = backend.sync(state(*changed), full=False)
    assert not result.full and result.changed_service_ports == 2
    got = ipvsadm(ns)
    # TCP: weight 0 (no new connections), kept while it may have connections
    assert got["TCP 10.96.0.10:80"]["10.244.2.6:8080"] == "Masq 0"
    assert got["TCP 10.96.0.10:80"]["10.244.1.5:8080"] == "Masq 1"
    # UDP: gone at once
    assert "10.244.2.6:53" not in got["UDP 10.96.0.53:53"]
    assert result.detail["draining_real_servers"] == 2  # cluster IP and node port
    # it had no connections: the next sync deletes it
    backend.sync(state(*changed), full=False)
    assert "10.244.2.6:8080" not in ipvsadm(ns)["TCP 10.96.0.10:80"]
    # the frontends of a deleted service go, the others stay
    backend.sync(state(*changed[1:]), full=False)
    got = ipvsadm(ns)
    assert "TCP 10.96.0.10:80" not in got and "TCP 192.168.0.10:30080" not in got
    assert "UDP 10.96.0.53:53" in got
    assert "10.96.0.10" not in run(ns, "ip", "-o", "addr", "show", "dev", "lbd-ipvs0")
    assert "10.96.0.10" not in run(ns, "ipset", "list", "LBD-CLUSTER-IP")


def test_real_servers_read_from_proc_match_netlink_dumps(ns):
    """A full sync reads real servers from /proc/net/ip_vs (one read for all virtual
    servers) instead of one netlink dump each: both must say the same, draining weights
    and IPv6 included; firewall-mark virtual servers are left to netlink."""
    backend = IpvsBackend(netns=ns)
    backend.sync(state(*BASE), full=True)
    backend.sync(state(web(A), *BASE[1:]), full=False)  # B drains: weight 0
    with Kernel(ns) as kernel:
        view = kernel.read_view()
        listed = parse_proc_ip_vs(run(ns, "cat", "/proc/net/ip_vs"))
        assert set(listed) == {k for k in view.services if not k.fwmark}
        assert any(k.fwmark for k in view.services)
        # Few keys: one netlink dump each (PROC_READ_AFTER), the reference here.
        dumped = kernel.read_dests(view.services)
    assert {k: sv.dests for k, sv in view.services.items()} == dumped
    assert {k: dumped[k] for k in listed} == listed
    drained = {rs.weight for k, d in listed.items() if k.addr == "10.96.0.10" for rs in d.values()}
    assert drained == {0, 1}


def test_a_flush_by_an_admin_is_noticed_and_repaired(ns):
    backend = IpvsBackend(netns=ns)
    backend.sync(state(*BASE), full=True)
    assert not backend.needs_full_sync()
    run(ns, "ipvsadm", "-C")
    assert backend.needs_full_sync()
    backend.sync(state(*BASE), full=True)
    assert "TCP 10.96.0.10:80" in ipvsadm(ns) and not backend.needs_full_sync()
    # an emptied ipset (the rules that match it would let traffic through unmasqueraded)
    run(ns, "ipset", "flush", "LBD-CLUSTER-IP")
    assert backend.needs_full_sync()
    backend.sync(state(*BASE), full=True)
    assert "10.96.0.10,tcp:80" in run(ns, "ipset", "list", "LBD-CLUSTER-IP")
    assert not backend.needs_full_sync()
    for tool in ("iptables", "iptables-legacy", "iptables-nft"):
        netns.run(ns, [tool, "-t", "nat", "-F"], check=False)
    assert backend.needs_full_sync()
    backend.sync(state(*BASE), full=True)
    assert not backend.needs_full_sync()
    assert "-j LBDIPVS-SERVICES" in run(ns, "iptables-save", "-t", "nat")


def test_cleanup_removes_lbd_ipvs_state_and_nothing_else(ns):
    backend = IpvsBackend(netns=ns)
    backend.sync(state(*BASE), full=True)
    # someone else's IPVS service, ipset and iptables chains (the iptables mode's LBD-*)
    run(ns, "ipvsadm", "-A", "-t", "192.168.0.10:8443", "-s", "wlc")
    run(ns, "ipset", "create", "OTHER", "hash:ip")
    run(ns, "iptables", "-t", "nat", "-N", "LBD-SERVICES")
    backend.cleanup()
    assert set(ipvsadm(ns)) == {"TCP 192.168.0.10:8443"}
    assert run(ns, "ipset", "list", "-n").split() == ["OTHER"]
    assert "lbd-ipvs0" not in run(ns, "ip", "-o", "link")
    saved = run(ns, "iptables-save")
    assert "LBDIPVS-" not in saved and ":LBD-SERVICES" in saved
    assert backend.status() == []
    # and it programs again from scratch afterwards
    backend.sync(state(*BASE), full=True)
    assert FrontendStatus in {type(s) for s in backend.status()}
