"""Plan the IPVS mode (pure): ProxyState + what the kernel holds now → an ordered list of ops.

Owns lbd's IPVS layout, which follows kube-proxy's IPVS proxier so that an operator finds
it with `ipvsadm -Ln`, `ipset list` and `iptables-save`:

- One IPVS virtual server per frontend × port × protocol: each cluster IP, each node
  address (selected by --nodeport-addresses) × node port, each load-balancer IP and each
  external IP. Forwarding is masquerading (NAT); the real servers are the endpoints the
  model chose (`internal_endpoints` for the cluster IP, `external_endpoints` for external
  frontends), weight 1; the scheduler comes from the configuration; sessionAffinity is
  IPVS persistence with the affinity timeout.
- Every virtual address is bound to the dummy interface `lbd-ipvs0` (kube-proxy's
  kube-ipvs0), so the node accepts its packets into INPUT, where IPVS takes them.
- ipsets name the frontends for a constant number of iptables rules (masquerading,
  hairpin, loadBalancerSourceRanges, dropping, rejecting unknown ports); the rules do not
  grow with the number of services.
- externalTrafficPolicy: Local frontends serve traffic from inside the cluster with the
  cluster endpoints (kube-proxy's short-circuit): such packets get a per-service-port
  firewall mark from the LBD-SHORT-CIRCUIT ipset (`SET --map-mark`), and a firewall-mark
  virtual server holds the cluster endpoints.
- Graceful termination: a TCP real server that is no longer wanted is set to weight 0 (no
  new connections) and deleted once its active and inactive connections reach zero or a
  grace period has passed. UDP and SCTP real servers are deleted at once (as kube-proxy
  does): UDP has no close, so its "connections" never drain, and clients must move now
  (expire_nodest_conn drops the stale IPVS entries, conntrack hygiene the stale NAT ones).

The plan is a diff: only entries whose desired state differs from the kernel's are
touched, so one service's change never rewrites another's.

Where IPVS cannot match the iptables mode exactly (kube-proxy's IPVS mode shares both):
sessionAffinity lasts its timeout after the client's last connection has *closed*, and
IPVS keeps a closed TCP connection for two minutes (TIME_WAIT), during which the affinity
template stays; and traffic from the node itself to a frontend without a usable endpoint
is refused by IPVS (it acts in OUTPUT, before the filter table's drop rules).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import NamedTuple

from backends.iptables.render import Jump
from lbd.model.state import (
    Endpoint,
    IPFamily,
    Protocol,
    ProxyState,
    ServicePort,
    ServicePortName,
)

DUMMY = "lbd-ipvs0"
# Chain names deliberately do not start with "LBD-": the iptables mode owns every LBD-*
# chain and removes them all when lbd starts in another mode (and the other way round).
CHAIN_PREFIX = "LBDIPVS-"
SET_PREFIXES = ("LBD-", "LBD6-")

SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos"}
)
DEFAULT_GRACE_PERIOD = 300.0  # seconds a drained TCP real server may keep connections

IPPROTO = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}
PROTO_NAME = {v: k for k, v in IPPROTO.items()}

# Firewall marks of short-circuit virtual servers: FWMARK_BASE + 1 .. FWMARK_BASE + SLOTS.
# The range avoids the masquerade bit (0x4000) and kubelet's drop bit (0x8000), and the
# filter rules recognise it with one mask.
FWMARK_BASE = 0x01000000
FWMARK_SLOTS = 0x3FFF
FWMARK_MATCH = f"{FWMARK_BASE:#x}/{0xFFFFC000:#x}"
MASQ_MARK = "0x4000"


def owns_fwmark(mark: int) -> bool:
    return FWMARK_BASE < mark <= FWMARK_BASE + FWMARK_SLOTS


# --- ipsets --------------------------------------------------------------------------------


class SetBase(StrEnum):
    """The ipsets, by role (the kernel name adds LBD- or, for IPv6, LBD6-)."""

    CLUSTER_IP = "CLUSTER-IP"  # hash:ip,port: every cluster IP:port (comment: service)
    EXTERNAL_IP = "EXTERNAL-IP"  # hash:ip,port: every external IP:port (comment: service)
    EXTERNAL_IP_LOCAL = "EXTERNAL-IP-LOCAL"  # the externalTrafficPolicy: Local ones
    LOAD_BALANCER = "LOAD-BALANCER"  # hash:ip,port: every LB IP:port (comment: service)
    LOAD_BALANCER_LOCAL = "LOAD-BALANCER-LOCAL"  # the externalTrafficPolicy: Local ones
    LOAD_BALANCER_FW = "LOAD-BALANCER-FW"  # LB IP:port with loadBalancerSourceRanges
    LOAD_BALANCER_SOURCE_CIDR = "LOAD-BALANCER-SOURCE-CIDR"  # hash:ip,port,net: allowed
    LOOP_BACK = "LOOP-BACK"  # hash:ip,port,ip: endpoint,port,endpoint (hairpin)
    IPVS_IPS = "IPVS-IPS"  # hash:ip: the addresses bound to lbd-ipvs0
    NO_LOCAL_ENDPOINTS = "NO-LOCAL-ENDPOINTS"  # hash:ip,port: frontends to drop
    SHORT_CIRCUIT = "SHORT-CIRCUIT"  # hash:ip,port skbinfo: frontend → firewall mark
    # bitmap:port, one per protocol, shared by both families (node ports are per service)
    NODE_PORT_TCP = "NODE-PORT-TCP"
    NODE_PORT_UDP = "NODE-PORT-UDP"
    NODE_PORT_SCTP = "NODE-PORT-SCTP"
    NODE_PORT_LOCAL_TCP = "NODE-PORT-LOCAL-TCP"
    NODE_PORT_LOCAL_UDP = "NODE-PORT-LOCAL-UDP"
    NODE_PORT_LOCAL_SCTP = "NODE-PORT-LOCAL-SCTP"
    HEALTH_CHECK_NODE_PORT = "HEALTH-CHECK-NODE-PORT"


NODE_PORT_SET = {
    Protocol.TCP: SetBase.NODE_PORT_TCP,
    Protocol.UDP: SetBase.NODE_PORT_UDP,
    Protocol.SCTP: SetBase.NODE_PORT_SCTP,
}
NODE_PORT_LOCAL_SET = {
    Protocol.TCP: SetBase.NODE_PORT_LOCAL_TCP,
    Protocol.UDP: SetBase.NODE_PORT_LOCAL_UDP,
    Protocol.SCTP: SetBase.NODE_PORT_LOCAL_SCTP,
}
_BITMAP_SETS = frozenset(
    {*NODE_PORT_SET.values(), *NODE_PORT_LOCAL_SET.values(), SetBase.HEALTH_CHECK_NODE_PORT}
)
_SET_KIND = {
    SetBase.LOAD_BALANCER_SOURCE_CIDR: "hash:ip,port,net",
    SetBase.LOOP_BACK: "hash:ip,port,ip",
    SetBase.IPVS_IPS: "hash:ip",
}
# The sets whose entries name their service (read back by `lbd status`).
_WITH_COMMENT = frozenset(
    {SetBase.CLUSTER_IP, SetBase.EXTERNAL_IP, SetBase.LOAD_BALANCER, *NODE_PORT_SET.values()}
)


@dataclass(frozen=True, slots=True)
class SetSpec:
    """One ipset as lbd creates it."""

    name: str
    kind: str  # "hash:ip,port", "bitmap:port", ...
    family: IPFamily | None  # None: bitmap:port, usable from both families
    comment: bool = False
    skbinfo: bool = False


def _set_name(base: SetBase, family: IPFamily | None) -> str:
    if base in _BITMAP_SETS or family != IPFamily.V6:
        return f"LBD-{base.value}"
    return f"LBD6-{base.value}"


# Precomputed: planning asks for set names per entry, and Enum.value is slow to read.
_SET_NAMES = {(b, f): _set_name(b, f) for b in SetBase for f in (None, *IPFamily)}


def set_name(base: SetBase, family: IPFamily | None = IPFamily.V4) -> str:
    return _SET_NAMES[(base, family)]


def set_spec(base: SetBase, family: IPFamily | None) -> SetSpec:
    if base in _BITMAP_SETS:
        return SetSpec(set_name(base), "bitmap:port", None, comment=base in _WITH_COMMENT)
    return SetSpec(
        set_name(base, family),
        _SET_KIND.get(base, "hash:ip,port"),
        family,
        comment=base in _WITH_COMMENT,
        skbinfo=base == SetBase.SHORT_CIRCUIT,
    )


def set_specs(families: Iterable[IPFamily]) -> list[SetSpec]:
    """Every ipset lbd needs for `families` (bitmap sets once)."""
    out = [set_spec(b, None) for b in SetBase if b in _BITMAP_SETS]
    for family in sorted(families):
        out.extend(set_spec(b, family) for b in SetBase if b not in _BITMAP_SETS)
    return out


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One ipset entry. Unused fields are empty; `ip2` is an IP or a CIDR (hash:ip,port,net)."""

    ip: str = ""
    proto: int = 0  # IPPROTO_* number ("tcp:80" in `ipset list`)
    port: int = 0
    ip2: str = ""


@dataclass(frozen=True, slots=True)
class Extension:
    """An entry's extension data: the comment (service name) or the skb mark."""

    comment: str = ""
    mark: int = 0


NO_EXTENSION = Extension()


# --- IPVS ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class VSKey:
    """Identifies a virtual server: (family, protocol, address, port), or a firewall mark."""

    family: IPFamily
    protocol: int  # IPPROTO_*; 0 for firewall-mark virtual servers
    addr: str  # canonical text; "" for firewall-mark virtual servers
    port: int
    fwmark: int = 0

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark:#x}/IPv{int(self.family)}"
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.port}/{PROTO_NAME[self.protocol].value}"


@dataclass(frozen=True, slots=True)
class VirtualServer:
    key: VSKey
    scheduler: str = "rr"
    persistence: int = 0  # seconds of IPVS persistence (sessionAffinity); 0: none


class RealServer(NamedTuple):
    """A real server of a virtual server. (A NamedTuple, like Op: a 10k-service sync
    makes a hundred thousand of each, and a frozen dataclass costs twice as much to make.)"""

    ip: str
    port: int
    weight: int = 1
    active: int = 0  # active connections (read from the kernel)
    inactive: int = 0


Dest = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A virtual server and its real servers as the kernel holds them."""

    vs: VirtualServer
    dests: Mapping[Dest, RealServer] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KernelView:
    """What the kernel holds in the node's network namespace (everything, not only lbd's)."""

    services: Mapping[VSKey, ServiceView] = field(default_factory=dict)
    sets: Mapping[str, Mapping[Member, Extension]] = field(default_factory=dict)  # lbd's only
    set_kinds: Mapping[str, str] = field(default_factory=dict)  # lbd's sets → ipset type
    dummy_exists: bool = False
    dummy_addresses: frozenset[str] = frozenset()
    node_addresses: tuple[str, ...] = ()  # local addresses on other interfaces

    def owns(self, key: VSKey) -> bool:
        """Whether lbd created this virtual server (the only ones it may change)."""
        if key.fwmark:
            return owns_fwmark(key.fwmark)
        if key.addr in self.dummy_addresses:
            return True
        # Node-port virtual servers sit on node addresses: lbd's when the port is one of its
        # node ports of that protocol.
        proto = PROTO_NAME.get(key.protocol)
        if proto is None or key.addr not in self.node_addresses:
            return False
        return Member(port=key.port) in self.sets.get(set_name(NODE_PORT_SET[proto]), {})


# --- ops -----------------------------------------------------------------------------------


class OpKind(StrEnum):
    """The kinds of op, in the order a plan applies them (see `_ORDER`).

    A virtual address starts attracting packets from pods and outside when it is bound to
    the dummy interface, so it is bound only after its virtual servers hold their real
    servers, and unbound before they go: a sync interrupted anywhere (kill -9) leaves
    each bound frontend either as before or complete, never without real servers. ipset
    members (masquerading, source ranges, node ports) come before the virtual servers
    that depend on them and go after."""

    CREATE_DUMMY = "create_dummy"
    CREATE_SET = "create_set"
    ADD_MEMBER = "add_member"  # also replaces the extension of an existing member
    ADD_SERVICE = "add_service"
    EDIT_SERVICE = "edit_service"
    ADD_DEST = "add_dest"
    EDIT_DEST = "edit_dest"
    ADD_ADDRESS = "add_address"
    DEL_ADDRESS = "del_address"
    DEL_DEST = "del_dest"
    DEL_SERVICE = "del_service"
    DEL_MEMBER = "del_member"


class Op(NamedTuple):
    """One kernel change. Which fields matter depends on `kind`."""

    kind: OpKind
    vs: VirtualServer | None = None
    dest: RealServer | None = None
    set: SetSpec | None = None
    member: Member | None = None
    ext: Extension = NO_EXTENSION
    address: str = ""

    def __str__(self) -> str:
        parts = [self.kind.value]
        if self.vs is not None:
            parts.append(str(self.vs.key))
        if self.dest is not None:
            parts.append(f"{self.dest.ip}:{self.dest.port} w{self.dest.weight}")
        if self.set is not None:
            parts.append(self.set.name)
        if self.member is not None:
            parts.append(str(self.member))
        if self.address:
            parts.append(self.address)
        return " ".join(parts)


# --- desired state ---------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def canonical_ip(text: str) -> str | None:
    """The kernel's spelling of an IP address; None when `text` is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _canonical_net(text: str) -> str | None:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


_V4, _V6 = IPFamily.V4, IPFamily.V6  # module constants: Enum attribute reads are slow


def _family_of(ip: str) -> IPFamily:
    return _V6 if ":" in ip else _V4


def _host_cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def nodeport_addresses(state: ProxyState, local: Iterable[str]) -> tuple[str, ...]:
    """The local addresses that accept node ports: unicast, not loopback or link-local,
    and inside --nodeport-addresses when that is set (a /0 selects everything)."""
    nets = []
    for cidr in state.nodeport_addresses:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    out = []
    for text in local:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if state.nodeport_addresses and not any(ip in n for n in nets if n.version == ip.version):
            continue
        out.append(str(ip))
    return tuple(sorted(set(out), key=lambda a: (":" in a, a)))


def fwmarks(keys: Iterable[str]) -> dict[str, int]:
    """A firewall mark per short-circuited service port, stable across syncs.

    The slot comes from a hash of the service port's key, so adding or removing one service
    moves no other service's mark, except on a (rare) collision, resolved by probing in
    key order.
    """
    used: set[int] = set()
    out: dict[str, int] = {}
    for key in sorted(keys):
        start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % FWMARK_SLOTS
        for i in range(FWMARK_SLOTS):
            slot = (start + i) % FWMARK_SLOTS
            if slot not in used:
                used.add(slot)
                out[key] = FWMARK_BASE + 1 + slot
                break
    return out


@dataclass(frozen=True, slots=True)
class _DesiredService:
    vs: VirtualServer
    dests: Mapping[Dest, None]  # an ordered set
    protocol: Protocol
    owner: str  # the service port's key
    service: str  # "namespace/name:port"
    kind: str  # ClusterIP | NodePort | LoadBalancer | ExternalIP | ShortCircuit


_Entry = tuple[str, Member, Extension]  # (set name, member, extension)


@dataclass(frozen=True, slots=True)
class _Frontend:
    """One virtual server of a service port, with what exists only because of it: ipset
    entries, among them its LBD-IPVS-IPS entry when its address is bound to the dummy
    interface (the addresses to bind are read from those sets)."""

    service: _DesiredService
    entries: tuple[_Entry, ...]


@dataclass(frozen=True, slots=True)
class _Contribution:
    """Everything one service port wants in the kernel (memoised between plans)."""

    frontends: tuple[_Frontend, ...]
    entries: tuple[_Entry, ...]  # node-port bitmaps, health check, hairpin, short-circuit


@dataclass(frozen=True, slots=True)
class _Context:
    """The node-wide inputs that change how a service port plans."""

    nodeport_ips: tuple[str, ...]
    local_ips: frozenset[str]
    node_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    scheduler: str


class Desired:
    """Everything lbd wants in the kernel, kept up to date one service port at a time.

    Several service ports may want the same thing: an ipset entry (a hairpin endpoint or
    a node port two services share), a dummy address (every port of a multi-port service
    wants its cluster IP), even a virtual server (a misconfiguration: two services claiming
    one external IP and port). Each wanted thing records who wants it, so withdrawing one
    service port keeps what others still want; where the claimants differ (a virtual
    server, an entry's comment), the service port first in (namespace, name, port,
    protocol, family) order wins, whatever the order the changes came in.

    Every change records what it touched, so that a sync can diff only those against the
    kernel (`take_touched`).
    """

    def __init__(self, families: Iterable[IPFamily]) -> None:
        self.families = frozenset(families)
        self.specs: dict[str, SetSpec] = {s.name: s for s in set_specs(self.families)}
        self.services: dict[VSKey, _DesiredService] = {}  # each virtual server's winner
        self.sets: dict[str, dict[Member, Extension]] = {name: {} for name in self.specs}
        self._ipvs_ips = frozenset(set_name(SetBase.IPVS_IPS, f) for f in IPFamily)
        self._claims: dict[VSKey, dict[str, _Frontend]] = {}
        self._refs: dict[tuple[str, Member], dict[str, list]] = {}  # owner → [ext, count]
        # Each entry's first owner in port order, whose extension the entry gets. Kept, not
        # recomputed as each owner comes: a hairpin entry of an endpoint behind every
        # service has thousands of owners, and taking the minimum over all of them for
        # each new one made a from-scratch plan (a restarted daemon's first sync)
        # quadratic: ~2 s of it at 2,000 services under the test VM's emulation.
        self._winner: dict[tuple[str, Member], str] = {}
        self._order: dict[str, tuple] = {}
        self._contributions: dict[str, _Contribution] = {}
        self._contested: set[VSKey] = set()  # virtual servers with several claimants
        self.touched_services: set[VSKey] = set()
        self.touched_members: set[tuple[str, Member]] = set()
        # Off while everything is planned from scratch: such a plan compares everything.
        self.track = True

    # --- changes

    def put(self, owner: str, order: tuple, c: _Contribution | None) -> None:
        """What service port `owner` wants is now `c` (None: nothing any more)."""
        old = self._contributions.pop(owner, None)
        if old is not None:
            for fe in old.frontends:
                self._unclaim(owner, fe)
            for e in old.entries:
                self._unref(owner, e)
        if c is None:
            self._order.pop(owner, None)
            return
        self._order[owner] = order
        self._contributions[owner] = c
        for fe in c.frontends:
            self._claim(owner, fe)
        for e in c.entries:
            self._ref(owner, e)

    def take_touched(self) -> tuple[set[VSKey], set[tuple[str, Member]]]:
        """What changed since the last call (virtual servers, ipset entries)."""
        out = (self.touched_services, self.touched_members)
        self.touched_services, self.touched_members = set(), set()
        return out

    # --- reading

    def addresses(self) -> set[str]:
        """The addresses to bind to the dummy interface."""
        return {m.ip for name in self._ipvs_ips for m in self.sets.get(name, ())}

    def is_address(self, name: str) -> bool:
        return name in self._ipvs_ips

    @property
    def conflicts(self) -> list[str]:
        out = []
        for key in sorted(self._contested):
            winner = self.services[key]
            claims = self._claims[key]
            out.extend(
                f"{key} claimed by {winner.service} and {claims[owner].service.service}"
                for owner in sorted(claims, key=self._order.__getitem__)
                if owner != winner.owner
            )
        return out

    # --- bookkeeping

    def _first(self, owners: Iterable[str]) -> str:
        return min(owners, key=self._order.__getitem__)

    def _claim(self, owner: str, fe: _Frontend) -> None:
        key = fe.service.vs.key
        claims = self._claims.get(key)
        if claims is None:
            self._claims[key] = {owner: fe}
            self._apply(owner, fe)
            return
        if owner in claims:
            return  # the same frontend twice in one service port: the first counts
        claims[owner] = fe
        self._contested.add(key)
        winner = self.services[key].owner
        if self._order[owner] < self._order[winner]:
            self._unapply(winner, claims[winner])
            self._apply(owner, fe)

    def _unclaim(self, owner: str, fe: _Frontend) -> None:
        key = fe.service.vs.key
        claims = self._claims[key]
        if claims.get(owner) is not fe:
            return  # a duplicate that never counted
        del claims[owner]
        if self.services[key].owner == owner:
            self._unapply(owner, fe)
            if claims:
                nxt = self._first(claims)
                self._apply(nxt, claims[nxt])
        if len(claims) < 2:
            self._contested.discard(key)
        if not claims:
            del self._claims[key]

    def _apply(self, owner: str, fe: _Frontend) -> None:
        key = fe.service.vs.key
        self.services[key] = fe.service
        if self.track:
            self.touched_services.add(key)
        for e in fe.entries:
            self._ref(owner, e)

    def _unapply(self, owner: str, fe: _Frontend) -> None:
        key = fe.service.vs.key
        del self.services[key]
        if self.track:
            self.touched_services.add(key)
        for e in fe.entries:
            self._unref(owner, e)

    def _ref(self, owner: str, e: _Entry) -> None:
        name, m, ext = e
        k = (name, m)
        if self.track:
            self.touched_members.add(k)
        owners = self._refs.get(k)
        if owners is None:
            self._refs[k] = {owner: [ext, 1]}
            self._winner[k] = owner
            self.sets[name][m] = ext
            return
        held = owners.get(owner)
        if held is not None:
            held[1] += 1  # the owner's first extension stays
            return
        owners[owner] = [ext, 1]
        # On a tie the earlier owner stays first, as min() over the owners would keep it.
        if self._order[owner] < self._order[self._winner[k]]:
            self._winner[k] = owner
            self.sets[name][m] = ext

    def _unref(self, owner: str, e: _Entry) -> None:
        name, m, _ = e
        k = (name, m)
        if self.track:
            self.touched_members.add(k)
        owners = self._refs[k]
        held = owners[owner]
        held[1] -= 1
        if held[1]:
            return
        del owners[owner]
        if not owners:
            del self._refs[k]
            del self._winner[k]
            del self.sets[name][m]
        elif self._winner[k] == owner:
            nxt = self._winner[k] = self._first(owners)
            self.sets[name][m] = owners[nxt][0]


def _address_entry(ip: str) -> _Entry:
    return (set_name(SetBase.IPVS_IPS, _family_of(ip)), Member(ip), NO_EXTENSION)


def _port_order(key: tuple[ServicePortName, IPFamily]) -> tuple:
    # ServicePortName's generated ordering builds tuples per comparison: slow at 10k ports.
    n, family = key
    return (n.namespace, n.name, n.port, n.protocol, family)


def _wants_fwmark(sp: ServicePort) -> bool:
    return sp.external_policy_local and sp.has_external_frontends and bool(sp.cluster_endpoints)


class Planner:
    """Keeps the desired state between syncs and updates it from each new ProxyState.

    Only changed service ports are planned again (their old contribution withdrawn, the
    new one added): those the model builder lists as changed since the state planned last
    (ProxyState.changes_since), or, when it cannot tell, those whose ServicePort object
    is not the one seen last time (the builder keeps unchanged ones; an equal object built
    anew is not planned again either). So one changed service costs the same at 100 or
    10,000 services. A change of the node-wide inputs (node addresses,
    --nodeport-addresses, scheduler, IP families) plans everything again.
    """

    def __init__(self) -> None:
        self.desired: Desired | None = None
        self._ctx: _Context | None = None
        self._ports: Mapping[tuple[ServicePortName, IPFamily], ServicePort] = {}
        self._owner: dict[tuple[ServicePortName, IPFamily], str] = {}
        self._eligible: set[str] = set()  # service ports that want a firewall mark
        self._marks: dict[str, int] = {}
        self._revision = -1  # of the state planned last
        self._inputs: tuple = ()  # the node-wide inputs of _new_ctx
        self._new_ctx: _Context | None = None
        self._v6 = 0  # IPv6 service ports
        self.rebuilt = False  # the last update planned everything from scratch

    def update(self, state: ProxyState, view: KernelView, scheduler: str) -> Desired:
        """The desired state for `state`, its touched sets holding what changed."""
        old = self._ports
        new = state.service_ports
        listed = state.changes_since(self._revision)
        if listed is not None:
            # The model builder says what changed since the state planned last.
            changed = [(k, new[k]) for k in listed if k in new]
            gone = {k for k in listed if k not in new}
        else:
            # Which ServicePort objects are new, by identity, in C (hashing 10k keys in
            # Python would cost more than the rest of a one-service plan).
            ids = dict(zip(map(id, old.values()), old.values(), strict=True))
            fresh = {id(sp): (k, sp) for k, sp in new.items()}
            changed = [fresh[i] for i in fresh.keys() - ids.keys()]
            gone = {(sp.name, sp.family) for sp in map(ids.get, ids.keys() - fresh.keys())}
            gone.difference_update(k for k, _ in changed)
        self._revision = state.revision
        self._v6 += sum(1 for k, _ in changed if k[1] == _V6 and k not in old)
        self._v6 -= sum(1 for k in gone if k[1] == _V6)
        families = {_V4}
        if self._v6 or any(n.startswith("LBD6-") for n in view.sets):
            families.add(_V6)
        inputs = (state.nodeport_addresses, state.node_ips, view.node_addresses, scheduler)
        if inputs != self._inputs:
            self._inputs = inputs
            self._new_ctx = _context(state, view.node_addresses, scheduler)
        ctx = self._new_ctx
        d = self.desired
        self.rebuilt = d is None or ctx != self._ctx or families != d.families
        if self.rebuilt:
            d = self.desired = Desired(families)
            d.track = False
            self._ctx, self._owner, self._eligible, self._marks = ctx, {}, set(), {}
            # In port order, so that each virtual server's first claimant is its winner.
            changed, gone = sorted(new.items(), key=lambda i: _port_order(i[0])), set()
        ctx = self._ctx
        assert ctx is not None
        self._ports = new
        # Equal objects built anew (a from-scratch model build) plan nothing again.
        redo = [(k, sp) for k, sp in changed if k not in self._owner or old.get(k) != sp]
        eligible_before = set(self._eligible)
        for k in gone:
            self._eligible.discard(self._owner[k])
        for k, sp in redo:
            owner = self._owner.get(k)
            if owner is None:
                owner = self._owner[k] = sp.key
            if _wants_fwmark(sp):
                self._eligible.add(owner)
            else:
                self._eligible.discard(owner)
        if self._eligible != eligible_before:
            marks = fwmarks(self._eligible)
            moved = {o for o in self._eligible if marks[o] != self._marks.get(o)}
            self._marks = marks
            if moved:
                redo_keys = {k for k, _ in redo}
                redo.extend(
                    (k, new[k])
                    for k, o in self._owner.items()
                    if o in moved and k not in redo_keys and k in new
                )
        for k in gone:
            d.put(self._owner.pop(k), (), None)
        for k, sp in redo:
            owner = self._owner[k]
            mark = self._marks.get(owner, 0)
            d.put(owner, _port_order(k), _contribution(sp, owner, ctx, mark))
        d.track = True
        return d


def _context(state: ProxyState, node_addresses: Iterable[str], scheduler: str) -> _Context:
    node_addresses = list(node_addresses)
    np_addrs = nodeport_addresses(state, node_addresses)
    return _Context(
        np_addrs,
        frozenset(np_addrs) | {a for a in (canonical_ip(x) for x in node_addresses) if a},
        tuple(ipaddress.ip_address(a) for a in (canonical_ip(x) for x in state.node_ips) if a),
        scheduler,
    )


def _endpoints(eps: Iterable, family: IPFamily) -> dict[Dest, None]:
    out: dict[Dest, None] = {}
    for ep in eps:
        ip = canonical_ip(ep.ip)
        if ip is not None and _family_of(ip) == family and 0 < ep.port < 65536:
            out[(ip, ep.port)] = None
    return out


def _contribution(sp: ServicePort, owner: str, ctx: _Context, mark: int) -> _Contribution:
    """What service port `sp` (whose key is `owner`) wants in the kernel."""
    fam = sp.family
    proto = IPPROTO[sp.protocol]
    name = str(sp.name)
    note = Extension(comment=name[:255])
    persistence = sp.session_affinity_timeout
    # internal, external and cluster endpoints are mostly one and the same tuple
    memo: dict[int, dict[Dest, None]] = {}

    def dests_of(eps: tuple[Endpoint, ...]) -> dict[Dest, None]:
        got = memo.get(id(eps))
        if got is None:
            got = memo[id(eps)] = _endpoints(eps, fam)
        return got

    internal = dests_of(sp.internal_endpoints)
    external = dests_of(sp.external_endpoints)
    cluster = dests_of(sp.cluster_endpoints)
    local = dests_of(sp.local_endpoints)
    has_endpoints = bool(cluster) or bool(local)
    frontends: list[_Frontend] = []
    entries: list[_Entry] = []
    used: dict[Dest, None] = {}
    external_keys: list[VSKey] = []

    def entry(base: SetBase, m: Member, ext: Extension = NO_EXTENSION) -> _Entry:
        return (set_name(base, fam), m, ext)

    def frontend(ip: str, port: int, dests: dict[Dest, None], kind: str, *more: _Entry) -> None:
        key = VSKey(fam, proto, ip, port)
        extra = list(more)
        if not dests and has_endpoints:
            # Endpoints exist, none for this frontend (a Local policy): drop, not reject.
            extra.append(entry(SetBase.NO_LOCAL_ENDPOINTS, Member(ip, proto, port)))
        if kind != "ClusterIP":
            external_keys.append(key)
        if kind != "NodePort" and ip not in ctx.local_ips:
            extra.append(_address_entry(ip))  # bound to the dummy interface
        vs = VirtualServer(key, ctx.scheduler, persistence)
        service = _DesiredService(vs, dests, sp.protocol, owner, name, kind)
        frontends.append(_Frontend(service, tuple(extra)))
        used.update(dests)

    def vip(text: str) -> str | None:
        ip = canonical_ip(text)
        return ip if ip is not None and _family_of(ip) == fam else None

    port = sp.port
    if 0 < port < 65536:
        cip = vip(sp.cluster_ip)
        if cip is not None:
            named = entry(SetBase.CLUSTER_IP, Member(cip, proto, port), note)
            frontend(cip, port, internal, "ClusterIP", named)
        for text in sp.external_ips:
            ip = vip(text)
            if ip is None:
                continue
            m = Member(ip, proto, port)
            more = [entry(SetBase.EXTERNAL_IP, m, note)]
            if sp.external_policy_local:
                more.append(entry(SetBase.EXTERNAL_IP_LOCAL, m))
            frontend(ip, port, external, "ExternalIP", *more)
        ranges = [n for n in (_canonical_net(c) for c in sp.load_balancer_source_ranges) if n]
        ranges = [n for n in ranges if _family_of(n) == fam]
        node_inside = False
        if ranges:
            nets = [ipaddress.ip_network(c) for c in ranges]
            node_inside = any(i in n for n in nets for i in ctx.node_ips if i.version == n.version)
        for text in sp.load_balancer_ips:
            ip = vip(text)
            if ip is None:
                continue
            m = Member(ip, proto, port)
            more = [entry(SetBase.LOAD_BALANCER, m, note)]
            if sp.external_policy_local:
                more.append(entry(SetBase.LOAD_BALANCER_LOCAL, m))
            if ranges:
                more.append(entry(SetBase.LOAD_BALANCER_FW, m))
                allowed = [*ranges, _host_cidr(ip)] if node_inside else ranges
                # (The node reaching an LB IP bound locally uses the LB IP as its source:
                # allowed when the node itself is inside the ranges.)
                more.extend(
                    entry(SetBase.LOAD_BALANCER_SOURCE_CIDR, Member(ip, proto, port, cidr))
                    for cidr in allowed
                )
            frontend(ip, port, external, "LoadBalancer", *more)
    if 0 < sp.node_port < 65536:
        port_member = Member(port=sp.node_port)
        entries.append(entry(NODE_PORT_SET[sp.protocol], port_member, note))
        if sp.external_policy_local:
            entries.append(entry(NODE_PORT_LOCAL_SET[sp.protocol], port_member))
        for ip in ctx.nodeport_ips:
            if _family_of(ip) == fam:
                frontend(ip, sp.node_port, external, "NodePort")
    if 0 < sp.health_check_node_port < 65536:
        entries.append(
            entry(SetBase.HEALTH_CHECK_NODE_PORT, Member(port=sp.health_check_node_port))
        )

    # In-cluster traffic to this service port's external frontends bypasses the Local
    # policy: the short-circuit set marks it, the mark's virtual server balances it over the
    # cluster endpoints.
    if mark and cluster:
        key = VSKey(fam, 0, "", 0, mark)
        vs = VirtualServer(key, ctx.scheduler, persistence)
        service = _DesiredService(vs, cluster, sp.protocol, owner, name, "ShortCircuit")
        frontends.append(_Frontend(service, ()))
        used.update(cluster)
        entries.extend(
            entry(SetBase.SHORT_CIRCUIT, Member(k.addr, proto, k.port), Extension(mark=mark))
            for k in external_keys
        )
    # Hairpin: only a pod on this node can reach itself through the service here.
    here = _endpoints([e for e in sp.cluster_endpoints if e.is_local], fam) if used else {}
    here.update(local)
    entries.extend(
        entry(SetBase.LOOP_BACK, Member(ip, proto, p, ip)) for ip, p in used if (ip, p) in here
    )
    return _Contribution(tuple(frontends), tuple(entries))


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    ops: list[Op]
    expected: KernelView  # the kernel once every op is applied
    draining: dict[tuple[VSKey, Dest], float]  # weight-0 real servers → since when
    changed_service_ports: int
    conflicts: list[str]
    families: tuple[IPFamily, ...] = (IPFamily.V4,)
    owned_services: int = 0  # lbd's virtual servers once the plan is applied

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.kind.value] = out.get(op.kind.value, 0) + 1
        return out


_ORDER = {kind: i for i, kind in enumerate(OpKind)}
_ADD_DEST = OpKind.ADD_DEST  # (a module constant: Enum attribute reads are slow)
_ABSENT = Extension(comment="\0absent")  # never a real extension


def plan(
    state: ProxyState,
    view: KernelView,
    *,
    scheduler: str = "rr",
    now: float = 0.0,
    draining: Mapping[tuple[VSKey, Dest], float] | None = None,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    planner: Planner | None = None,
    changes_only: bool = False,
) -> Plan:
    """The ops that turn `view` into what `state` needs, in a safe order.

    `draining`: TCP real servers lbd set to weight 0, and when (`now` is on the same clock);
    one found at weight 0 without a record is treated as starting to drain now.
    `planner`: keeps the desired state between plans (a fresh one per call otherwise).
    `changes_only`: diff only what changed in the desired state since the planner's
    previous plan (and the draining real servers), trusting that `view` is that plan's
    `expected`; otherwise everything is compared, as a full sync must.
    """
    draining = draining or {}
    if planner is None:
        planner, changes_only = Planner(), False
    want = planner.update(state, view, scheduler)
    touched_services, touched_members = want.take_touched()
    changes_only = changes_only and not planner.rebuilt
    if changes_only:
        service_keys: Iterable[VSKey] = sorted(
            touched_services | {k for k, _ in draining if k in view.services}
        )
        services = dict(view.services)
    else:
        service_keys = [*want.services, *(k for k in view.services if k not in want.services)]
        services = {}
        touched_members = set()
    d = _Diff(view, draining, now, grace_period)
    for key in service_keys:
        svc = want.services.get(key)
        have = view.services.get(key)
        after = d.service(key, svc, have) if svc is not None else d.unwanted(key, have)
        if after is None:
            services.pop(key, None)
        else:
            services[key] = after

    # --- ipsets
    sets: dict[str, dict[Member, Extension]] = dict(view.sets)
    for name, spec in want.specs.items():
        if name not in view.sets:
            d.ops.append(Op(OpKind.CREATE_SET, set=spec))
    if changes_only:
        copied: set[str] = set()
        for name, m in sorted(touched_members):
            ext = want.sets[name].get(m, _ABSENT)
            have_set = view.sets.get(name, {})
            if have_set.get(m, _ABSENT) == ext:
                continue
            if name not in copied:
                copied.add(name)
                sets[name] = dict(have_set)
            if ext is _ABSENT:
                d.ops.append(Op(OpKind.DEL_MEMBER, set=want.specs[name], member=m))
                del sets[name][m]
            else:
                d.ops.append(Op(OpKind.ADD_MEMBER, set=want.specs[name], member=m, ext=ext))
                sets[name][m] = ext
        for name in want.specs:
            if name not in view.sets and name not in copied:
                sets[name] = dict(want.sets[name])
    else:
        for name, members in want.sets.items():
            spec = want.specs[name]
            have_members = view.sets.get(name, {})
            for m, ext in members.items():
                if have_members.get(m) != ext:
                    d.ops.append(Op(OpKind.ADD_MEMBER, set=spec, member=m, ext=ext))
            for m in have_members:
                if m not in members:
                    d.ops.append(Op(OpKind.DEL_MEMBER, set=spec, member=m))
            sets[name] = dict(members)

    # --- the dummy interface and its addresses
    if not view.dummy_exists:
        d.ops.append(Op(OpKind.CREATE_DUMMY))
    if changes_only:
        # `view` is the previous plan's expectation: no link-local address in it.
        added, removed = set(), set()
        for name, m in touched_members:
            if want.is_address(name):
                if m in want.sets[name]:
                    added.add(m.ip)
                else:
                    removed.add(m.ip)
        added -= view.dummy_addresses
        removed &= view.dummy_addresses
        addresses = view.dummy_addresses
        if added or removed:
            addresses = (addresses - removed) | added
    else:
        addresses = frozenset(want.addresses())
        # The kernel gives the (up) dummy an IPv6 link-local address of its own: not a VIP.
        bound = {ip for ip in view.dummy_addresses if not ip.startswith("fe80:")}
        added, removed = addresses - bound, bound - addresses
    d.ops.extend(Op(OpKind.ADD_ADDRESS, address=ip) for ip in sorted(added))
    d.ops.extend(Op(OpKind.DEL_ADDRESS, address=ip) for ip in sorted(removed))
    d.ops.sort(key=lambda op: _ORDER[op.kind])  # stable: keeps each kind's own order
    expected = KernelView(
        services=services,
        sets=sets,
        set_kinds={**view.set_kinds, **{n: s.kind for n, s in want.specs.items()}},
        dummy_exists=True,
        dummy_addresses=frozenset(addresses),
        node_addresses=view.node_addresses,
    )
    return Plan(
        d.ops,
        expected,
        d.draining,
        len(d.touched) + d.deleted,
        want.conflicts,
        tuple(sorted(want.families)),
        len(want.services),
    )


class _Diff:
    """Compares one virtual server at a time with the kernel's, collecting the ops."""

    def __init__(
        self,
        view: KernelView,
        draining: Mapping[tuple[VSKey, Dest], float],
        now: float,
        grace_period: float,
    ) -> None:
        self.view = view
        self.old_draining = draining
        self.now = now
        self.grace_period = grace_period
        self.ops: list[Op] = []
        self.draining: dict[tuple[VSKey, Dest], float] = {}
        self.touched: set[str] = set()  # service ports with ops
        self.deleted = 0

    def unwanted(self, key: VSKey, have: ServiceView | None) -> ServiceView | None:
        """A virtual server lbd does not want: deleted if lbd's, else left alone."""
        if have is None:
            return None
        if self.view.owns(key):
            self.ops.append(Op(OpKind.DEL_SERVICE, vs=have.vs))
            self.deleted += 1
            return None
        return have  # someone else's: never touched

    def service(self, key: VSKey, svc: _DesiredService, have: ServiceView | None) -> ServiceView:
        ops = self.ops
        expected_dests: dict[Dest, RealServer] = {}
        if have is None:
            vs = svc.vs
            ops.append(Op(OpKind.ADD_SERVICE, vs))
            for dest in svc.dests:
                rs = expected_dests[dest] = RealServer(*dest)
                ops.append(Op(_ADD_DEST, vs, rs))
            self.touched.add(svc.owner)
            return ServiceView(svc.vs, expected_dests)
        if (have.vs.scheduler, have.vs.persistence) != (svc.vs.scheduler, svc.vs.persistence):
            ops.append(Op(OpKind.EDIT_SERVICE, vs=svc.vs))
            self.touched.add(svc.owner)
        for dest in svc.dests:
            rs = have.dests.get(dest)
            if rs is None:
                ops.append(Op(OpKind.ADD_DEST, vs=svc.vs, dest=RealServer(*dest)))
                self.touched.add(svc.owner)
                expected_dests[dest] = RealServer(*dest)
            elif rs.weight != 1:
                # A draining real server that is wanted again serves again.
                ops.append(Op(OpKind.EDIT_DEST, vs=svc.vs, dest=RealServer(*dest)))
                self.touched.add(svc.owner)
                expected_dests[dest] = RealServer(rs.ip, rs.port, 1, rs.active, rs.inactive)
            else:
                expected_dests[dest] = rs
        for dest, rs in have.dests.items():
            if dest in svc.dests:
                continue
            self.touched.add(svc.owner)
            if svc.protocol != Protocol.TCP:
                ops.append(Op(OpKind.DEL_DEST, vs=svc.vs, dest=rs))
                continue
            # The connection counts of a real server already at weight 0 are fresh (the
            # backend re-reads them every sync); anyone else's may be cached, so a real
            # server always drains first and is deleted at a later sync.
            since = self.old_draining.get((key, dest), self.now) if rs.weight == 0 else self.now
            drained = rs.weight == 0 and rs.active + rs.inactive == 0
            if drained or self.now - since >= self.grace_period:
                ops.append(Op(OpKind.DEL_DEST, vs=svc.vs, dest=rs))
                continue
            if rs.weight != 0:
                ops.append(
                    Op(OpKind.EDIT_DEST, vs=svc.vs, dest=RealServer(rs.ip, rs.port, weight=0))
                )
            self.draining[(key, dest)] = since
            expected_dests[dest] = RealServer(rs.ip, rs.port, 0, rs.active, rs.inactive)
        return ServiceView(svc.vs, expected_dests)


# --- iptables: a constant set of rules ---------------------------------------------------------

SERVICES = CHAIN_PREFIX + "SERVICES"
NODE_PORT = CHAIN_PREFIX + "NODE-PORT"
MARK_MASQ = CHAIN_PREFIX + "MARK-MASQ"
MASQ_OFF_CLUSTER = CHAIN_PREFIX + "MASQ-OFF-CLUSTER"
POSTROUTING = CHAIN_PREFIX + "POSTROUTING"
PREROUTING = CHAIN_PREFIX + "PREROUTING"
OUTPUT = CHAIN_PREFIX + "OUTPUT"
FIREWALL = CHAIN_PREFIX + "FIREWALL"
FILTER = CHAIN_PREFIX + "FILTER"
HEALTH_CHECK = CHAIN_PREFIX + "HEALTH-CHECK"
FORWARD = CHAIN_PREFIX + "FORWARD"
CANARY = CHAIN_PREFIX + "CANARY"
CANARY_TABLES = ("mangle", "filter", "nat")
CANARY_RULE = f"-A {CANARY} -j RETURN"

# In the order they must appear in each built-in chain.
JUMPS: tuple[Jump, ...] = (
    Jump("mangle", "PREROUTING", PREROUTING, "lbd ipvs short-circuit marks"),
    Jump("mangle", "OUTPUT", OUTPUT, "lbd ipvs short-circuit marks"),
    Jump("nat", "PREROUTING", SERVICES, "lbd ipvs service portals"),
    Jump("nat", "OUTPUT", SERVICES, "lbd ipvs service portals"),
    Jump("nat", "POSTROUTING", POSTROUTING, "lbd ipvs postrouting rules"),
    Jump("filter", "INPUT", FIREWALL, "lbd ipvs load balancer firewall", True),
    Jump("filter", "INPUT", HEALTH_CHECK, "lbd ipvs health check node ports"),
    Jump("filter", "INPUT", FILTER, "lbd ipvs service filter", True),
    Jump("filter", "FORWARD", FORWARD, "lbd ipvs forwarding rules"),
    Jump("filter", "OUTPUT", FIREWALL, "lbd ipvs load balancer firewall", True),
)

_REJECT = {
    IPFamily.V4: "REJECT --reject-with icmp-port-unreachable",
    IPFamily.V6: "REJECT --reject-with icmp6-port-unreachable",
}


def has_jump(rule_lines: Iterable[str], jump: Jump) -> bool:
    """Whether a built-in chain's rules (as iptables-save prints them) hold `jump`."""
    want = f"-j {jump.target}"
    return any(line.endswith(want) or f"{want} " in line for line in rule_lines)


def iptables_payload(state: ProxyState, family: IPFamily, jumps: Iterable[Jump] = JUMPS) -> str:
    """The `iptables-restore --noflush` input for `family`: lbd's IPVS chains, flushed and
    refilled (a constant number of rules: only the cluster CIDRs change it), plus `jumps`
    (the built-in chain jumps that are missing)."""
    s = {base: set_name(base, family) for base in SetBase}
    cidrs = [c for c in (_canonical_net(x) for x in state.cidrs(family, state.cluster_cidrs)) if c]
    jumps = list(jumps)
    out: list[str] = []

    def table(name: str, chains: list[str], rules: list[str]) -> None:
        out.append(f"*{name}")
        out.extend(f":{c} - [0:0]" for c in chains)
        # Inserted at the top in reverse, so they end up in JUMPS order (as kube-proxy).
        for j in reversed([j for j in jumps if j.table == name]):
            out.append(f"-I {j.chain} 1 {j.spec()}")
        out.append(CANARY_RULE)
        out.extend(rules)
        out.append("COMMIT")

    sc = s[SetBase.SHORT_CIRCUIT]
    mark_from_set = f"-j SET --map-set {sc} dst,dst --map-mark"
    table(
        "mangle",
        [PREROUTING, OUTPUT, CANARY],
        [
            *(
                f'-A {PREROUTING} -m comment --comment "pod traffic to Local-policy frontends" '
                f"-s {c} -m set --match-set {sc} dst,dst {mark_from_set}"
                for c in cidrs
            ),
            f'-A {OUTPUT} -m comment --comment "node traffic to Local-policy frontends" '
            f"-m set --match-set {sc} dst,dst {mark_from_set}",
        ],
    )

    cip = f"-m set --match-set {s[SetBase.CLUSTER_IP]} dst,dst"
    nat_chains = [SERVICES, NODE_PORT, MARK_MASQ, POSTROUTING, CANARY]
    nat: list[str] = []
    # Off-cluster clients reaching a cluster IP may be answered from another node.
    if state.masquerade_all:
        nat.append(f"-A {SERVICES} {cip} -j {MARK_MASQ}")
    elif len(cidrs) == 1:
        nat.append(f"-A {SERVICES} ! -s {cidrs[0]} {cip} -j {MARK_MASQ}")
    elif cidrs:
        nat_chains.append(MASQ_OFF_CLUSTER)
        nat.append(f"-A {SERVICES} {cip} -j {MASQ_OFF_CLUSTER}")
        nat.extend(f"-A {MASQ_OFF_CLUSTER} -s {c} -j RETURN" for c in cidrs)
        nat.append(f"-A {MASQ_OFF_CLUSTER} -j {MARK_MASQ}")
    nat += [
        # Cluster policy may forward to another node: SNAT so replies come back here.
        f"-A {SERVICES} -m set --match-set {s[SetBase.EXTERNAL_IP]} dst,dst "
        f"-m set ! --match-set {s[SetBase.EXTERNAL_IP_LOCAL]} dst,dst -j {MARK_MASQ}",
        f"-A {SERVICES} -m set --match-set {s[SetBase.LOAD_BALANCER]} dst,dst "
        f"-m set ! --match-set {s[SetBase.LOAD_BALANCER_LOCAL]} dst,dst -j {MARK_MASQ}",
        # Virtual addresses are never node ports.
        f"-A {SERVICES} -m set --match-set {s[SetBase.IPVS_IPS]} dst -j RETURN",
        f"-A {SERVICES} -m addrtype --dst-type LOCAL -j {NODE_PORT}",
    ]
    for proto in Protocol:
        p = proto.value.lower()
        nat.append(
            f"-A {NODE_PORT} -p {p} -m set --match-set {set_name(NODE_PORT_SET[proto])} dst "
            f"-m set ! --match-set {set_name(NODE_PORT_LOCAL_SET[proto])} dst -j {MARK_MASQ}"
        )
    nat += [
        f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}",
        # Hairpin: a pod reaching itself through a service must be SNATed, or its reply
        # would bypass IPVS.
        f'-A {POSTROUTING} -m comment --comment "hairpin" '
        f"-m set --match-set {s[SetBase.LOOP_BACK]} dst,dst,src -j MASQUERADE",
        # The node reaching a virtual address picks that address as source; it must not
        # leave the node with it.
        f'-A {POSTROUTING} -m comment --comment "node traffic sourced from a virtual address" '
        f"-m set --match-set {s[SetBase.IPVS_IPS]} src -j MASQUERADE",
        f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        # Clear the mark so a packet re-entering the stack is not masqueraded twice.
        f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
        f'-A {POSTROUTING} -m comment --comment "lbd service traffic requiring SNAT" '
        f"-j MASQUERADE --random-fully",
    ]
    table("nat", nat_chains, nat)

    table(
        "filter",
        [FIREWALL, HEALTH_CHECK, FILTER, FORWARD, CANARY],
        [
            f'-A {FIREWALL} -m comment --comment "loadBalancerSourceRanges" '
            f"-m set --match-set {s[SetBase.LOAD_BALANCER_FW]} dst,dst "
            f"-m set ! --match-set {s[SetBase.LOAD_BALANCER_SOURCE_CIDR]} dst,dst,src -j DROP",
            f"-A {HEALTH_CHECK} -p tcp -m set --match-set "
            f"{set_name(SetBase.HEALTH_CHECK_NODE_PORT)} dst -j ACCEPT",
            # Short-circuited traffic is served by its firewall-mark virtual server.
            f"-A {FILTER} -m mark --mark {FWMARK_MATCH} -j RETURN",
            f'-A {FILTER} -m comment --comment "Local policy without local endpoints" '
            f"-m set --match-set {s[SetBase.NO_LOCAL_ENDPOINTS]} dst,dst -j DROP",
            f"-A {FILTER} {cip} -j RETURN",
            f"-A {FILTER} -m set --match-set {s[SetBase.EXTERNAL_IP]} dst,dst -j RETURN",
            f"-A {FILTER} -m set --match-set {s[SetBase.LOAD_BALANCER]} dst,dst -j RETURN",
            # A virtual address accepts only its services' ports.
            f'-A {FILTER} -m comment --comment "virtual address, no such service port" '
            f"-m set --match-set {s[SetBase.IPVS_IPS]} dst -j {_REJECT[family]}",
            f"-A {FORWARD} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
            f"-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ],
    )
    return "\n".join(out) + "\n"
