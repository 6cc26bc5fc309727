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
import itertools
import operator
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

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
    # lb_config.takeover_until_ns: CLOCK_MONOTONIC end of a takeover from another mode
    takeover_until_ns: int = 0

    def __post_init__(self) -> None:
        if self.lb_algorithm not in ALGORITHMS:
            raise ValueError(f"lb_algorithm must be random or maglev, not {self.lb_algorithm!r}")
        maglev.validate_table_size(self.maglev_table_size)


# A frontend's lbd_services entries, as a list indexed by slot: [0] its head (a
# ServiceValue; None when the map lacks it), [i] the id of the backend in slot i (None
# where the map has no entry; the whole ServiceValue where the map holds one that is not a
# plain backend slot, which only a foreign writer leaves). It never ends in None. One list
# per frontend rather than one entry per slot: a full sync at 10k services records,
# packs and compares 11k of these instead of 121k entries.
Slots = list[Any]


def slot_backend(value: Any) -> int | None:
    """The backend id a slot value (an element of Slots past the head) names, if any."""
    if value is None or value.__class__ is int:
        return value
    return value.backend_id


def slot_value(value: Any) -> ServiceValue:
    """A Slots element as the lbd_services value the kernel holds."""
    if value.__class__ is int:
        return _new(ServiceValue, (value, *_ZEROS))
    return value


def _as_slot(value: ServiceValue) -> Any:
    # a backend slot written whole is recorded as its id, as a read-back records it
    return value[0] if value.__class__ is not int and not any(value[1:]) else value


_FILLS: dict[int, tuple[int, ...]] = {}


def fill_slots(n: int) -> tuple[int, ...]:
    """The slot order of a frontend written whole: backend slots 1..n, then the head that
    announces them (one tuple per n, shared: MapView.apply_run knows a fill by identity)."""
    t = _FILLS.get(n)
    if t is None:
        t = _FILLS[n] = (*range(1, n + 1), 0)
    return t


@dataclass
class MapView:
    """What lbd's maps hold (read from the kernel, or as left by the last applied plan).

    Only the maps the control plane owns; conntrack, affinity and socket reverse entries
    belong to the datapath. lbd_services is held per frontend (`Slots`). Maglev tables
    are summarised by the set of backend ids they hold (a table is recomputed only when
    that set must change).

    Change it through `apply` only: it keeps derived indexes (`index()`) in step, which
    let an incremental plan touch only what one service port references. Code that edits
    the containers directly (tests simulating damage) must do so on a fresh `copy()`,
    whose index is built from them when first needed.
    """

    frontends: dict[Frontend, Slots] = field(default_factory=dict)
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
    _ix: _Index | None = field(default=None, compare=False, repr=False)
    # lbd_services entries in `frontends`, kept by `apply` once counted (a sync reports
    # map fill levels: no walk of 10k frontends for that)
    _n_services: int | None = field(default=None, compare=False, repr=False)

    @property
    def services(self) -> dict[tuple[Frontend, int], ServiceValue]:
        """Every lbd_services entry, (frontend, slot) → value: a new dict on each call
        (for `lbd status` and tests; the planner works on `frontends`)."""
        return {
            (fe, i): slot_value(v)
            for fe, slots in self.frontends.items()
            for i, v in enumerate(slots)
            if v is not None
        }

    def live_backends(self, fe: Frontend) -> list[Backend]:
        """The backends in the slots `fe`'s head exposes (1..count), in slot order."""
        slots = self.frontends.get(fe)
        head = slots[0] if slots else None
        if head is None:
            return []
        found = (self.backends.get(b) for b in map(slot_backend, slots[1 : head.count + 1]))
        return [b for b in found if b is not None]

    def copy(self) -> MapView:
        return MapView(
            {fe: list(slots) for fe, slots in self.frontends.items()},
            dict(self.backends),
            dict(self.rev_nat),
            dict(self.maglev),
            set(self.aff_match),
            set(self.src_ranges),
            dict(self.svc_names),
            self.config,
            dict(self.high_water),
        )

    def index(self) -> _Index:
        """The derived indexes, built on first use and maintained by `apply`."""
        if self._ix is None:
            self._ix = _Index.build(self)
        return self._ix

    def _mark(self, space: str, ident: int) -> None:
        if ident > self.high_water.get(space, 0):
            self.high_water[space] = ident

    def counts(self) -> dict[str, int]:
        """Entries per control-plane map (what the kernel holds after the plans so far)."""
        return {
            SERVICES: self._service_entries(),
            BACKENDS: len(self.backends),
            REV_NAT: len(self.rev_nat),
            MAGLEV: len(self.maglev),
            AFF_MATCH: len(self.aff_match),
            SRC_RANGE: len(self.src_ranges),
            SVC_NAMES: len(self.svc_names),
        }

    def fill_index(self, backend_ids: dict[tuple[str, int], int]) -> None:
        """Index and count a view a plan built whole (Plan.expected) in bulk: every slot
        a backend id, every frontend with its head, one id per backend address
        (`backend_ids`)."""
        ix = self._ix = _Index()
        ix.backend_ids = {addr: [bid] for addr, bid in backend_ids.items()}
        slots = self.frontends.values()
        ix.backend_refs = Counter(itertools.chain.from_iterable(map(_TAIL, slots)))
        for fe, fe_slots in self.frontends.items():
            ix.slot(fe, 0, None, fe_slots[0])
        ix.add_members(self)
        self._n_services = sum(map(len, slots))
        for space, ids in (
            (BACKENDS, self.backends),
            (REV_NAT, self.rev_nat),
            (SVC_NAMES, (*self.svc_names, *self.maglev)),
        ):
            self._mark(space, max(ids, default=0))

    def _service_entries(self) -> int:
        if self._n_services is None:
            self._n_services = sum(len(s) - s.count(None) for s in self.frontends.values())
        return self._n_services

    def apply(self, op: Op) -> None:
        """Record one applied write (the planner's model of the kernel)."""
        m, key, value = op
        ix = self._ix
        if m == SERVICES:
            self._apply_slots(key[0], key[1], value)
        elif m == BACKENDS:
            old = self.backends.get(key)
            _put(self.backends, key, value)
            self._mark(BACKENDS, key)
            if ix is not None:
                ix.backend(key, old, value)
        elif m == REV_NAT:
            _put(self.rev_nat, key, value)
            self._mark(REV_NAT, key)
        elif m == MAGLEV:
            _put(self.maglev, key, None if value is None else frozenset(value))
            self._mark(SVC_NAMES, key)
        elif m == AFF_MATCH:
            if value is None:
                self.aff_match.discard(key)
            else:
                self.aff_match.add(key)
            if ix is not None:
                ix.aff(key, value is not None)
        elif m == SRC_RANGE:
            if value is None:
                self.src_ranges.discard(key)
            else:
                self.src_ranges.add(key)
            if ix is not None:
                ix.src_range(key, value is not None)
        elif m == SVC_NAMES:
            old = self.svc_names.get(key)
            _put(self.svc_names, key, value)
            self._mark(SVC_NAMES, key)
            if ix is not None:
                ix.svc_name(key, old, value)
        elif m == CONFIG:
            self.config = value
        else:  # pragma: no cover - a planner bug
            raise ValueError(f"unknown map {m}")

    def _apply_slots(
        self, fe: Frontend, numbers: Sequence[int], values: Sequence[Any] | None
    ) -> None:
        """Record writes (or, `values` None, deletions) of one frontend's slots."""
        ix = self._ix
        cur = self.frontends.get(fe)
        n = 0  # entries added (deleted: negative)
        if values is None:
            if cur is None:
                return
            for i in numbers:
                if i < len(cur) and cur[i] is not None:
                    old, cur[i] = cur[i], None
                    n -= 1
                    if ix is not None:
                        ix.slot(fe, i, old, None)
            while cur and cur[-1] is None:
                cur.pop()
            if not cur:
                del self.frontends[fe]
        else:
            if cur is None:
                self.frontends[fe] = cur = []
            for i, v in zip(numbers, values, strict=True):
                if i:
                    v = _as_slot(v)
                else:
                    self._mark(SVC_NAMES, v.svc_id)
                    self._mark(REV_NAT, v.rev_nat_id)
                if i >= len(cur):
                    cur.extend([None] * (i + 1 - len(cur)))
                old, cur[i] = cur[i], v
                n += old is None
                if ix is not None:
                    ix.slot(fe, i, old, v)
        if self._n_services is not None:
            self._n_services += n

    def apply_all(self, ops: Sequence[Op], runs: Sequence[Run] | None = None) -> None:
        """`apply` each of `ops` (whose maximal runs are `runs`, if known)."""
        for m, delete, start, stop in runs if runs is not None else runs_of(ops):
            self.apply_run(m, delete, ops[start:stop])

    def apply_run(self, m: str, delete: bool, ops: Sequence[Op]) -> None:
        """`apply` each of `ops`, all writes (or all deletions, `delete`) to map `m`, with
        fast paths for what a full sync writes in bulk (new frontends and backends: a
        quarter of a million entries at 10k services): one loop per run, no per-op
        dispatch, no per-slot step for a frontend written whole."""
        ix = self._ix
        if delete or ix is None:
            for op in ops:
                self.apply(op)
        elif m == SERVICES:
            frontends, refs, sid_fes, rid_fes = (
                self.frontends,
                ix.backend_refs,
                ix.sid_fes,
                ix.rid_fes,
            )
            top_sid, top_rid = self.high_water.get(SVC_NAMES, 0), self.high_water.get(REV_NAT, 0)
            added = 0
            for op in ops:
                fe, numbers = op[1]
                values = op[2]
                if fe in frontends or numbers is not _FILLS.get(len(numbers) - 1):
                    self.apply(op)
                    continue
                # a new frontend written whole: (*backend ids, head) in fill order
                head = values[-1]
                frontends[fe] = [head, *values[:-1]]
                added += len(values)
                refs.update(values[:-1])
                sid, rid = head[1], head[2]
                got = sid_fes.get(sid)
                if got is None:
                    sid_fes[sid] = {fe}
                else:
                    got.add(fe)
                got = rid_fes.get(rid)
                if got is None:
                    rid_fes[rid] = {fe}
                else:
                    got.add(fe)
                if sid > top_sid:
                    top_sid = sid
                if rid > top_rid:
                    top_rid = rid
            self._mark(SVC_NAMES, top_sid)
            self._mark(REV_NAT, top_rid)
            if self._n_services is not None:
                self._n_services += added
        elif m == BACKENDS:
            backends, backend_ids = self.backends, ix.backend_ids
            insert = backends.setdefault
            top = self.high_water.get(BACKENDS, 0)
            for op in ops:
                key, value = op[1], op[2]
                n = len(backends)
                insert(key, value)
                if len(backends) == n:  # rewritten (setdefault kept the old value)
                    self.apply(op)
                    continue
                if key > top:
                    top = key
                addr = (value[0], value[1])
                ids = backend_ids.get(addr)
                if ids is None:
                    backend_ids[addr] = [key]
                else:
                    ids.append(key)
            self._mark(BACKENDS, top)
        elif m == REV_NAT:  # no index: one bulk update
            self.rev_nat.update(map(_KEY_VALUE, ops))
            self._mark(REV_NAT, max(op[1] for op in ops))
        else:
            for op in ops:
                self.apply(op)


class _Index:
    """Reverse indexes over a MapView, kept in step by MapView.apply: who references
    what, and ids by address/name, so that planning one service port costs as much as
    that port has entries, not as much as the whole view."""

    __slots__ = (
        "backend_ids",
        "backend_refs",
        "sid_names",
        "sid_fes",
        "rid_fes",
        "aff_by_sid",
        "src_by_rid",
    )

    def __init__(self) -> None:
        self.backend_ids: dict[tuple[str, int], list[int]] = {}  # (addr, port) → ids
        self.backend_refs: Counter[int] = Counter()  # backend id → slots naming it
        self.sid_names: dict[str, list[int]] = {}  # svc name → svc ids holding it
        self.sid_fes: dict[int, set[Frontend]] = {}  # svc id → frontends (heads) naming it
        self.rid_fes: dict[int, set[Frontend]] = {}  # rev-NAT id → frontends naming it
        self.aff_by_sid: dict[int, set[int]] = {}  # svc id → backend ids (lbd_aff_match)
        self.src_by_rid: dict[int, set[SourceRange]] = {}

    @classmethod
    def build(cls, view: MapView) -> _Index:
        ix = cls()
        refs = ix.backend_refs
        for fe, slots in view.frontends.items():
            head = slots[0]
            if head is not None:
                ix.slot(fe, 0, None, head)
            refs.update(b for b in map(slot_backend, slots[1:]) if b is not None)
        for bid, b in view.backends.items():
            ix.backend(bid, None, b)
        ix.add_members(view)
        # ids are never handed out below what the maps hold (see _Ids)
        hw = view.high_water
        spaces = (
            (BACKENDS, (view.backends, ix.backend_refs)),
            (REV_NAT, (view.rev_nat, ix.rid_fes)),
            (SVC_NAMES, (view.svc_names, view.maglev, ix.sid_fes)),
        )
        for space, sources in spaces:
            top = max((max(src, default=0) for src in sources), default=0)
            if top > hw.get(space, 0):
                hw[space] = top
        return ix

    def add_members(self, view: MapView) -> None:
        """Index the view's svc names, affinity members and source ranges."""
        for sid, name in view.svc_names.items():
            self.svc_name(sid, None, name)
        for k in view.aff_match:
            self.aff(k, True)
        for r in view.src_ranges:
            self.src_range(r, True)

    def slot(self, fe: Frontend, i: int, old: Any, new: Any) -> None:
        """Slot `i` of `fe` went from `old` to `new` (Slots elements; None: absent)."""
        if i == 0:
            if old is not None:
                _discard(self.sid_fes, old.svc_id, fe)
                _discard(self.rid_fes, old.rev_nat_id, fe)
            if new is not None:
                self.sid_fes.setdefault(new.svc_id, set()).add(fe)
                self.rid_fes.setdefault(new.rev_nat_id, set()).add(fe)
            return
        refs = self.backend_refs
        bid = slot_backend(old)
        if bid is not None:
            n = refs[bid] - 1
            if n > 0:
                refs[bid] = n
            else:
                refs.pop(bid, None)
        bid = slot_backend(new)
        if bid is not None:
            refs[bid] += 1

    def backend(self, bid: int, old: Backend | None, new: Backend | None) -> None:
        if old is not None:
            _discard_list(self.backend_ids, (old.addr, old.port), bid)
        if new is not None:
            self.backend_ids.setdefault((new.addr, new.port), []).append(bid)

    def backend_id(self, addr: str, port: int) -> int | None:
        """The id a backend at addr:port is adopted under (the lowest holding it)."""
        ids = self.backend_ids.get((addr, port))
        return min(ids) if ids else None

    def svc_name(self, sid: int, old: str | None, new: str | None) -> None:
        if old is not None:
            _discard_list(self.sid_names, old, sid)
        if new is not None:
            self.sid_names.setdefault(new, []).append(sid)

    def svc_id(self, name: str) -> int | None:
        ids = self.sid_names.get(name)
        return min(ids) if ids else None

    def aff(self, key: tuple[int, int], present: bool) -> None:
        bid, sid = key
        if present:
            self.aff_by_sid.setdefault(sid, set()).add(bid)
        else:
            _discard(self.aff_by_sid, sid, bid)

    def src_range(self, r: SourceRange, present: bool) -> None:
        if present:
            self.src_by_rid.setdefault(r.rev_nat_id, set()).add(r)
        else:
            _discard(self.src_by_rid, r.rev_nat_id, r)


def _discard(d: dict[Any, set[Any]], key: Any, member: Any) -> None:
    s = d.get(key)
    if s is not None:
        s.discard(member)
        if not s:
            del d[key]


def _discard_list(d: dict[Any, list[int]], key: Any, member: int) -> None:
    ids = d.get(key)
    if ids is not None and member in ids:
        ids.remove(member)
        if not ids:
            del d[key]


def _put(d: dict, key: Any, value: Any) -> None:
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


class Op(NamedTuple):
    """One map write: `value` None deletes `key`.

    Keys/values per map: lbd_services (Frontend, slot numbers) → the values of those
    slots, written in that order (`Slots` elements: backend ids for slots 1..n, a
    ServiceValue for the head, slot 0); lbd_backends and lbd_revnat id → Backend / RevNat;
    lbd_maglev svc_id → tuple of backend ids (the whole table); lbd_aff_match
    (backend_id, svc_id) → True; lbd_srcrange SourceRange → True; lbd_svcnames svc_id →
    name; lbd_config 0 → Config.

    A NamedTuple: a full sync at 10k services plans over a hundred thousand of these.
    """

    map: str
    key: Any
    value: Any = None

    @property
    def is_delete(self) -> bool:
        return self.value is None


class Run(NamedTuple):
    """`ops[start:stop]`: consecutive writes (or deletions) to one map, which the loader
    sends in one batched syscall."""

    map: str
    delete: bool
    start: int
    stop: int


def runs_of(ops: Sequence[Op]) -> tuple[Run, ...]:
    """The maximal runs of `ops` (one map, all writes or all deletions), in order."""
    out: list[Run] = []
    i, n = 0, len(ops)
    while i < n:
        name, delete = ops[i].map, ops[i].value is None
        j = i + 1
        while j < n and ops[j].map == name and (ops[j].value is None) == delete:
            j += 1
        out.append(Run(name, delete, i, j))
        i = j
    return tuple(out)


class _Assembly:
    """Ops appended a list at a time, each list one map's writes or deletions, with the
    runs and the entries per map recorded as they grow: a plan of a quarter of a million
    entries is then never walked op by op to find them (the loader and `Plan.counts`
    need only these)."""

    __slots__ = ("ops", "runs", "entries")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.runs: list[Run] = []
        self.entries: dict[str, int] = {}

    def add(self, m: str, delete: bool, ops: list[Op]) -> None:
        if not ops:
            return
        start = len(self.ops)
        self.ops += ops
        last = self.runs[-1] if self.runs else None
        if last is not None and last.map == m and last.delete == delete:
            self.runs[-1] = Run(m, delete, last.start, len(self.ops))
        else:
            self.runs.append(Run(m, delete, start, len(self.ops)))
        k = _count_key(m, delete)
        self.entries[k] = self.entries.get(k, 0) + _entries_of(m, ops)


def _count_key(m: str, delete: bool) -> str:
    return f"{m}_{'delete' if delete else 'write'}"


def _entries_of(m: str, ops: Sequence[Op]) -> int:
    """Map entries `ops` write or delete (an lbd_services op names several slots)."""
    if m == SERVICES:
        return sum(len(op[1][1]) for op in ops)
    return len(ops)


@dataclass(frozen=True, slots=True)
class Plan:
    ops: tuple[Op, ...]
    changed_service_ports: int
    frontends: int  # frontend entries (slot 0) the state wants, both scopes
    backends: int  # backend entries once the plan is applied
    # the maximal runs of `ops` (runs_of(ops)); None: found when asked
    runs: tuple[Run, ...] | None = None
    # counts() as recorded while assembling; None: counted when asked
    entries: dict[str, int] | None = None
    # the view once `ops` are applied, indexed and counted, for a plan from nothing (a
    # first sync); None: record the ops into the view instead
    expected: MapView | None = None

    def op_runs(self) -> tuple[Run, ...]:
        return self.runs if self.runs is not None else runs_of(self.ops)

    def counts(self) -> dict[str, int]:
        """Entries written and deleted per map ("lbd_services_write": n, ...)."""
        if self.entries is not None:
            return dict(self.entries)
        out: dict[str, int] = {}
        for m, delete, start, stop in self.op_runs():
            k = _count_key(m, delete)
            out[k] = out.get(k, 0) + _entries_of(m, self.ops[start:stop])
        return out


@dataclass(frozen=True, slots=True)
class _Want:
    """What one frontend entry must serve."""

    sp: ServicePort
    view: str  # VIEW_CLUSTER | VIEW_LOCAL
    flags: int
    view_key: str  # svc_name(sp, view)
    # the view's endpoints as backends ((addr, port), Backend), unique, sorted by address
    backends: tuple[tuple[tuple[str, int], Backend], ...] = ()

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
    """Allocates ids above the highest ever used (`high_water`: every id the maps hold is
    at or below it), so a freed id is not handed out again soon (conntrack and affinity
    entries may still name it). Only once the counter wraps around does `in_use` (and what
    this allocator gave out already) decide which ids are free."""

    def __init__(self, in_use: Callable[[int], bool], high_water: int = 0) -> None:
        self.in_use = in_use
        self.first = self.next = high_water + 1
        self.fast_end: int | None = None  # set on wrapping: [first, fast_end) were given
        self.taken: set[int] = set()

    def take(self) -> int:
        n = self.next
        if self.fast_end is None:
            if n <= _MAX_ID:
                self.next = n + 1
                return n
            self.fast_end, self.next = n, 1
        while self.next <= _MAX_ID:
            n = self.next
            self.next += 1
            if n in self.taken or self.in_use(n) or self.first <= n < self.fast_end:
                continue
            self.taken.add(n)
            return n
        raise RuntimeError("no free id left")  # pragma: no cover - 4 billion ids in use


@functools.lru_cache(maxsize=1 << 18)
def _canonical(ip: str, family: int) -> str | None:
    # cached: every sync sees the same frontend addresses again (11k at 10k services)
    if family == FAMILY_V4 and ":" not in ip:
        # inet_pton is as strict as ipaddress for IPv4 (dotted quad, no leading zeros)
        # and ten times faster, which the first sync of 100k endpoints notices
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, ip))
        except OSError:
            return None
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
    backs = {
        VIEW_CLUSTER: _backends_of(sp.cluster_endpoints, fam),
        # only a Local policy serves the local view (most services have none)
        VIEW_LOCAL: _backends_of(sp.local_endpoints, fam)
        if sp.internal_policy_local or sp.external_policy_local
        else (),
    }
    cluster_ip = _canonical(sp.cluster_ip, fam) if sp.cluster_ip else None
    if cluster_ip:
        view = VIEW_LOCAL if sp.internal_policy_local else VIEW_CLUSTER
        out.append(
            (
                Frontend(cluster_ip, sp.port, proto, fam),
                _Want(sp, view, base, names[view], backs[view]),
            )
        )
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
                    _Want(sp, VIEW_CLUSTER, flags, names[VIEW_CLUSTER], backs[VIEW_CLUSTER]),
                )
            )
            continue
        flags |= SVC_LOCAL | SVC_TWO_SCOPES
        out.append(
            (
                Frontend(addr, port, proto, fam, SCOPE_EXT),
                _Want(sp, VIEW_LOCAL, flags, names[VIEW_LOCAL], backs[VIEW_LOCAL]),
            )
        )
        # In-cluster clients are not subject to the external policy (but, as with
        # kube-proxy's FW chain, they are to the source ranges).
        internal = base | SVC_EXTERNAL | kind
        out.append(
            (
                Frontend(addr, port, proto, fam, SCOPE_INT),
                _Want(sp, VIEW_CLUSTER, internal, names[VIEW_CLUSTER], backs[VIEW_CLUSTER]),
            )
        )
    return out


class FrontendCache:
    """Memoises `frontends_of` per service port across syncs (validated by equality, and
    dropped when the node's addresses change), and the claims of the last state it saw,
    so a sync that changes one service port neither rebuilds nor re-walks the frontends
    of ten thousand others."""

    def __init__(self) -> None:
        self._node: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._by_key: dict[object, tuple[ServicePort, list[tuple[Frontend, _Want]]]] = {}
        # The desired frontends of `_for` (a state, by identity), when no frontend of it
        # is claimed twice (who wins a contest depends on every claimant: not cached).
        self._wants: dict[Frontend, _Want] | None = None
        self._for: ProxyState | None = None

    def _node_ips(self, state: ProxyState) -> dict[IPFamily, tuple[str, ...]]:
        node = (state.node_ips, state.nodeport_addresses)
        if node != self._node:
            self._node = node
            self._by_key.clear()
            self._wants = self._for = None
        return {f: tuple(nodeport_addresses(state, f)) for f in (IPFamily.V4, IPFamily.V6)}

    def get(self, state: ProxyState) -> list[list[tuple[Frontend, _Want]]]:
        """Every service port's frontend entries, in the order they claim frontends."""
        ips = self._node_ips(state)
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

    def desired(self, state: ProxyState) -> dict[Frontend, _Want]:
        """Every frontend entry the state asks for (both scopes), first service port wins."""
        out: dict[Frontend, _Want] = {}
        contested = False
        for entries in self.get(state):
            for fe, want in entries:
                other = out.get(fe)
                if other is not None:
                    contested = True
                    log.warning(
                        "frontend claimed twice; keeping the first",
                        frontend=str(fe),
                        kept=str(other.sp.name),
                        skipped=str(want.sp.name),
                    )
                    continue
                out[fe] = want
        self._wants, self._for = (None, None) if contested else (dict(out), state)
        return out

    def update(
        self, previous: ProxyState, state: ProxyState, keys: Iterable[object]
    ) -> tuple[dict[Frontend, _Want], dict[Frontend, _Want]] | None:
        """(the frontends the changed service ports `keys` want now, every desired
        frontend) when `previous` is the state last seen; None when only `desired` can
        tell (another state in between, the node changed, or a frontend claimed twice)."""
        if self._for is not previous or self._wants is None:
            return None
        ips = self._node_ips(state)
        wants = self._wants
        if wants is None:
            return None
        keys = list(keys)
        for key in keys:
            hit = self._by_key.pop(key, None)
            if hit is not None:
                for fe, want in hit[1]:
                    if wants.get(fe) is want:
                        del wants[fe]
        out: dict[Frontend, _Want] = {}
        for key in keys:
            sp = state.service_ports.get(key)  # type: ignore[call-overload]
            if sp is None:
                continue
            entries = frontends_of(sp, ips[sp.family])
            self._by_key[key] = (sp, entries)
            for fe, want in entries:
                if fe in wants:
                    self._wants = self._for = None
                    return None
                wants[fe] = out[fe] = want
        self._for = state
        return out, wants


def _sp_order(key: tuple[ServicePortName, IPFamily]) -> tuple[str, str, str, str, int]:
    # ServicePortName's generated ordering builds tuples per comparison; these compare in C
    n = key[0]
    return (n.namespace, n.name, n.port, n.protocol.value, int(key[1]))


def desired_frontends(
    state: ProxyState, cache: FrontendCache | None = None
) -> dict[Frontend, _Want]:
    """Every frontend entry the state asks for (both scopes), first service port wins."""
    return (cache or FrontendCache()).desired(state)


def assign_slots(current: dict[int, int], count: int, wanted: list[int]) -> list[int]:
    """Backend ids for slots 1..n, moving as few as possible from `current` (slot → id,
    of which the first `count` are live).

    Kept backends keep their slot; new ones fill the holes of removed ones first, then
    append; leftover holes are filled with the last slot's backend (one write, then the
    tail is dropped), so one endpoint change touches one slot.
    """
    want = set(wanted)
    if count == len(wanted):
        same = [current.get(i) for i in range(1, count + 1)]
        if want == set(same):  # the same backends, each once: nothing moves
            return same  # type: ignore[return-value]
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
        takeover_until_ns=options.takeover_until_ns,
    )


def _backends_of(
    endpoints: tuple[Endpoint, ...], family: int
) -> tuple[tuple[tuple[str, int], Backend], ...]:
    """Each endpoint's (ip, port) and Backend, in the endpoints' order.

    The endpoints are taken as the model hands them (ServicePort's contract: valid,
    canonical addresses of the port's family, one per ip:port, sorted by it), with no
    parsing, de-duplicating or sorting again: this runs for every endpoint of the state
    on a first sync (100k at 10k services), so it builds each pair and nothing else."""
    new = _new
    return tuple(
        [
            (
                (ep.ip, ep.port),
                new(Backend, (ep.ip, ep.port, family, BACKEND_LOCAL if ep.is_local else 0)),
            )
            for ep in endpoints
        ]
    )


def _changed_keys(previous: ProxyState, state: ProxyState) -> list[object]:
    """ProxyState.service_ports keys of the service ports added, removed or changed."""
    old, new = previous.service_ports, state.service_ports
    if old is new:
        return []
    # States built one after the other share the ServicePort objects of unchanged ports
    # and keep them in the same relative order (a rebuilt port may move, e.g. to the
    # end). Walk both in step by identity, stepping over an item that is only in one of
    # them; whatever does not pair up is a candidate, looked up by key. No dataclass key
    # is hashed for the thousands of ports that did not change.
    ov, nv = list(old.values()), list(new.values())
    ok, nk = list(old), list(new)
    candidates: list[object] = []
    i = j = 0
    n_old, n_new = len(ov), len(nv)
    while i < n_old and j < n_new:
        if ov[i] is nv[j]:
            i += 1
            j += 1
        elif i + 1 < n_old and ov[i + 1] is nv[j]:
            candidates.append(ok[i])  # gone from here (removed, or moved on)
            i += 1
        elif j + 1 < n_new and ov[i] is nv[j + 1]:
            candidates.append(nk[j])  # new here (added, or moved here)
            j += 1
        else:
            candidates += (ok[i], nk[j])  # changed in place (or shuffled)
            i += 1
            j += 1
    candidates += ok[i:]
    candidates += nk[j:]
    out = []
    for key in dict.fromkeys(candidates):
        a, b = old.get(key), new.get(key)  # type: ignore[call-overload]
        if a is b:
            continue
        if a is None or b is None or a != b:
            out.append(key)
    return out


def changed_service_ports(previous: ProxyState, state: ProxyState) -> set[str]:
    """`ServicePort.key`s of the service ports added, removed or changed."""
    old, new = previous.service_ports, state.service_ports
    return {(old.get(k) or new[k]).key for k in _changed_keys(previous, state)}  # type: ignore[call-overload]


def _port_of(name: str) -> str:
    return name.split("#", 1)[0]


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
    right and kept as they are, and the work is proportional to what changed (given the
    same `cache` as the plan of `previous`). Without it every entry is compared (a full
    sync, which also repairs whatever changed behind lbd's back).
    """
    options = options or PlanOptions()
    cache = cache if cache is not None else FrontendCache()
    config = _config(state, options)
    ix = view.index()
    frontends = view.frontends

    # --- which frontends this plan looks at ------------------------------------------------
    incremental = (
        previous is not None
        and previous.node_ips == state.node_ips
        and previous.nodeport_addresses == state.nodeport_addresses
        and view.config == config
    )
    affected: set[Frontend] = set()
    old_sids: set[int] = set()
    if incremental:
        assert previous is not None
        keys = _changed_keys(previous, state)
        old_ports, new_ports = previous.service_ports, state.service_ports
        changed = {(old_ports.get(k) or new_ports[k]).key for k in keys}  # type: ignore[call-overload]
        updated = cache.update(previous, state, keys)
        if updated is not None:
            wants, all_wants = updated
        else:
            all_wants = cache.desired(state)
            wants = {fe: w for fe, w in all_wants.items() if _port_of(w.view_key) in changed}
        n_frontends = len(all_wants)
        affected.update(wants)
        # what the maps hold for the changed ports (also frontends they no longer want)
        for port in changed:
            for v in (VIEW_CLUSTER, VIEW_LOCAL):
                for sid in ix.sid_names.get(f"{port}#{v}", ()):
                    old_sids.add(sid)
                    affected.update(ix.sid_fes.get(sid, ()))
        for fe in affected:
            if fe not in wants and fe in all_wants:
                wants[fe] = all_wants[fe]  # lost by a changed port to another
        current_slots = {fe: frontends[fe] for fe in affected if fe in frontends}
    else:
        wants = cache.desired(state)
        n_frontends = len(wants)
        current_slots = frontends

    # --- backends: adopt ids by address ------------------------------------------------
    bid_alloc = _Ids(view.backends.__contains__, view.high_water.get(BACKENDS, 0))
    new_bids: dict[tuple[str, int], int] = {}
    want_backends: dict[int, Backend] = {}
    view_backends: dict[str, list[int]] = {}  # view key -> backend ids, sorted by address
    held = ix.backend_ids
    take = bid_alloc.take
    bound = sum(len(w.backends) for w in wants.values())  # the most new ids needed
    if bid_alloc.fast_end is None and bid_alloc.next + bound <= _MAX_ID:
        # no wrap-around possible: ids are the next ones in a row, handed out by a C
        # counter (a first sync takes 100k, one Python call each otherwise)
        take = itertools.count(bid_alloc.next).__next__
    for want in wants.values():
        key = want.view_key
        if key in view_backends:
            continue
        chosen: list[int] = []
        for addr, b in want.backends:
            bid = new_bids.get(addr)
            if bid is None:
                ids = held.get(addr) if held else None
                bid = min(ids) if ids else take()
                new_bids[addr] = bid
                want_backends[bid] = b  # an address's first sight is its id's (1:1)
            chosen.append(bid)
        view_backends[key] = chosen

    # --- svc ids: adopt by name, else from the frontends that use them -----------------
    svc_ids: dict[str, int] = {}
    taken: set[int] = set()
    for name in view_backends:
        sid = ix.svc_id(name)
        if sid is not None and sid not in taken:
            svc_ids[name] = sid
            taken.add(sid)
    ordered = sorted(wants, key=_order)
    for fe in ordered:
        name = wants[fe].view_key
        cur = _head(current_slots.get(fe))
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

    def sid_in_use(sid: int) -> bool:
        return sid in taken or sid in view.svc_names or sid in view.maglev or sid in ix.sid_fes

    sid_alloc = _Ids(sid_in_use, view.high_water.get(SVC_NAMES, 0))
    for name in sorted(view_backends):
        if name not in svc_ids:
            svc_ids[name] = sid_alloc.take()

    # --- reverse NAT: one id per frontend address (both scopes share it) ---------------
    rev_ids: dict[tuple[str, int, int, int], int] = {}
    rid_used: set[int] = set()
    for fe in ordered:
        addr_key = (fe.addr, fe.port, fe.proto, fe.family)
        if addr_key in rev_ids:
            continue
        cur = _head(current_slots.get(fe))
        if cur is not None and cur.rev_nat_id and cur.rev_nat_id not in rid_used:
            rev_ids[addr_key] = cur.rev_nat_id
            rid_used.add(cur.rev_nat_id)

    def rid_in_use(rid: int) -> bool:
        return rid in rid_used or rid in view.rev_nat or rid in ix.rid_fes

    rid_alloc = _Ids(rid_in_use, view.high_water.get(REV_NAT, 0))
    want_rev: dict[int, RevNat] = {}
    for fe in ordered:
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

    # --- services: slot 0 + slots, diffed per frontend ----------------------------------
    service_groups: list[tuple[list[Op], list[Op]]] = []  # (writes, deletions) per frontend
    # A plan from nothing (a first sync) also returns the view it leaves: recording a
    # quarter of a million writes one run at a time costs more than building it whole.
    from_nothing = not incremental and not view.frontends
    fresh: dict[Frontend, Slots] = {}
    changed_ports: set[str] = set()
    want_ranges: set[SourceRange] = set()
    # INT entries before the EXT entries that announce them
    for fe in sorted(ordered, key=_minus_scope):  # stable: by address within a scope
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
        bids = view_backends[want.view_key]
        aff = want.sp.session_affinity_timeout if want.flags & SVC_AFFINITY else 0
        cur = current_slots.get(fe)
        if cur is None:  # a new frontend (every one, on a first sync): written whole
            # tuple.__new__: a NamedTuple's own constructor costs twice as much
            entry = _new(ServiceValue, (0, sid, rid, aff, len(bids), want.flags))
            writes = [_new(Op, (SERVICES, (fe, fill_slots(len(bids))), (*bids, entry)))]
            service_groups.append((writes, []))
            if from_nothing:
                fresh[fe] = [entry, *bids]
            changed_ports.add(_port_of(want.view_key))
            continue
        head = cur[0]
        old_count = head.count if head is not None else 0
        if old_count == len(bids) and cur[1:] == bids:  # the same slots (compared in C)
            slots = bids
        else:
            slots = assign_slots(
                {i: b for i, v in enumerate(cur) if i and (b := slot_backend(v)) is not None},
                old_count,
                bids,
            )
        entry = _new(ServiceValue, (0, sid, rid, aff, len(slots), want.flags))
        have = len(cur)
        numbers = [i for i, bid in enumerate(slots, 1) if i >= have or cur[i] != bid]
        values: list[Any] = [slots[i - 1] for i in numbers]
        if head != entry:
            if len(slots) >= old_count:  # the head announces the slots written first
                numbers.append(0)
                values.append(entry)
            else:  # a shorter count first: no lookup reaches the slots about to go
                numbers.insert(0, 0)
                values.insert(0, entry)
        gone = tuple(i for i in range(len(slots) + 1, have) if cur[i] is not None)
        if numbers or gone:
            writes = [Op(SERVICES, (fe, tuple(numbers)), tuple(values))] if numbers else []
            service_groups.append((writes, [Op(SERVICES, (fe, gone))] if gone else []))
            changed_ports.add(_port_of(want.view_key))
    removed_groups: list[Op] = []
    for fe in sorted(set(current_slots) - set(wants), key=_order):
        # the head first: no lookup meets a head whose slots are gone
        present = tuple(i for i, v in enumerate(current_slots[fe]) if v is not None)
        removed_groups.append(Op(SERVICES, (fe, present)))

    # --- what may go: everything (full), or what the changed ports referenced ----------
    if incremental:
        cand_bids: set[int] = set()
        cand_rids: set[int] = set()
        cand_sids = set(old_sids)
        aff_refs: dict[int, int] = {}
        for slots_ in current_slots.values():
            if slots_[0] is not None:
                cand_sids.add(slots_[0].svc_id)
                cand_rids.add(slots_[0].rev_nat_id)
            for bid in map(slot_backend, slots_[1:]):
                if bid is not None:
                    cand_bids.add(bid)
                    aff_refs[bid] = aff_refs.get(bid, 0) + 1
        cand_aff = {(b, s) for s in cand_sids for b in ix.aff_by_sid.get(s, ())}
        cand_ranges = {r for rid in cand_rids for r in ix.src_by_rid.get(rid, ())}

        # still referenced by frontends this plan leaves alone
        def bid_kept(bid: int) -> bool:
            return ix.backend_refs.get(bid, 0) > aff_refs.get(bid, 0)

        def sid_kept(sid: int) -> bool:
            return any(fe not in affected for fe in ix.sid_fes.get(sid, ()))

        def rid_kept(rid: int) -> bool:
            return any(fe not in affected for fe in ix.rid_fes.get(rid, ()))

    else:
        cand_bids, cand_rids = set(view.backends), set(view.rev_nat)
        cand_sids = set(view.svc_names) | set(view.maglev)
        cand_aff, cand_ranges = view.aff_match, view.src_ranges
        bid_kept = sid_kept = rid_kept = _never

    del_backends = sorted(
        b for b in cand_bids if b in view.backends and b not in want_backends and not bid_kept(b)
    )
    del_rev = sorted(
        r for r in cand_rids if r in view.rev_nat and r not in want_rev and not rid_kept(r)
    )
    del_names = sorted(
        s for s in cand_sids if s in view.svc_names and s not in want_names and not sid_kept(s)
    )
    del_maglev = sorted(
        s for s in cand_sids if s in view.maglev and s not in want_maglev and not sid_kept(s)
    )
    del_aff = sorted(k for k in cand_aff if k not in want_aff and not sid_kept(k[1]))
    del_ranges = sorted(
        r for r in cand_ranges if r not in want_ranges and not rid_kept(r.rev_nat_id)
    )
    for sid in del_names:
        changed_ports.add(_port_of(view.svc_names[sid]))

    # --- assemble: creations, services, then deletions ----------------------------------
    out = _Assembly()
    if view.config != config:
        out.add(CONFIG, False, [Op(CONFIG, 0, config)])
    have_b = view.backends
    ids = list(want_backends)
    if ids != sorted(ids):  # new ids come in order, adopted ones may not
        want_backends = dict(sorted(want_backends.items()))
    # an empty map (a first sync) is not asked 100k times what it holds
    write_b = (
        {bid: b for bid, b in want_backends.items() if have_b.get(bid) != b}
        if have_b
        else want_backends
    )
    # map + zip: the Ops of a first sync's 100k backends are built in C
    out.add(
        BACKENDS,
        False,
        list(map(_new, repeat(Op), zip(repeat(BACKENDS), write_b, write_b.values(), strict=False))),
    )
    out.add(
        REV_NAT,
        False,
        [Op(REV_NAT, k, r) for k, r in sorted(want_rev.items()) if view.rev_nat.get(k) != r],
    )
    out.add(
        SVC_NAMES,
        False,
        [Op(SVC_NAMES, k, n) for k, n in sorted(want_names.items()) if view.svc_names.get(k) != n],
    )
    out.add(AFF_MATCH, False, [Op(AFF_MATCH, k, True) for k in sorted(want_aff - view.aff_match)])
    out.add(
        SRC_RANGE, False, [Op(SRC_RANGE, r, True) for r in sorted(want_ranges - view.src_ranges)]
    )
    out.add(MAGLEV, False, [Op(MAGLEV, sid, t) for sid, t in sorted(maglev_writes.items())])
    writes = []  # one add per run, not per frontend (a first sync has 11k frontends)
    for group, deletes in service_groups:
        writes += group
        if deletes:
            out.add(SERVICES, False, writes)
            out.add(SERVICES, True, deletes)
            writes = []
    out.add(SERVICES, False, writes)
    out.add(SERVICES, True, removed_groups)
    out.add(MAGLEV, True, [Op(MAGLEV, sid) for sid in del_maglev])
    out.add(SRC_RANGE, True, [Op(SRC_RANGE, r) for r in del_ranges])
    out.add(AFF_MATCH, True, [Op(AFF_MATCH, k) for k in del_aff])
    out.add(SVC_NAMES, True, [Op(SVC_NAMES, sid) for sid in del_names])
    out.add(REV_NAT, True, [Op(REV_NAT, rid) for rid in del_rev])
    out.add(BACKENDS, True, [Op(BACKENDS, bid) for bid in del_backends])
    expected = None
    if from_nothing:
        expected = MapView(
            fresh,
            want_backends,
            want_rev,
            want_maglev,
            want_aff,
            want_ranges,
            want_names,
            config,
            dict(view.high_water),
        )
        expected.fill_index(new_bids)
    return Plan(
        ops=tuple(out.ops),
        changed_service_ports=len(changed_ports),
        frontends=n_frontends,
        backends=len(have_b)
        + (sum(1 for b in want_backends if b not in have_b) if have_b else len(want_backends))
        - len(del_backends),
        runs=tuple(out.runs),
        entries=out.entries,
        expected=expected,
    )


def _head(slots: Slots | None) -> ServiceValue | None:
    return slots[0] if slots else None


_KEY_VALUE = operator.itemgetter(1, 2)  # an Op's (key, value)
_TAIL = operator.itemgetter(slice(1, None))  # a Slots list's backend slots
_ZEROS = (0, 0, 0, 0, 0)
_new = tuple.__new__


def _minus_scope(fe: Frontend) -> int:
    return -fe.scope


def _never(_: int) -> bool:
    return False


def apply_to_view(view: MapView, ops: Iterable[Op]) -> MapView:
    """The view after `ops` (pure: `view` is not modified)."""
    out = view.copy()
    for op in ops:
        out.apply(op)
    return out


class MapCapacityError(RuntimeError):
    """A plan needs more entries than a map has room for; nothing was written.

    `needs` and `capacity` are per map name (only the maps that do not fit)."""

    def __init__(self, needs: dict[str, int], capacity: dict[str, int]) -> None:
        self.needs = needs
        self.capacity = {m: capacity[m] for m in needs}
        parts = [f"{m} needs {needs[m]} entries and holds {capacity[m]}" for m in sorted(needs)]
        super().__init__(
            "the eBPF maps are too small for this state, so it was not programmed "
            "(the datapath keeps the previous one): "
            + "; ".join(parts)
            + ". Raise the map sizes (--bpf-lb-map-max, or ebpf.map_sizes in the config) "
            "and restart lbd."
        )


def entries_needed(view: MapView, ops: Iterable[Op]) -> dict[str, int]:
    """Per map, the most entries it holds while `ops` are applied in order to `view`:
    what it holds now plus the new keys written before any deletion frees room
    (plans write first and delete last, so this is the peak)."""
    have: dict[str, Any] = {
        BACKENDS: view.backends,
        REV_NAT: view.rev_nat,
        MAGLEV: view.maglev,
        AFF_MATCH: view.aff_match,
        SRC_RANGE: view.src_ranges,
        SVC_NAMES: view.svc_names,
    }
    added: dict[str, set[Any]] = {m: set() for m in (SERVICES, *have)}
    for m, key, value in ops:
        if value is None:
            continue
        if m == SERVICES:
            fe, numbers = key
            cur = view.frontends.get(fe) or ()
            added[m].update((fe, i) for i in numbers if i >= len(cur) or cur[i] is None)
        elif m in have and key not in have[m]:
            added[m].add(key)
    counts = view.counts()
    return {m: counts[m] + len(new) for m, new in added.items()}


def check_capacity(
    view: MapView,
    ops: Sequence[Op],
    capacity: dict[str, int],
    counts: dict[str, int] | None = None,
) -> None:
    """Raise MapCapacityError when applying `ops` to `view` would overflow a map.

    `counts` (Plan.counts() of `ops`) allows a quick bound first: when every write
    could be a new key and there is still room, no key needs looking at."""
    if counts is not None:
        have = view.counts()
        if all(n + counts.get(f"{m}_write", 0) <= capacity.get(m, n) for m, n in have.items()):
            return
    needs = entries_needed(view, ops)
    over = {m: n for m, n in needs.items() if m in capacity and n > capacity[m]}
    if over:
        raise MapCapacityError(over, capacity)
