"""The IPVS mode's own netlink layer (backends.ipvs.netlink through Kernel) on a real kernel.

Batched writes must behave exactly like one request at a time: in order, an add that finds
its entry becomes an update, "already gone" is success, and a real failure names its op.
Raw reads must give back what ipvsadm and ipset (independent tools) show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from backends.ipvs import plan as p
from backends.ipvs.apply import Kernel, KernelError
from lbd.model.state import IPFamily
from lbd.testing import netns

pytestmark = pytest.mark.kernel

V4, V6 = IPFamily.V4, IPFamily.V6
TCP = 6


@pytest.fixture
def ns() -> Iterator[str]:
    with netns.scratch("ipvsnl") as name:
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


def run(ns: str, *argv: str) -> str:
    return netns.run(ns, list(argv)).stdout


def vs(addr: str, port: int = 80, scheduler: str = "rr", persistence: int = 0) -> p.VirtualServer:
    family = V6 if ":" in addr else V4
    return p.VirtualServer(p.VSKey(family, TCP, addr, port), scheduler, persistence)


def test_many_ops_in_batches_land_in_order_and_read_back(ns):
    # More ops than one batch holds, services before their real servers.
    services = [vs(f"10.96.{i // 250}.{i % 250 + 1}") for i in range(300)]
    ops = [p.Op(p.OpKind.ADD_SERVICE, vs=s) for s in services]
    ops += [
        p.Op(p.OpKind.ADD_DEST, vs=s, dest=p.RealServer(f"10.244.1.{j}", 8080))
        for s in services
        for j in (1, 2)
    ]
    fwm = p.VirtualServer(p.VSKey(V4, 0, "", 0, p.FWMARK_BASE + 7), "lc", 300)
    v6 = vs("fd00:96::a", persistence=60)
    ops += [p.Op(p.OpKind.ADD_SERVICE, vs=fwm), p.Op(p.OpKind.ADD_SERVICE, vs=v6)]
    ops += [p.Op(p.OpKind.ADD_DEST, vs=v6, dest=p.RealServer("fd00:244::5", 8080, 3))]
    with Kernel(ns) as kernel:
        assert kernel.apply(ops) == len(ops)
        view = kernel.read_view()
    listed = run(ns, "ipvsadm", "-Ln")
    assert listed.count("-> 10.244.1.") == 600
    assert re.search(r"FWM\s+16777223 lc persistent 300", listed)
    assert re.search(r"TCP\s+\[fd00:96::a\]:80 rr persistent 60", listed)
    assert "-> [fd00:244::5]:8080" in listed
    # the raw reads see the same
    assert len(view.services) == 302
    assert view.services[fwm.key].vs == fwm
    assert view.services[v6.key].vs == v6
    assert view.services[v6.key].dests[("fd00:244::5", 8080)].weight == 3
    assert set(view.services[services[299].key].dests) == {
        ("10.244.1.1", 8080),
        ("10.244.1.2", 8080),
    }


def test_an_add_that_finds_its_entry_updates_it_and_a_failure_names_its_op(ns):
    run(ns, "ipvsadm", "-A", "-t", "10.96.0.10:80", "-s", "wlc")
    run(ns, "ipvsadm", "-a", "-t", "10.96.0.10:80", "-r", "10.244.1.5:8080", "-m", "-w", "5")
    web, nowhere = vs("10.96.0.10"), vs("10.96.0.77")
    with Kernel(ns) as kernel:
        kernel.apply(
            [
                p.Op(p.OpKind.ADD_SERVICE, vs=web),
                p.Op(p.OpKind.ADD_DEST, vs=web, dest=p.RealServer("10.244.1.5", 8080, 1)),
                # already gone: fine
                p.Op(p.OpKind.DEL_DEST, vs=web, dest=p.RealServer("10.244.9.9", 8080)),
                p.Op(p.OpKind.DEL_SERVICE, vs=vs("10.96.0.99")),
            ]
        )
        with pytest.raises(KernelError, match=r"add_dest 10\.96\.0\.77:80/TCP 10\.244\.1\.6:8080"):
            kernel.apply(
                [
                    p.Op(p.OpKind.ADD_DEST, vs=web, dest=p.RealServer("10.244.1.6", 8080)),
                    # no such virtual server
                    p.Op(p.OpKind.ADD_DEST, vs=nowhere, dest=p.RealServer("10.244.1.6", 8080)),
                ]
            )
    listed = run(ns, "ipvsadm", "-Ln")
    assert re.search(r"TCP\s+10\.96\.0\.10:80 rr", listed)  # the scheduler was updated
    assert re.search(r"-> 10\.244\.1\.5:8080\s+Masq\s+1\s", listed)  # and the weight
    assert "-> 10.244.1.6:8080" in listed  # the op before the failure was applied


def test_ipset_entries_read_back_as_ipset_lists_them(ns):
    run(ns, "ipset", "create", "LBD-CLUSTER-IP", "hash:ip,port", "comment")
    run(ns, "ipset", "add", "LBD-CLUSTER-IP", "10.96.0.10,tcp:80", "comment", "default/web:http")
    run(ns, "ipset", "create", "LBD-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net")
    run(ns, "ipset", "add", "LBD-LOAD-BALANCER-SOURCE-CIDR", "192.0.2.10,tcp:443,198.51.100.0/24")
    run(ns, "ipset", "create", "LBD-SHORT-CIRCUIT", "hash:ip,port", "skbinfo")
    run(ns, "ipset", "add", "LBD-SHORT-CIRCUIT", "192.0.2.10,tcp:443", "skbmark", "0x1000002")
    run(ns, "ipset", "create", "OTHER", "hash:ip")
    with Kernel(ns) as kernel:
        view = kernel.read_view()
    assert view.sets == {
        "LBD-CLUSTER-IP": {p.Member("10.96.0.10", TCP, 80): p.Extension("default/web:http")},
        "LBD-LOAD-BALANCER-SOURCE-CIDR": {
            p.Member("192.0.2.10", TCP, 443, "198.51.100.0/24"): p.Extension()
        },
        "LBD-SHORT-CIRCUIT": {p.Member("192.0.2.10", TCP, 443): p.Extension(mark=0x1000002)},
    }
    assert view.set_kinds["LBD-LOAD-BALANCER-SOURCE-CIDR"] == "hash:ip,port,net"
    assert "192.168.0.10" in view.node_addresses and "fd00:192::10" in view.node_addresses
