"""Kernel-state hygiene: after heavy churn the node holds exactly what the live services
need, and `lbd cleanup` removes all of lbd and nothing else, in every proxy mode.

200 create/update/delete cycles of Services and EndpointSlices (ClusterIP, dual-stack,
NodePort, LoadBalancer with source ranges, externalTrafficPolicy: Local, affinity, empty
slices) go through partial syncs; then the node's kernel state must equal the one a fresh
daemon writes from scratch after `lbd cleanup` (reliability_support.kernel_inventory:
frontends -> endpoints read back from the kernel, and per mode the lbd rule set in order,
ipsets, the IPVS table and dummy addresses, or the pinned maps' fill levels and the
attached programs), and no frontend of a deleted service may remain. Kernel tests
(tests/kernel) check single syncs; this checks the accumulation.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from reliability_support import (
    Inventory,
    assert_converged,
    ensure_running,
    ipvs_services,
    kernel_inventory,
    lbd_leftovers,
    lbd_status,
    lbd_variant,
    mentions_lbd,
    run_lbd,
    save_all,
)

from lbd.testing.env import LbdEnv, eventually
from lbd.testing.objects import EndpointSpec, PortSpec, endpoint_slice, service

pytestmark = [pytest.mark.reliability, pytest.mark.kernel]

CYCLES = 200
SYNC_EVERY = 10  # cycles between waits for the daemons (the rest are coalesced bursts)
UPDATE_SLICE_LAG = 3  # cycle i rewrites the endpoints of the service made in i - 3
UPDATE_SERVICE_LAG = 5  # ... changes the port of the one made in i - 5
DELETE_LAG = 8  # ... and deletes the one made in i - 8, unless it is a keeper
KEEP_EVERY = 10  # every 10th service survives the churn
NODE = "node-1"


def _ports(i: int, port: int) -> list[PortSpec]:
    return [PortSpec(port, 8080, "TCP", "http", node_port=30100 + i)]


def churn_service(env: LbdEnv, i: int, *, port: int = 80) -> dict[str, Any]:
    """One of five kinds of service, by i % 5."""
    kind = i % 5
    v4 = f"10.96.70.{i + 1}"
    common: dict[str, Any] = {"affinity_timeout": 300 if i % 3 == 0 else 0}
    if kind == 0:
        return service(f"h{i}", [v4], _ports(i, port), **common)
    if kind == 1:
        return service(f"h{i}", [v4, f"fd00:96::70:{i + 1:x}"], _ports(i, port), **common)
    if kind == 2:
        return service(f"h{i}", [v4], _ports(i, port), type="NodePort", **common)
    lb = {
        "type": "LoadBalancer",
        "lb_ips": [f"203.0.113.{i % 200 + 20}"],
        "source_ranges": ["198.51.100.0/24", "192.168.200.0/24"] if kind == 3 else (),
    }
    if kind == 4:
        lb["external_traffic_policy"] = "Local"
        lb["health_check_node_port"] = 32100 + i
    return service(f"h{i}", [v4], _ports(i, port), **lb, **common)


def churn_slices(env: LbdEnv, i: int, generation: int, port: int = 80) -> list[dict[str, Any]]:
    pods = env.cluster.pods
    # The endpoint set moves with each generation; every 7th one is empty.
    chosen = [] if (i + generation) % 7 == 0 else pods[generation % 3 : generation % 3 + 2]
    out = [endpoint_slice(f"h{i}", [EndpointSpec(p.ipv4, p.node) for p in chosen], _ports(i, port))]
    if i % 5 == 1:
        out.append(
            endpoint_slice(
                f"h{i}",
                [EndpointSpec(p.ipv6, p.node) for p in chosen if p.ipv6],
                _ports(i, port),
                family=6,
            )
        )
    return out


def churn(env: LbdEnv) -> set[int]:
    """Run the cycles; the indexes of the services still alive."""
    alive: set[int] = set()
    for i in range(CYCLES):
        env.apply(churn_service(env, i))
        for s in churn_slices(env, i, 0):
            env.apply(s)
        alive.add(i)
        j = i - UPDATE_SLICE_LAG
        if j in alive:
            for s in churn_slices(env, j, 1):
                env.apply(s)
        j = i - UPDATE_SERVICE_LAG
        if j in alive:
            env.apply(churn_service(env, j, port=81))
            for s in churn_slices(env, j, 2, port=81):
                env.apply(s)
        j = i - DELETE_LAG
        if j in alive and j % KEEP_EVERY:
            env.delete("Service", f"h{j}")
            env.delete("EndpointSlice", f"h{j}-v4")
            if j % 5 == 1:
                env.delete("EndpointSlice", f"h{j}-v6")
            alive.discard(j)
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            env.wait_synced(timeout=60)
    env.wait_synced(timeout=60)
    return alive


def live_frontends(env: LbdEnv) -> set[str]:
    """Every address a live service is reachable at, as rules write them (/32, /128)."""
    out: set[str] = set()
    for svc in env.api.server.list_objects("services"):
        spec, status = svc["spec"], svc.get("status") or {}
        ips = list(spec.get("clusterIPs") or []) + list(spec.get("externalIPs") or [])
        ips += [i["ip"] for i in (status.get("loadBalancer") or {}).get("ingress") or []]
        out |= {f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in ips}
    return out


# A destination match (not a negated one such as LBD-SERVICES' `! -d 127.0.0.0/8`).
_DEST = re.compile(r"(?<!!) -d (\S+) ")


def diff(a: Inventory, b: Inventory) -> list[str]:
    """A short, readable difference between two inventories (empty when equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        ca, cb = a.get(key, {}), b.get(key, {})
        for chain in sorted(set(ca) | set(cb)):
            if ca.get(chain) != cb.get(chain):
                ra, rb = ca.get(chain), cb.get(chain)
                if ra is None or rb is None:
                    out.append(f"{key} {chain}: only in {'fresh' if ra is None else 'churned'}")
                else:
                    gone = [r for r in ra if r not in rb][:2]
                    new = [r for r in rb if r not in ra][:2]
                    out.append(f"{key} {chain}: churned-only {gone} fresh-only {new}")
    return out[:20]


def inventory_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two kernel inventories, briefly (empty when equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key == "rules":
            out += diff(va or {}, vb or {})
        elif isinstance(va, list) and isinstance(vb, list):
            out.append(
                f"{key}: churned-only {[x for x in va if x not in vb][:3]} "
                f"fresh-only {[x for x in vb if x not in va][:3]}"
            )
        else:
            out.append(f"{key}: churned {va} fresh {vb}")
    return out


def _no_draining(env: LbdEnv) -> None:
    draining = [line for line in ipvs_services(env, NODE) if line.endswith(" -w 0")]
    assert draining == [], draining[:5]


def cleanup_all(env: LbdEnv) -> None:
    proc = run_lbd(env, NODE, "cleanup", "--proxy-mode", "all", *env.location_args(NODE))
    assert proc.returncode == 0, proc.stderr


def test_churn_leaves_exactly_what_a_fresh_daemon_writes(env: LbdEnv) -> None:
    """After 200 churn cycles the kernel holds what a daemon starting from scratch
    writes (for iptables: chain for chain and rule for rule), and no frontend of a
    deleted service."""
    ensure_running(env, NODE)
    alive = churn(env)
    # The keepers, the last few cycles' services and the stable one.
    assert len(env.api.server.list_objects("services")) == len(alive) + 1
    assert_converged(env, 30)
    if env.mode == "ipvs":
        # Real servers of removed endpoints drain at weight 0 and go once they have no
        # connection (none here): within seconds, without any further change.
        eventually(lambda: _no_draining(env), 60)
    assert env.stop_daemon(NODE) == 0
    churned = kernel_inventory(env, NODE)
    # The inventory sees the datapath (a reader that found nothing would compare equal).
    assert churned["status"]
    if env.mode == "ebpf":
        assert churned["pinned"] and churned["tc"] and churned["maps"]["lbd_backends"] > 0
    if env.mode == "ipvs":
        assert churned["ipvs"] and churned["ipsets"] and churned["dummy"]

    # No frontend of a service the API server no longer has.
    live_names = {
        f"default/{s['metadata']['name']}" for s in env.api.server.list_objects("services")
    }
    gone = [row for row in churned["status"] if row[0].split(":")[0] not in live_names]
    assert gone == [], gone[:5]
    if env.mode == "iptables":
        # IPv6 was churned too (dual-stack services), so its tables must be in it.
        rules = churned["rules"]
        assert ("ip6tables", "nat") in rules and ("iptables", "filter") in rules
        # No rule in any portal chain points at an address no live service has.
        live = live_frontends(env)
        for (family, table), chains in rules.items():
            for chain in ("LBD-SERVICES", "LBD-EXTERNAL-SERVICES", "LBD-PROXY-FIREWALL"):
                for rule in chains.get(chain, ()):
                    dest = _DEST.search(rule)
                    assert dest is None or dest.group(1) in live, (family, table, rule)

    cleanup_all(env)
    assert lbd_leftovers(env, NODE) == []
    env.start_daemon(NODE)
    env.wait_synced(timeout=60)
    fresh = kernel_inventory(env, NODE)
    assert churned == fresh, inventory_diff(churned, fresh)
    assert_converged(env, 30)


FOREIGN_V4 = """*filter
:USER-CHAIN - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A USER-CHAIN -s 198.51.100.7/32 -j DROP
-A INPUT -p tcp -m tcp --dport 2222 -j USER-CHAIN
-A FORWARD -d 198.51.100.8/32 -j ACCEPT
COMMIT
*nat
:USER-NAT - [0:0]
-A USER-NAT -p tcp -m tcp --dport 2223 -j RETURN
-A PREROUTING -p tcp -m tcp --dport 2223 -j USER-NAT
COMMIT
"""
FOREIGN_V6 = """*filter
:USER-CHAIN6 - [0:0]
-A USER-CHAIN6 -s 2001:db8::7/128 -j DROP
-A INPUT -p tcp -m tcp --dport 2222 -j USER-CHAIN6
COMMIT
"""


def foreign(env: LbdEnv) -> dict[tuple[str, str, str], tuple[list[str], list[str]]]:
    """Everything in the node's rule sets that is not lbd's: (chains, rules) per table."""
    out = {}
    for key, saved in save_all(env, NODE).items():
        chains = sorted(f"{c} {p}" for c, p in saved.chains.items() if not mentions_lbd(c))
        rules = [r for r in saved.rules if not mentions_lbd(r)]
        out[key] = (chains, rules)
    return out


def test_cleanup_removes_all_of_lbd_and_nothing_else(env: LbdEnv) -> None:
    """`lbd cleanup --proxy-mode all` on a live node: nothing of any lbd mode remains
    (rules in any family or table, ipsets, IPVS services, the dummy interface, pinned
    BPF objects, tc programs), and a user's chains and rules (and kubelet's chain) stay."""
    ensure_running(env, NODE)
    env.wait_synced(timeout=60)
    # ebpf writes no rules; the user's go where iptables-legacy would put them.
    variant = "legacy" if env.mode == "ebpf" else lbd_variant(env, NODE)
    for binary, payload in (("iptables", FOREIGN_V4), ("ip6tables", FOREIGN_V6)):
        proc = env.exec_in(
            NODE, [f"{binary}-{variant}-restore", "--noflush"], input=payload, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
    before = foreign(env)
    assert any("USER-CHAIN" in r for (_, rules) in before.values() for r in rules)
    assert lbd_status(env, NODE)  # lbd's datapath is there to be removed
    assert lbd_leftovers(env, NODE)

    assert env.stop_daemon(NODE) == 0
    cleanup_all(env)
    assert lbd_leftovers(env, NODE) == []
    assert foreign(env) == before
    # Running it again on a clean node is a no-op, not an error.
    cleanup_all(env)

    # Leave the node as the module found it: a daemon that reprograms everything.
    env.start_daemon(NODE)
    env.wait_synced(timeout=60)
    assert lbd_status(env, NODE)
