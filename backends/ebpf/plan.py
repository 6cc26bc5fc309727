"""Plan eBPF map writes: ProxyState + what the maps hold now → an ordered list of writes.

Pure: no kernel access. `plan(state, view, options)` returns only the entries that must
change, in an order that never lets the datapath follow a reference to something not yet
written (backends, reverse-NAT entries and Maglev tables before the service slots that
point at them; a frontend's new slots before the count that exposes them; deletions of
what nothing references any more last).

What it decides, mirroring kube-proxy's semantics on lbd's map layout (bpf_lb/lb.h):
- Frontends: the cluster IP (internal endpoints), and per external frontend (node port on
  each selected node address, external IPs, load-balancer IPs) an EXT-scope entry with the
  external endpoints; under externalTrafficPolicy: Local also an INT-scope entry with the
  cluster endpoints, which in-cluster clients use (kube-proxy's short-circuit).
- Flags: reject when the service port has no endpoints at all, else an empty entry drops;
  affinity, source ranges (load-balancer IPs only), kind of frontend.
- Ids: backends by address, reverse-NAT entries by frontend address, and svc ids (one per
  service port and endpoint view: the key of the Maglev table, affinity and
  lbd_svcnames) are adopted from the maps when they already exist, so a restarted daemon
  rewrites nothing that is already right, and allocated otherwise.
- Slots: an endpoint change touches only its own slot (a removed backend's slot is refilled
  by a new one, or by the last slot, which is then dropped) and the frontend entry only
  when the count changes.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from bpf_lb import maglev
from bpf_lb.maps import (
    BACKEND_LOCAL,
    CFG_HOSTNS_ONLY,
    CFG_MAGLEV,
    FAMILY_V4,
    FAMILY_V6,
    PROTO_NUMBERS,
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
    Config,
    Frontend,
    RevNat,
    ServiceValue,
    SourceRange,
)
from lbd.model.state import Endpoint, IPFamily, ProxyState, ServicePort, ServicePortName

log = structlog.get_logger("lbd.backends.ebpf.plan")

SERVICES = "lbd_services"
BACKENDS = "lbd_backends"
REV_NAT = "lbd_revnat"
MAGLEV = "lbd_maglev"
AFF_MATCH = "lbd_aff_match"
SRC_RANGE = "lbd_srcrange"
SVC_NAMES = "lbd_svcnames"
CONFIG = "lbd_config"

ALGORITHMS = ("random", "maglev")
_MAX_ID = 2**32 - 1
# Endpoint views: which of a ServicePort's endpoint lists an entry serves. They are
# kube-proxy's SVC and SVL chains: every frontend of a service port using the same list
# shares one svc id, hence one Maglev table and one set of affinity entries.
VIEW_CLUSTER = "cluster"  # cluster_endpoints
VIEW_LOCAL = "local"  # local_endpoints (a Local traffic policy)


@dataclass(frozen=True, slots=True)
class PlanOptions:
    lb_algorithm: str = "random"
    maglev_table_size: int = maglev.DEFAULT_TABLE_SIZE
    hostns_only: bool = False
    host_netns_cookie: int = 0
    snat_port_min: int = 0  # 0: the datapath's default range (1024-65535)
    snat_port_max: int = 0

    def __post_init__(self) -> None:
        if self.lb_algorithm not in ALGORITHMS:
            raise ValueError(f"lb_algorithm must be random or maglev, not {self.lb_algorithm!r}")
        maglev.validate_table_size(self.maglev_table_size)


@dataclass
class MapView:
    """What lbd's maps hold (read from the kernel, or as left by the last applied plan).

    Only the maps the control plane owns; conntrack, affinity and socket reverse entries
    belong to the datapath. Maglev tables are summarised by the set of backend ids they
    hold (a table is recomputed only when that set must change).
    """

    services: dict[tuple[Frontend, int], ServiceValue] = field(default_factory=dict)
    backends: dict[int, Backend] = field(default_factory=dict)
    rev_nat: dict[int, RevNat] = field(default_factory=dict)
    maglev: dict[int, frozenset[int]] = field(default_factory=dict)
    aff_match: set[tuple[int, int]] = field(default_factory=set)  # (backend_id, svc_id)
    src_ranges: set[SourceRange] = field(default_factory=set)
    svc_names: dict[int, str] = field(default_factory=dict)
    config: Config | None = None
    # Highest id ever written per id space (not in the kernel: a restarted daemon starts
    # from the highest id the maps hold). Keeps freed ids from being reused at once.
    high_water: dict[str, int] = field(default_factory=dict, compare=False)

    def copy(self) -> MapView:
        return MapView(
            dict(self.services),
            dict(self.backends),
            dict(self.rev_nat),
            dict(self.maglev),
            set(self.aff_match),
            set(self.src_ranges),
            dict(self.svc_names),
            self.config,
            dict(self.high_water),
        )

    def _mark(self, space: str, ident: int) -> None:
        if ident > self.high_water.get(space, 0):
            self.high_water[space] = ident

    def frontend_slots(self) -> dict[Frontend, dict[int, ServiceValue]]:
        out: dict[Frontend, dict[int, ServiceValue]] = {}
        for (fe, slot), val in self.services.items():
            out.setdefault(fe, {})[slot] = val
        return out

    def apply(self, op: Op) -> None:
        """Record one applied write (the planner's model of the kernel)."""
        delete = op.value is None
        if op.map == SERVICES:
            _put(self.services, op.key, op.value)
        elif op.map == BACKENDS:
            _put(self.backends, op.key, op.value)
            self._mark(BACKENDS, op.key)
        elif op.map == REV_NAT:
            _put(self.rev_nat, op.key, op.value)
            self._mark(REV_NAT, op.key)
        elif op.map == MAGLEV:
            _put(self.maglev, op.key, None if delete else frozenset(op.value))
        elif op.map == AFF_MATCH:
            (self.aff_match.discard if delete else self.aff_match.add)(op.key)
        elif op.map == SRC_RANGE:
            (self.src_ranges.discard if delete else self.src_ranges.add)(op.key)
        elif op.map == SVC_NAMES:
            _put(self.svc_names, op.key, op.value)
            self._mark(SVC_NAMES, op.key)
        elif op.map == CONFIG:
            self.config = op.value
        else:  # pragma: no cover - a planner bug
            raise ValueError(f"unknown map {op.map}")


def _put(d: dict, key: Any, value: Any) -> None:
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


@dataclass(frozen=True, slots=True)
class Op:
    """One map write: `value` None deletes `key`.

    Keys/values per map: lbd_services (Frontend, slot) → ServiceValue; lbd_backends and
    lbd_revnat id → Backend / RevNat; lbd_maglev svc_id → tuple of backend ids (the whole
    table); lbd_aff_match (backend_id, svc_id) → True; lbd_srcrange SourceRange → True;
    lbd_svcnames svc_id → name; lbd_config 0 → Config.
    """

    map: str
    key: Any
    value: Any = None

    @property
    def is_delete(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Plan:
    ops: tuple[Op, ...]
    changed_service_ports: int
    frontends: int  # frontend entries (slot 0) the state wants, both scopes
    backends: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            k = f"{op.map}_{'delete' if op.is_delete else 'write'}"
            out[k] = out.get(k, 0) + 1
        return out


@dataclass(frozen=True, slots=True)
class _Want:
    """What one frontend entry must serve."""

    sp: ServicePort
    view: str  # VIEW_CLUSTER | VIEW_LOCAL
    flags: int
    view_key: str  # svc_name(sp, view)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.sp.local_endpoints if self.view == VIEW_LOCAL else self.sp.cluster_endpoints


def svc_name(sp: ServicePort, view: str) -> str:
    """The lbd_svcnames value of a service port's endpoint view ("ns/name:port/tcp/v4#view")."""
    return f"{sp.key}#{view}"


def _order(fe: Frontend) -> tuple[int, int, str, int, int]:
    """A sort key for frontends that compares in C (dataclass ordering builds tuples)."""
    return (fe.scope, fe.family, fe.addr, fe.port, fe.proto)


class _Ids:
    """Allocates ids above the highest in use, so a freed id is not handed out again soon
    (conntrack and affinity entries may still name it)."""

    def __init__(self, used: Iterable[int], high_water: int = 0) -> None:
        self.used = set(used)
        self.next = max(max(self.used, default=0), high_water) + 1

    def take(self) -> int:
        for _ in range(3):
            while self.next in self.used and self.next <= _MAX_ID:
                self.next += 1
            if self.next <= _MAX_ID:
                self.used.add(self.next)
                return self.next
            self.next = 1
        raise RuntimeError("no free id left")  # pragma: no cover - 4 billion ids in use


@functools.lru_cache(maxsize=1 << 18)
def _canonical(ip: str, family: int) -> str | None:
    # cached: every sync sees the same addresses again (10k services: ~1 s saved)
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version != family:
        return None
    return str(addr)


def nodeport_addresses(state: ProxyState, family: IPFamily) -> list[str]:
    """The node addresses that expose node ports in `family` (--nodeport-addresses)."""
    fam = int(family)
    ips = [c for ip in state.node_ips if (c := _canonical(ip, fam))]
    if not state.nodeport_addresses:
        return ips
    nets = []
    for cidr in state.cidrs(family, state.nodeport_addresses):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    return [ip for ip in ips if any(ipaddress.ip_address(ip) in n for n in nets)]


def frontends_of(sp: ServicePort, node_ips: tuple[str, ...]) -> list[tuple[Frontend, _Want]]:
    """The frontend entries of one service port (`node_ips`: its family's node-port
    addresses), in the order they claim frontends."""
    out: list[tuple[Frontend, _Want]] = []
    proto = PROTO_NUMBERS.get(sp.protocol.value)
    if proto is None:
        return out
    fam = int(sp.family)
    has_endpoints = bool(sp.cluster_endpoints or sp.local_endpoints)
    base = (SVC_AFFINITY if sp.session_affinity_timeout else 0) | (
        0 if has_endpoints else SVC_REJECT
    )
    sp_key = sp.key
    names = {VIEW_CLUSTER: f"{sp_key}#{VIEW_CLUSTER}", VIEW_LOCAL: f"{sp_key}#{VIEW_LOCAL}"}
    cluster_ip = _canonical(sp.cluster_ip, fam) if sp.cluster_ip else None
    if cluster_ip:
        view = VIEW_LOCAL if sp.internal_policy_local else VIEW_CLUSTER
        out.append((Frontend(cluster_ip, sp.port, proto, fam), _Want(sp, view, base, names[view])))
    externals: list[tuple[str, int, int]] = []
    if sp.node_port:
        externals += [(ip, sp.node_port, SVC_NODEPORT) for ip in node_ips]
    externals += [(ip, sp.port, SVC_EXTERNAL_IP) for ip in sp.external_ips]
    ranges = bool(sp.load_balancer_source_ranges)
    externals += [
        (ip, sp.port, SVC_LOADBALANCER | (SVC_SRC_RANGE if ranges else 0))
        for ip in sp.load_balancer_ips
    ]
    for ip, port, kind in externals:
        addr = _canonical(ip, fam)
        if addr is None:
            continue
        flags = base | SVC_EXTERNAL | kind
        if not sp.external_policy_local:
            out.append(
                (
                    Frontend(addr, port, proto, fam),
                    _Want(sp, VIEW_CLUSTER, flags, names[VIEW_CLUSTER]),
                )
            )
            continue
        flags |= SVC_LOCAL | SVC_TWO_SCOPES
        out.append(
            (
                Frontend(addr, port, proto, fam, SCOPE_EXT),
                _Want(sp, VIEW_LOCAL, flags, names[VIEW_LOCAL]),
            )
        )
        # In-cluster clients are not subject to the external policy (but, as with
        # kube-proxy's FW chain, they are to the source ranges).
        internal = base | SVC_EXTERNAL | kind
        out.append(
            (
                Frontend(addr, port, proto, fam, SCOPE_INT),
                _Want(sp, VIEW_CLUSTER, internal, names[VIEW_CLUSTER]),
            )
        )
    return out


class FrontendCache:
    """Memoises `frontends_of` per service port across syncs (validated by equality, and
    dropped when the node's addresses change), so a sync that changes one service port
    does not rebuild the frontends of ten thousand others."""

    def __init__(self) -> None:
        self._node: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._by_key: dict[object, tuple[ServicePort, list[tuple[Frontend, _Want]]]] = {}

    def get(self, state: ProxyState) -> list[list[tuple[Frontend, _Want]]]:
        node = (state.node_ips, state.nodeport_addresses)
        if node != self._node:
            self._node = node
            self._by_key.clear()
        ips = {f: tuple(nodeport_addresses(state, f)) for f in (IPFamily.V4, IPFamily.V6)}
        out = []
        fresh: dict[object, tuple[ServicePort, list[tuple[Frontend, _Want]]]] = {}
        for key in sorted(state.service_ports, key=_sp_order):
            sp = state.service_ports[key]
            hit = self._by_key.get(key)
            if hit is not None and (hit[0] is sp or hit[0] == sp):
                entries = hit[1]
            else:
                entries = frontends_of(sp, ips[sp.family])
            fresh[key] = (sp, entries)
            out.append(entries)
        self._by_key = fresh
        return out


def _sp_order(key: tuple[ServicePortName, IPFamily]) -> tuple[str, str, str, str, int]:
    # ServicePortName's generated ordering builds tuples per comparison; these compare in C
    n = key[0]
    return (n.namespace, n.name, n.port, n.protocol.value, int(key[1]))


def desired_frontends(
    state: ProxyState, cache: FrontendCache | None = None
) -> dict[Frontend, _Want]:
    """Every frontend entry the state asks for (both scopes), first service port wins."""
    out: dict[Frontend, _Want] = {}
    for entries in (cache or FrontendCache()).get(state):
        for fe, want in entries:
            other = out.get(fe)
            if other is not None:
                log.warning(
                    "frontend claimed twice; keeping the first",
                    frontend=str(fe),
                    kept=str(other.sp.name),
                    skipped=str(want.sp.name),
                )
                continue
            out[fe] = want
    return out


def assign_slots(current: dict[int, int], count: int, wanted: list[int]) -> list[int]:
    """Backend ids for slots 1..n, moving as few as possible from `current` (slot → id,
    of which the first `count` are live).

    Kept backends keep their slot; new ones fill the holes of removed ones first, then
    append; leftover holes are filled with the last slot's backend (one write, then the
    tail is dropped), so one endpoint change touches one slot.
    """
    want = set(wanted)
    slots: list[int | None] = []
    placed: set[int] = set()
    for i in range(1, count + 1):
        b = current.get(i)
        if b is not None and b in want and b not in placed:
            slots.append(b)
            placed.add(b)
        else:
            slots.append(None)
    missing = [b for b in wanted if b not in placed]
    holes = [i for i, b in enumerate(slots) if b is None]
    for i, b in zip(holes, missing, strict=False):
        slots[i] = b
    slots.extend(missing[len(holes) :])
    i = 0
    while i < len(slots):
        while slots and slots[-1] is None:
            slots.pop()
        if i < len(slots) and slots[i] is None:
            slots[i] = slots.pop()
        i += 1
    return [b for b in slots if b is not None]


def _config(state: ProxyState, options: PlanOptions) -> Config:
    def first(family: int) -> str:
        for ip in state.node_ips:
            if c := _canonical(ip, family):
                return c
        return ""

    flags = (CFG_MAGLEV if options.lb_algorithm == "maglev" else 0) | (
        CFG_HOSTNS_ONLY if options.hostns_only else 0
    )
    return Config(
        node_addr4=first(FAMILY_V4),
        node_addr6=first(FAMILY_V6),
        host_netns_cookie=options.host_netns_cookie,
        flags=flags,
        snat_port_min=options.snat_port_min,
        snat_port_max=options.snat_port_max,
    )


def _backend_of(ep: Endpoint, family: int) -> Backend | None:
    addr = _canonical(ep.ip, family)
    if addr is None or not 0 < ep.port < 65536:
        return None
    return Backend(addr, ep.port, family, BACKEND_LOCAL if ep.is_local else 0)


def changed_service_ports(previous: ProxyState, state: ProxyState) -> set[str]:
    """`ServicePort.key`s of the service ports added, removed or changed."""
    out = set()
    old, new = previous.service_ports, state.service_ports
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if a is b:
            continue
        if a is None or b is None or a != b:
            out.add((a or b).key)  # type: ignore[union-attr]
    return out


def plan(
    state: ProxyState,
    view: MapView,
    options: PlanOptions | None = None,
    *,
    previous: ProxyState | None = None,
    cache: FrontendCache | None = None,
) -> Plan:
    """The writes that make `view` implement `state` (see the module docstring).

    With `previous` (the state `view` was last made to implement, by plans of this
    function, with nothing else writing the maps), only the service ports that differ
    between the two are planned: the entries of every other one are trusted to be
    right and kept as they are. Without it every entry is compared (a full sync, which
    also repairs whatever changed behind lbd's back). `cache` memoises per-service-port
    work across calls.
    """
    options = options or PlanOptions()
    wants = desired_frontends(state, cache)
    current_slots = view.frontend_slots()
    n_frontends = len(wants)

    # --- incremental: restrict everything below to the frontends of changed ports -------
    kept: dict[Frontend, dict[int, ServiceValue]] = {}
    if (
        previous is not None
        and previous.node_ips == state.node_ips
        and previous.nodeport_addresses == state.nodeport_addresses
        and view.config == _config(state, options)
    ):
        changed = changed_service_ports(previous, state)
        affected = {fe for fe, w in wants.items() if w.view_key.split("#", 1)[0] in changed}
        for fe, slots in current_slots.items():
            head = slots.get(0)
            name = view.svc_names.get(head.svc_id, "") if head is not None else ""
            if head is None or name.split("#", 1)[0] in changed:
                affected.add(fe)
        kept = {fe: slots for fe, slots in current_slots.items() if fe not in affected}
        wants = {fe: w for fe, w in wants.items() if fe in affected}
        current_slots = {fe: slots for fe, slots in current_slots.items() if fe in affected}

    # --- backends: adopt ids by address ------------------------------------------------
    backend_ids: dict[tuple[str, int], int] = {}
    for bid in sorted(view.backends):
        b = view.backends[bid]
        backend_ids.setdefault((b.addr, b.port), bid)
    ids = _Ids(view.backends, view.high_water.get(BACKENDS, 0))
    want_backends: dict[int, Backend] = {}
    view_backends: dict[str, list[int]] = {}  # view key -> backend ids, sorted by address
    for want in wants.values():
        key = want.view_key
        if key in view_backends:
            continue
        chosen: dict[tuple[str, int], int] = {}
        for ep in want.endpoints:
            b = _backend_of(ep, int(want.sp.family))
            if b is None:
                continue
            bid = backend_ids.get((b.addr, b.port))
            if bid is None:
                bid = ids.take()
                backend_ids[(b.addr, b.port)] = bid
            want_backends.setdefault(bid, b)
            chosen[(b.addr, b.port)] = bid
        view_backends[key] = [chosen[k] for k in sorted(chosen)]

    # --- svc ids: adopt by name, else from the frontends that use them -----------------
    svc_ids: dict[str, int] = {}
    taken: set[int] = set()
    for sid in sorted(view.svc_names):
        name = view.svc_names[sid]
        if name in view_backends and name not in svc_ids:
            svc_ids[name] = sid
            taken.add(sid)
    for fe in sorted(wants, key=_order):
        name = wants[fe].view_key
        cur = current_slots.get(fe, {}).get(0)
        # A frontend's id is adoptable when no name (hence no other view) claims it.
        if (
            name not in svc_ids
            and cur is not None
            and cur.svc_id
            and cur.svc_id not in taken
            and cur.svc_id not in view.svc_names
        ):
            svc_ids[name] = cur.svc_id
            taken.add(cur.svc_id)
    sid_alloc = _Ids(
        [*view.svc_names, *view.maglev, *(v.svc_id for v in view.services.values()), *taken],
        view.high_water.get(SVC_NAMES, 0),
    )
    for name in sorted(view_backends):
        if name not in svc_ids:
            svc_ids[name] = sid_alloc.take()

    # --- reverse NAT: one id per frontend address (both scopes share it) ---------------
    rev_ids: dict[tuple[str, int, int, int], int] = {}
    rid_used: set[int] = set()
    for fe in sorted(wants, key=_order):
        addr_key = (fe.addr, fe.port, fe.proto, fe.family)
        if addr_key in rev_ids:
            continue
        cur = current_slots.get(fe, {}).get(0)
        if cur is not None and cur.rev_nat_id and cur.rev_nat_id not in rid_used:
            rev_ids[addr_key] = cur.rev_nat_id
            rid_used.add(cur.rev_nat_id)
    rid_alloc = _Ids(
        [*view.rev_nat, *rid_used, *(v.rev_nat_id for v in view.services.values())],
        view.high_water.get(REV_NAT, 0),
    )
    want_rev: dict[int, RevNat] = {}
    for fe in sorted(wants, key=_order):
        addr_key = (fe.addr, fe.port, fe.proto, fe.family)
        if addr_key not in rev_ids:
            rev_ids[addr_key] = rid_alloc.take()
        want_rev[rev_ids[addr_key]] = RevNat(fe.addr, fe.port, fe.family)

    # --- per view: names, Maglev tables, affinity membership ---------------------------
    want_names: dict[int, str] = {svc_ids[name]: name for name in view_backends}
    use_maglev = options.lb_algorithm == "maglev"
    affinity_views = {w.view_key for w in wants.values() if w.flags & SVC_AFFINITY}
    want_aff: set[tuple[int, int]] = set()
    maglev_writes: dict[int, tuple[int, ...]] = {}
    want_maglev: dict[int, frozenset[int]] = {}
    for name, bids in view_backends.items():
        sid = svc_ids[name]
        if name in affinity_views:
            want_aff.update((bid, sid) for bid in bids)
        if use_maglev and bids:
            want_maglev[sid] = frozenset(bids)
            if view.maglev.get(sid) != want_maglev[sid]:
                by_name = {str(want_backends[bid]): bid for bid in bids}
                table = maglev.lookup_table(by_name, options.maglev_table_size)
                maglev_writes[sid] = tuple(by_name[n] for n in table)

    # --- what the frontends left alone still reference (incremental plans only) ---------
    kept_sids: set[int] = set()
    kept_rids: set[int] = set()
    for slots in kept.values():
        for i, v in slots.items():
            if i == 0:
                kept_sids.add(v.svc_id)
                kept_rids.add(v.rev_nat_id)
            elif v.backend_id in view.backends:
                want_backends.setdefault(v.backend_id, view.backends[v.backend_id])
    for rid in kept_rids:
        if rid in view.rev_nat:
            want_rev.setdefault(rid, view.rev_nat[rid])
    for sid in kept_sids:
        if sid in view.svc_names:
            want_names.setdefault(sid, view.svc_names[sid])
        if sid in view.maglev and sid not in want_maglev:
            want_maglev[sid] = view.maglev[sid]
    want_aff |= {k for k in view.aff_match if k[1] in kept_sids}

    # --- services: slot 0 + slots, diffed per frontend ----------------------------------
    service_groups: list[list[Op]] = []
    changed_ports: set[str] = set()
    want_ranges: set[SourceRange] = set()
    # INT entries before the EXT entries that announce them
    for fe in sorted(wants, key=lambda f: (-f.scope, *_order(f)[1:])):
        want = wants[fe]
        sid = svc_ids[want.view_key]
        rid = rev_ids[(fe.addr, fe.port, fe.proto, fe.family)]
        if want.flags & SVC_SRC_RANGE:
            for cidr in want.sp.load_balancer_source_ranges:
                try:
                    net = ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    continue
                if net.version == fe.family:
                    want_ranges.add(SourceRange(rid, str(net)))
        cur = current_slots.get(fe, {})
        cur0 = cur.get(0)
        old_count = cur0.count if cur0 is not None else 0
        slots = assign_slots(
            {i: v.backend_id for i, v in cur.items() if i}, old_count, view_backends[want.view_key]
        )
        entry = ServiceValue(
            backend_id=0,
            svc_id=sid,
            rev_nat_id=rid,
            affinity_timeout=want.sp.session_affinity_timeout if want.flags & SVC_AFFINITY else 0,
            count=len(slots),
            flags=want.flags,
        )
        slot_writes = [
            Op(SERVICES, (fe, i), ServiceValue(backend_id=bid))
            for i, bid in enumerate(slots, 1)
            if cur.get(i) != ServiceValue(backend_id=bid)
        ]
        slot_deletes = [Op(SERVICES, (fe, i)) for i in sorted(cur) if i > len(slots)]
        head = [Op(SERVICES, (fe, 0), entry)] if cur0 != entry else []
        if len(slots) >= old_count:
            group = slot_writes + head + slot_deletes
        else:
            group = head + slot_writes + slot_deletes
        if group:
            service_groups.append(group)
            changed_ports.add(want.view_key.split("#", 1)[0])
    want_ranges |= {r for r in view.src_ranges if r.rev_nat_id in kept_rids}
    removed_groups: list[list[Op]] = []
    for fe in sorted(set(current_slots) - set(wants), key=_order):
        cur = current_slots[fe]
        group = [Op(SERVICES, (fe, 0))] if 0 in cur else []
        group += [Op(SERVICES, (fe, i)) for i in sorted(cur) if i]
        removed_groups.append(group)
    for sid, name in view.svc_names.items():
        if sid not in want_names:
            changed_ports.add(name.split("#", 1)[0])

    # --- assemble: creations, services, then deletions ----------------------------------
    ops: list[Op] = []
    config = _config(state, options)
    if view.config != config:
        ops.append(Op(CONFIG, 0, config))
    ops += [
        Op(BACKENDS, bid, b)
        for bid, b in sorted(want_backends.items())
        if view.backends.get(bid) != b
    ]
    ops += [Op(REV_NAT, k, r) for k, r in sorted(want_rev.items()) if view.rev_nat.get(k) != r]
    ops += [
        Op(SVC_NAMES, k, n) for k, n in sorted(want_names.items()) if view.svc_names.get(k) != n
    ]
    ops += [Op(AFF_MATCH, k, True) for k in sorted(want_aff - view.aff_match)]
    ops += [Op(SRC_RANGE, r, True) for r in sorted(want_ranges - view.src_ranges)]
    ops += [Op(MAGLEV, sid, t) for sid, t in sorted(maglev_writes.items())]
    for group in service_groups + removed_groups:
        ops += group
    ops += [Op(MAGLEV, sid) for sid in sorted(set(view.maglev) - set(want_maglev))]
    ops += [Op(SRC_RANGE, r) for r in sorted(view.src_ranges - want_ranges)]
    ops += [Op(AFF_MATCH, k) for k in sorted(view.aff_match - want_aff)]
    ops += [Op(SVC_NAMES, sid) for sid in sorted(set(view.svc_names) - set(want_names))]
    ops += [Op(REV_NAT, rid) for rid in sorted(set(view.rev_nat) - set(want_rev))]
    ops += [Op(BACKENDS, bid) for bid in sorted(set(view.backends) - set(want_backends))]
    return Plan(
        ops=tuple(ops),
        changed_service_ports=len(changed_ports),
        frontends=n_frontends,
        backends=len(want_backends),
    )


def apply_to_view(view: MapView, ops: Iterable[Op]) -> MapView:
    """The view after `ops` (pure: `view` is not modified)."""
    out = view.copy()
    for op in ops:
        out.apply(op)
    return out
