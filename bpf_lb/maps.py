"""Python mirrors of the eBPF maps in bpf_lb/lb.h: ctypes layouts and plain records.

Owns two views of every map entry: the ctypes `Structure`s that must match the C structs
byte for byte (tests/unit/test_ebpf_plan.py compiles lb.h with BCC and compares sizes and
field offsets), and small frozen records (`Frontend`, `ServiceValue`, `Backend`, ...) that
the pure planner works with. `encode_*`/`decode_*` convert between them; nothing here
touches the kernel.

Addresses are 16 bytes in both families (IPv4 in the first 4, network order) with a
family byte beside them, so one map serves both families.
"""

from __future__ import annotations

import array
import ctypes as ct
import functools
import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SOURCE_DIR = Path(__file__).resolve().parent
C_SOURCES = ("lb.h", "sock.c", "tc.c")

FAMILY_V4 = 4
FAMILY_V6 = 6

SCOPE_EXT = 0
SCOPE_INT = 1

PROTO_TCP = 6
PROTO_UDP = 17
PROTO_SCTP = 132
PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_SCTP: "SCTP"}
PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}

# lb_svc_val.flags (slot 0)
SVC_EXTERNAL = 1 << 0
SVC_LOCAL = 1 << 1
SVC_AFFINITY = 1 << 2
SVC_REJECT = 1 << 3
SVC_TWO_SCOPES = 1 << 4
SVC_SRC_RANGE = 1 << 5
SVC_NODEPORT = 1 << 6
SVC_LOADBALANCER = 1 << 7
SVC_EXTERNAL_IP = 1 << 8

BACKEND_LOCAL = 1 << 0

BPF_F_NO_PREALLOC = 1 << 0

CT_SNAT = 1 << 0
CT_CLOSING = 1 << 1
CT_SEEN_REPLY = 1 << 2
CT_PASS = 1 << 4  # another mode's flow, left to the kernel's NAT (a mode switch)
CT_FORWARD = 0
CT_REPLY = 1

CFG_MAGLEV = 1 << 0
CFG_HOSTNS_ONLY = 1 << 1
CFG_HANDOVER = 1 << 2  # another mode is taking the node over (its daemon sets it)

# Longest "namespace/name:port/proto/vN#view" kept in lbd_svcnames (for status and for
# re-adopting svc ids after a restart); Kubernetes names fit with room to spare.
SVC_NAME_LEN = 256

Addr = ct.c_uint32 * 4


# --- ctypes mirrors of lb.h ------------------------------------------------------------------


class SvcKey(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("dport", ct.c_uint16),
        ("slot", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
        ("scope", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class SvcVal(ct.Structure):
    _fields_ = [
        ("backend_id", ct.c_uint32),
        ("svc_id", ct.c_uint32),
        ("rev_nat_id", ct.c_uint32),
        ("affinity_timeout", ct.c_uint32),
        ("count", ct.c_uint16),
        ("flags", ct.c_uint16),
    ]


class BackendVal(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class RevNatVal(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


def maglev_val_type(table_size: int) -> type[ct.Structure]:
    """lb_maglev_val for a table of `table_size` slots (LBD_MAGLEV_M at compile time)."""
    return type(
        f"MaglevVal{table_size}",
        (ct.Structure,),
        {"_fields_": [("backend_ids", ct.c_uint32 * table_size)]},
    )


class AffinityKey(ct.Structure):
    _fields_ = [
        ("client", Addr),
        ("svc_id", ct.c_uint32),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class AffinityVal(ct.Structure):
    _fields_ = [
        ("last_used_ns", ct.c_uint64),
        ("backend_id", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class AffMatchKey(ct.Structure):
    _fields_ = [("backend_id", ct.c_uint32), ("svc_id", ct.c_uint32)]


class CtKey(ct.Structure):
    _fields_ = [
        ("saddr", Addr),
        ("daddr", Addr),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("family", ct.c_uint8),
        ("dir", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class CtVal(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("addr2", Addr),
        ("port", ct.c_uint16),
        ("port2", ct.c_uint16),
        ("rev_nat_id", ct.c_uint32),
        ("backend_id", ct.c_uint32),
        ("flags", ct.c_uint16),
        ("pad", ct.c_uint16),
        ("last_seen_ns", ct.c_uint64),
    ]


class SrcRangeKey(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("rev_nat_id", ct.c_uint32), ("addr", Addr)]


class SockRevKey(ct.Structure):
    _fields_ = [
        ("cookie", ct.c_uint64),
        ("addr", Addr),
        ("port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8 * 5),
    ]


class SockRevVal(ct.Structure):
    _fields_ = [
        ("addr", Addr),
        ("port", ct.c_uint16),
        ("family", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("rev_nat_id", ct.c_uint32),
    ]


class ConfigVal(ct.Structure):
    _fields_ = [
        ("node_addr4", Addr),
        ("node_addr6", Addr),
        ("host_netns_cookie", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("snat_port_min", ct.c_uint16),
        ("snat_port_max", ct.c_uint16),
        ("takeover_until_ns", ct.c_uint64),
    ]


class SvcNameVal(ct.Structure):
    _fields_ = [("name", ct.c_char * SVC_NAME_LEN)]


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One map of lb.h: its C name (also its pin file name) and layout."""

    name: str
    kind: str  # BCC's table type string
    key: type[ct._SimpleCData] | type[ct.Structure]
    value: type[ct._SimpleCData] | type[ct.Structure] | None  # None: depends on the M
    size_macro: str | None  # the -D that sets max_entries (None: fixed)
    flags: int = 0  # map_flags lb.h gives it (BPF_F_NO_PREALLOC)


MAP_SPECS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        MapSpec("lbd_services", "hash", SvcKey, SvcVal, "LBD_SERVICES_MAX", BPF_F_NO_PREALLOC),
        MapSpec(
            "lbd_backends", "hash", ct.c_uint32, BackendVal, "LBD_BACKENDS_MAX", BPF_F_NO_PREALLOC
        ),
        MapSpec("lbd_revnat", "hash", ct.c_uint32, RevNatVal, "LBD_REV_NAT_MAX", BPF_F_NO_PREALLOC),
        MapSpec("lbd_maglev", "hash", ct.c_uint32, None, "LBD_MAGLEV_MAX", BPF_F_NO_PREALLOC),
        MapSpec("lbd_affinity", "lru_hash", AffinityKey, AffinityVal, "LBD_AFFINITY_MAX"),
        MapSpec(
            "lbd_aff_match", "hash", AffMatchKey, ct.c_uint8, "LBD_BACKENDS_MAX", BPF_F_NO_PREALLOC
        ),
        MapSpec("lbd_ct", "lru_hash", CtKey, CtVal, "LBD_CT_MAX"),
        MapSpec(
            "lbd_srcrange",
            "lpm_trie",
            SrcRangeKey,
            ct.c_uint8,
            "LBD_SRC_RANGE_MAX",
            BPF_F_NO_PREALLOC,
        ),
        MapSpec("lbd_sockrev", "lru_hash", SockRevKey, SockRevVal, "LBD_SOCK_REV_MAX"),
        MapSpec("lbd_config", "array", ct.c_uint32, ConfigVal, None),
        MapSpec(
            "lbd_svcnames", "hash", ct.c_uint32, SvcNameVal, "LBD_SERVICES_MAX", BPF_F_NO_PREALLOC
        ),
    )
}


# --- addresses and ports ----------------------------------------------------------------------


def family_of(ip: str) -> int:
    return FAMILY_V6 if ":" in ip else FAMILY_V4


def encode_addr(ip: str) -> ct.Array:
    return Addr.from_buffer_copy(addr_bytes(ip))


def decode_addr(addr: ct.Array, family: int) -> str:
    return _addr_text(bytes(addr), family)


@functools.lru_cache(maxsize=1 << 18)
def _addr_text(raw: bytes, family: int) -> str:
    # ipaddress's text (the planner's canonical form), cached: reading 10k services back
    # decodes the same few thousand addresses over and over
    if family == FAMILY_V4:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def htons(port: int) -> int:
    """A port as the C side stores it (__be16) read back as a native u16 (a byte swap:
    the hosts lbd runs on are little-endian)."""
    return ((port & 0xFF) << 8) | ((port >> 8) & 0xFF)


ntohs = htons


def canonical_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


# --- records the planner works with -----------------------------------------------------------
# NamedTuples rather than dataclasses: the planner hashes and compares hundreds of
# thousands of them per sync, and tuples do both in C.


class Frontend(NamedTuple):
    """A service map key without its slot: what a client addresses, and for whom."""

    addr: str  # canonical text
    port: int
    proto: int  # IPPROTO_*
    family: int
    scope: int = SCOPE_EXT

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.family == FAMILY_V6 else self.addr
        return f"{host}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}"


class ServiceValue(NamedTuple):
    """lb_svc_val: slot 0 uses everything but backend_id, slots 1..n only backend_id."""

    backend_id: int = 0
    svc_id: int = 0
    rev_nat_id: int = 0
    affinity_timeout: int = 0
    count: int = 0
    flags: int = 0


class Backend(NamedTuple):
    addr: str
    port: int
    family: int
    flags: int = 0

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.family == FAMILY_V6 else self.addr
        return f"{host}:{self.port}"


class RevNat(NamedTuple):
    addr: str
    port: int
    family: int


@dataclass(frozen=True, slots=True)
class Config:
    node_addr4: str = ""
    node_addr6: str = ""
    host_netns_cookie: int = 0
    flags: int = 0
    snat_port_min: int = 0
    snat_port_max: int = 0
    takeover_until_ns: int = 0  # CLOCK_MONOTONIC; 0: no mode switch in progress


class SourceRange(NamedTuple):
    """One allowed CIDR of one frontend (lbd_srcrange), by the frontend's rev-NAT id."""

    rev_nat_id: int
    cidr: str  # canonical network text


# --- encode / decode -------------------------------------------------------------------------


def encode_svc_key(fe: Frontend, slot: int) -> SvcKey:
    return SvcKey(encode_addr(fe.addr), htons(fe.port), slot, fe.proto, fe.family, fe.scope, 0)


def decode_svc_key(k: SvcKey) -> tuple[Frontend, int]:
    fe = Frontend(decode_addr(k.addr, k.family), ntohs(k.dport), k.proto, k.family, k.scope)
    return fe, k.slot


def encode_svc_val(v: ServiceValue) -> SvcVal:
    return SvcVal(v.backend_id, v.svc_id, v.rev_nat_id, v.affinity_timeout, v.count, v.flags)


def decode_svc_val(v: SvcVal) -> ServiceValue:
    return ServiceValue(v.backend_id, v.svc_id, v.rev_nat_id, v.affinity_timeout, v.count, v.flags)


def encode_backend(b: Backend) -> BackendVal:
    return BackendVal(encode_addr(b.addr), htons(b.port), b.family, b.flags)


def decode_backend(v: BackendVal) -> Backend:
    return Backend(decode_addr(v.addr, v.family), ntohs(v.port), v.family, v.flags)


def encode_rev_nat(r: RevNat) -> RevNatVal:
    return RevNatVal(encode_addr(r.addr), htons(r.port), r.family, 0)


def decode_rev_nat(v: RevNatVal) -> RevNat:
    return RevNat(decode_addr(v.addr, v.family), ntohs(v.port), v.family)


def encode_config(c: Config) -> ConfigVal:
    return ConfigVal(
        encode_addr(c.node_addr4) if c.node_addr4 else Addr(),
        encode_addr(c.node_addr6) if c.node_addr6 else Addr(),
        c.host_netns_cookie,
        c.flags,
        c.snat_port_min,
        c.snat_port_max,
        c.takeover_until_ns,
    )


def decode_config(v: ConfigVal) -> Config:
    a4 = decode_addr(v.node_addr4, FAMILY_V4) if any(v.node_addr4) else ""
    a6 = decode_addr(v.node_addr6, FAMILY_V6) if any(v.node_addr6) else ""
    return Config(
        a4,
        a6,
        v.host_netns_cookie,
        v.flags,
        v.snat_port_min,
        v.snat_port_max,
        v.takeover_until_ns,
    )


def encode_src_range(r: SourceRange) -> SrcRangeKey:
    net = ipaddress.ip_network(r.cidr, strict=False)
    return SrcRangeKey(32 + net.prefixlen, r.rev_nat_id, encode_addr(str(net.network_address)))


def decode_src_range(k: SrcRangeKey) -> SourceRange:
    # The family is not in the key: a frontend has one, and an IPv4 CIDR leaves the other
    # 12 bytes zero; the longest IPv4 prefix is 32 bits.
    bits = k.prefixlen - 32
    raw = bytes(k.addr)
    if bits <= 32 and not any(raw[4:]):
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
            (raw[:4], bits), strict=False
        )
    else:
        net = ipaddress.IPv6Network((raw, bits), strict=False)
    return SourceRange(k.rev_nat_id, str(net))


def encode_svc_name(name: str) -> SvcNameVal:
    raw = name.encode()[: SVC_NAME_LEN - 1]
    return SvcNameVal(raw)


def decode_svc_name(v: SvcNameVal) -> str:
    return v.name.decode(errors="replace")


def encode_maglev(table: tuple[int, ...] | list[int], table_size: int) -> ct.Structure:
    val = maglev_val_type(table_size)()
    if len(table) != table_size:
        raise ValueError(f"a Maglev table has {table_size} slots, not {len(table)}")
    val.backend_ids[:] = table
    return val


def decode_maglev_ids(v: ct.Structure) -> frozenset[int]:
    """The set of backend ids a table holds (what the planner compares)."""
    return frozenset(v.backend_ids)


class CtTuple(NamedTuple):
    """An lbd_ct key: a flow's tuple as a packet carries it, and which direction it is."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    family: int
    dir: int  # CT_FORWARD | CT_REPLY


class CtEntry(NamedTuple):
    """An lbd_ct value (see lb_ct_val for what addr/addr2 mean per direction)."""

    addr: str
    addr2: str  # "" when unused (a forward entry without SNAT)
    port: int
    port2: int
    rev_nat_id: int
    backend_id: int
    flags: int
    last_seen_ns: int


def encode_ct_key(t: CtTuple) -> CtKey:
    return CtKey(
        encode_addr(t.saddr),
        encode_addr(t.daddr),
        htons(t.sport),
        htons(t.dport),
        t.proto,
        t.family,
        t.dir,
        0,
    )


def decode_ct_key(k: CtKey) -> CtTuple:
    return CtTuple(
        decode_addr(k.saddr, k.family),
        decode_addr(k.daddr, k.family),
        ntohs(k.sport),
        ntohs(k.dport),
        k.proto,
        k.family,
        k.dir,
    )


def decode_ct_val(v: CtVal, family: int) -> CtEntry:
    return CtEntry(
        decode_addr(v.addr, family),
        decode_addr(v.addr2, family) if any(v.addr2) else "",
        ntohs(v.port),
        ntohs(v.port2),
        v.rev_nat_id,
        v.backend_id,
        v.flags,
        v.last_seen_ns,
    )


def encode_ct_val(e: CtEntry) -> CtVal:
    return CtVal(
        encode_addr(e.addr),
        encode_addr(e.addr2) if e.addr2 else Addr(),
        htons(e.port),
        htons(e.port2),
        e.rev_nat_id,
        e.backend_id,
        e.flags,
        0,
        e.last_seen_ns,
    )


# --- raw bytes -------------------------------------------------------------------------------
# The same layouts as the ctypes mirrors, packed and unpacked with `struct` (several times
# faster per entry than building ctypes objects): what the batched map reads and writes of
# the loader use. tests/unit/test_ebpf_maps_raw.py checks them against the ctypes encoders.

SVC_KEY = struct.Struct("=16sHHBBBB")
SVC_VAL = struct.Struct("=IIIIHH")
BACKEND_VAL = struct.Struct("=16sHBB")
REV_NAT_VAL = struct.Struct("=16sHBB")
U32 = struct.Struct("=I")
AFF_MATCH_KEY = struct.Struct("=II")
CT_KEY = struct.Struct("=16s16sHHBBBB")
CT_VAL = struct.Struct("=16s16sHHIIHHQ")


@functools.lru_cache(maxsize=1 << 18)
def addr_bytes(ip: str) -> bytes:
    """16 bytes: an IPv4 address in the first 4 (network order), zero padded."""
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip)
        return socket.inet_pton(socket.AF_INET, ip) + bytes(12)
    except OSError:
        # what inet_pton refuses (an IPv6 scope id; or garbage, for which ipaddress
        # raises the ValueError callers expect)
        packed = ipaddress.ip_address(ip).packed
        return packed + bytes(16 - len(packed))


# Where the slot sits in a service map key: after the 16-byte address and 2-byte port.
SVC_KEY_SLOT = slice(18, 20)


@functools.lru_cache(maxsize=1 << 16)
def svc_key_parts(fe: Frontend) -> tuple[bytes, bytes, bytes]:
    """A frontend's key bytes before and after the slot (which sits in the middle), and
    the two joined (after, then before: what separates two slots of its keys)."""
    whole = SVC_KEY.pack(addr_bytes(fe.addr), htons(fe.port), 0, fe.proto, fe.family, fe.scope, 0)
    pre, post = whole[: SVC_KEY_SLOT.start], whole[SVC_KEY_SLOT.stop :]
    return pre, post, post + pre


_SLOT = struct.Struct("=H")
assert array.array("I").itemsize == U32.size
_U32_ARRAY = functools.partial(array.array, "I")


class _SlotBytes(dict[int, bytes]):
    """Packed slot numbers, packed once each when first met."""

    def __missing__(self, slot: int) -> bytes:
        packed = self[slot] = _SLOT.pack(slot)
        return packed


_SLOT_BYTES = _SlotBytes()
# A backend slot's lb_svc_val: the backend id, every other field zero.
SLOT_VAL = struct.Struct("=I16x")
assert SLOT_VAL.size == SVC_VAL.size


def pack_svc_slot_keys(fe: Frontend, slots: Sequence[int]) -> bytes:
    """The service map keys of `fe`'s `slots`, back to back (the frontend's part is
    packed once and the slots joined in by C, whatever their number)."""
    if not slots:
        return b""
    pre, post, between = svc_key_parts(fe)
    return pre + between.join(map(_SLOT_BYTES.__getitem__, slots)) + post


def pack_svc_slot_values(values: Iterable[Any]) -> bytes:
    """Service map values back to back: an int is a backend slot's (that backend id),
    anything else a whole ServiceValue (a head)."""
    slot, whole = SLOT_VAL.pack, SVC_VAL.pack
    return b"".join([slot(v) if v.__class__ is int else whole(*v) for v in values])


def pack_svc_keys(keys: Iterable[tuple[Frontend, Sequence[int]]]) -> bytes:
    """Service map keys back to back: per frontend, the keys of its slot numbers."""
    return b"".join([pack_svc_slot_keys(fe, slots) for fe, slots in keys])


def pack_svc_entries(
    keys: Iterable[tuple[Frontend, Sequence[int]]], values: Iterable[Sequence[Any]]
) -> tuple[bytes, bytes]:
    """Packed keys and values of service map writes: per frontend, its slot numbers and
    their values in the same order (see pack_svc_slot_values)."""
    return pack_svc_keys(keys), pack_svc_slot_values(itertools.chain.from_iterable(values))


def pack_frontends(frontends: Mapping[Frontend, Sequence[Any]]) -> tuple[bytes, bytes]:
    """Every entry of frontends held per slot (index = slot, None = no entry), packed
    as pack_svc_entries packs them."""
    keys: list[tuple[Frontend, Sequence[int]]] = []
    values: list[Sequence[Any]] = []
    for fe, slots in frontends.items():
        if None in slots:
            keys.append((fe, [i for i, v in enumerate(slots) if v is not None]))
            values.append([v for v in slots if v is not None])
        else:
            keys.append((fe, range(len(slots))))
            values.append(slots)
    return pack_svc_entries(keys, values)


def pack_u32s(values: Iterable[int]) -> bytes:
    """u32 map keys (ids) back to back, in one C-level conversion."""
    return _U32_ARRAY(values).tobytes()


def pack_aff_match_keys(keys: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(itertools.starmap(AFF_MATCH_KEY.pack, keys))


def pack_svc_key(fe: Frontend, slot: int) -> bytes:
    return SVC_KEY.pack(addr_bytes(fe.addr), htons(fe.port), slot, fe.proto, fe.family, fe.scope, 0)


def pack_svc_val(v: ServiceValue) -> bytes:
    return SVC_VAL.pack(*v)


def pack_backend(b: Backend) -> bytes:
    return BACKEND_VAL.pack(addr_bytes(b.addr), htons(b.port), b.family, b.flags)


# lb_backend_val with the whole struct big-endian: the port is the only field wider
# than a byte, and it is stored in network order, so this packs what BACKEND_VAL packs
# with htons(port) and needs no per-entry byte swap.
_BACKEND_VAL_NET = struct.Struct(">16sHBB")
assert _BACKEND_VAL_NET.size == BACKEND_VAL.size


def pack_backends(values: Iterable[Backend]) -> bytes:
    columns = list(zip(*values, strict=True))  # addrs, ports, families, flags
    if not columns:
        return b""
    addrs, ports, families, flags = columns
    # map over the columns: the loop runs in C (a first sync at 10k packs 100k backends)
    return b"".join(map(_BACKEND_VAL_NET.pack, map(addr_bytes, addrs), ports, families, flags))


def pack_rev_nat(r: RevNat) -> bytes:
    return REV_NAT_VAL.pack(addr_bytes(r.addr), htons(r.port), r.family, 0)


def pack_maglev(table: tuple[int, ...] | list[int], table_size: int) -> bytes:
    if len(table) != table_size:
        raise ValueError(f"a Maglev table has {table_size} slots, not {len(table)}")
    return array.array("I", table).tobytes()


def pack_svc_name(name: str) -> bytes:
    return name.encode()[: SVC_NAME_LEN - 1].ljust(SVC_NAME_LEN, b"\0")


@functools.lru_cache(maxsize=1 << 16)
def _frontend(raw_addr: bytes, port: int, proto: int, family: int, scope: int) -> Frontend:
    # cached: the backend slots of one frontend decode to the same Frontend
    return Frontend(_addr_text(raw_addr, family), ntohs(port), proto, family, scope)


def unpack_frontends(keys: bytes, values: bytes) -> dict[Frontend, list[Any]]:
    """Service map entries per frontend, as a list indexed by slot: the head (slot 0) as
    a ServiceValue, a backend slot as its backend id when every other field is zero (as
    lbd writes them), else as the whole ServiceValue; None where a slot has no entry."""
    fe_of, new = _frontend, tuple.__new__  # struct already made the value's tuple
    out: dict[Frontend, list[Any]] = {}
    for (addr, port, slot, proto, family, scope, _), val in zip(
        SVC_KEY.iter_unpack(keys), SVC_VAL.iter_unpack(values), strict=True
    ):
        fe = fe_of(addr, port, proto, family, scope)
        slots = out.get(fe)
        if slots is None:
            out[fe] = slots = []
        if slot >= len(slots):
            slots.extend([None] * (slot + 1 - len(slots)))
        slots[slot] = val[0] if slot and not any(val[1:]) else new(ServiceValue, val)
    return out


def unpack_u32_keys(keys: bytes) -> list[int]:
    return [k for (k,) in U32.iter_unpack(keys)]


def unpack_backends(values: bytes) -> list[Backend]:
    return [
        Backend(_addr_text(addr, family), ntohs(port), family, flags)
        for addr, port, family, flags in BACKEND_VAL.iter_unpack(values)
    ]


def unpack_rev_nats(values: bytes) -> list[RevNat]:
    return [
        RevNat(_addr_text(addr, family), ntohs(port), family)
        for addr, port, family, _ in REV_NAT_VAL.iter_unpack(values)
    ]


def unpack_svc_names(values: bytes) -> list[str]:
    n = SVC_NAME_LEN
    return [
        values[i : i + n].split(b"\0", 1)[0].decode(errors="replace")
        for i in range(0, len(values), n)
    ]


def unpack_maglev_ids(values: bytes, table_size: int) -> list[frozenset[int]]:
    n = 4 * table_size
    return [frozenset(array.array("I", values[i : i + n])) for i in range(0, len(values), n)]


def unpack_ct(keys: bytes, values: bytes) -> dict[CtTuple, CtEntry]:
    out = {}
    for (sa, da, sp, dp, proto, fam, d, _), (a, a2, p, p2, rid, bid, fl, _, seen) in zip(
        CT_KEY.iter_unpack(keys), CT_VAL.iter_unpack(values), strict=True
    ):
        key = CtTuple(_addr_text(sa, fam), _addr_text(da, fam), ntohs(sp), ntohs(dp), proto, fam, d)
        addr2 = _addr_text(a2, fam) if any(a2) else ""
        out[key] = CtEntry(_addr_text(a, fam), addr2, ntohs(p), ntohs(p2), rid, bid, fl, seen)
    return out


def filter_ct(
    keys: bytes, values: bytes, udp_only: bool, rev_nat_ids: set[int] | None
) -> tuple[bytes, bytes]:
    """The packed conntrack entries that are UDP (if asked) and name one of
    `rev_nat_ids` (if given), still packed."""
    ks, vs = CT_KEY.size, CT_VAL.size
    proto_at = CtKey.proto.offset
    rid = struct.Struct("=I")
    rid_at = CtVal.rev_nat_id.offset
    kept_k, kept_v = [], []
    for i in range(len(keys) // ks):
        if udp_only and keys[i * ks + proto_at] != PROTO_UDP:
            continue
        if rev_nat_ids is not None:
            (r,) = rid.unpack_from(values, i * vs + rid_at)
            if r not in rev_nat_ids:
                continue
        kept_k.append(keys[i * ks : (i + 1) * ks])
        kept_v.append(values[i * vs : (i + 1) * vs])
    return b"".join(kept_k), b"".join(kept_v)


def pack_ct_key(t: CtTuple) -> bytes:
    return CT_KEY.pack(
        addr_bytes(t.saddr),
        addr_bytes(t.daddr),
        htons(t.sport),
        htons(t.dport),
        t.proto,
        t.family,
        t.dir,
        0,
    )
