"""The packed-bytes map codecs (bpf_lb.maps pack_*/unpack_*) against the ctypes mirrors.

The loader writes and reads maps as packed bytes for speed; the ctypes encoders are the
layouts a kernel test checks against the C structs. Both must give the same bytes, and
reading back must give the records that were written.
"""

from __future__ import annotations

import ctypes

import pytest

from bpf_lb import maps
from bpf_lb.maps import (
    FAMILY_V4,
    FAMILY_V6,
    PROTO_TCP,
    PROTO_UDP,
    SCOPE_EXT,
    SCOPE_INT,
    Backend,
    CtEntry,
    CtTuple,
    Frontend,
    RevNat,
    ServiceValue,
)

FRONTENDS = [
    Frontend("10.96.0.10", 80, PROTO_TCP, FAMILY_V4),
    Frontend("192.168.0.10", 30080, PROTO_UDP, FAMILY_V4, SCOPE_INT),
    Frontend("fd00:10:96::a", 443, PROTO_TCP, FAMILY_V6, SCOPE_EXT),
    Frontend("255.255.255.255", 65535, PROTO_TCP, FAMILY_V4),
]


@pytest.mark.parametrize("fe", FRONTENDS, ids=str)
@pytest.mark.parametrize("slot", [0, 1, 7, 65535])
def test_service_keys(fe: Frontend, slot: int) -> None:
    packed = maps.pack_svc_key(fe, slot)
    assert packed == bytes(maps.encode_svc_key(fe, slot))
    assert maps.pack_svc_slot_keys(fe, [slot]) == packed


def test_service_keys_of_several_frontends_and_slots() -> None:
    slots = [3, 0, 1, 2, 300]  # in any order, past the first 256 too
    keys, values = maps.pack_svc_entries([(fe, slots) for fe in FRONTENDS], [[1] * 5] * 4)
    assert keys == b"".join(bytes(maps.encode_svc_key(fe, i)) for fe in FRONTENDS for i in slots)
    assert values == bytes(maps.encode_svc_val(ServiceValue(1))) * 20
    assert maps.pack_svc_slot_keys(FRONTENDS[0], []) == b""


VALUES = [
    ServiceValue(0, 3, 4, 60, 10, 0x1FF),  # a head
    7,  # a backend slot: its backend id
    ServiceValue(2**32 - 1, 0, 1, 0, 0, 0),  # not a plain slot value: packed in full
]


def test_service_values_round_trip() -> None:
    packed = maps.pack_svc_slot_values(VALUES)
    whole = [v if isinstance(v, ServiceValue) else ServiceValue(v) for v in VALUES]
    assert packed == b"".join(bytes(maps.encode_svc_val(v)) for v in whole)
    # a frontend held per slot (slot 3 has no entry) packs and reads back as it was
    frontends = {FRONTENDS[0]: [*VALUES, None, 9], FRONTENDS[2]: [None, 5]}
    keys, values = maps.pack_frontends(frontends)
    assert len(keys) == 5 * ctypes.sizeof(maps.SvcKey) and len(values) == 5 * maps.SVC_VAL.size
    assert maps.unpack_frontends(keys, values) == frontends


@pytest.mark.parametrize(
    "b", [Backend("10.244.1.11", 8080, FAMILY_V4, 1), Backend("fd00::1", 53, FAMILY_V6)], ids=str
)
def test_backends_and_rev_nat(b: Backend) -> None:
    assert maps.pack_backend(b) == bytes(maps.encode_backend(b))
    assert maps.unpack_backends(maps.pack_backend(b)) == [b]
    r = RevNat(b.addr, b.port, b.family)
    assert maps.pack_rev_nat(r) == bytes(maps.encode_rev_nat(r))
    assert maps.unpack_rev_nats(maps.pack_rev_nat(r)) == [r]


def test_names_and_maglev_tables() -> None:
    name = "default/web:http/tcp/v4#cluster"
    assert maps.pack_svc_name(name) == bytes(maps.encode_svc_name(name))
    assert maps.unpack_svc_names(maps.pack_svc_name(name) * 2) == [name, name]
    table = [1, 2, 3, 2, 1, 3, 3]
    assert maps.pack_maglev(table, 7) == bytes(maps.encode_maglev(table, 7))
    assert maps.unpack_maglev_ids(maps.pack_maglev(table, 7), 7) == [frozenset({1, 2, 3})]
    with pytest.raises(ValueError):
        maps.pack_maglev(table, 11)


def test_conntrack_round_trip() -> None:
    key = CtTuple("10.0.0.1", "10.96.0.10", 40000, 80, PROTO_UDP, FAMILY_V4, maps.CT_FORWARD)
    val = CtEntry("10.244.1.11", "", 8080, 0, 3, 4, maps.CT_SEEN_REPLY, 123456789)
    raw_key = maps.pack_ct_key(key)
    assert raw_key == bytes(maps.encode_ct_key(key))
    assert maps.unpack_ct(raw_key, bytes(maps.encode_ct_val(val))) == {key: val}


def test_addresses_are_parsed_strictly() -> None:
    assert maps.addr_bytes("10.1.2.3") == bytes([10, 1, 2, 3]) + bytes(12)
    for bad in ("10.1.2", "010.1.2.3", "10.1.2.3 ", "not-an-ip", "1::2::3"):
        with pytest.raises(ValueError):
            maps.addr_bytes(bad)


def test_backends_in_bulk() -> None:
    bs = [Backend("10.244.1.11", 8080, FAMILY_V4, 1), Backend("fd00::1", 53, FAMILY_V6)]
    assert maps.pack_backends(bs) == b"".join(bytes(maps.encode_backend(b)) for b in bs)


def test_ids_and_affinity_keys_in_bulk() -> None:
    ids = [0, 1, 7, 2**32 - 1]
    assert maps.pack_u32s(ids) == b"".join(bytes(ctypes.c_uint32(i)) for i in ids)
    assert maps.unpack_u32_keys(maps.pack_u32s(ids)) == ids
    with pytest.raises(OverflowError):
        maps.pack_u32s([2**32])
    keys = [(1, 2), (2**32 - 1, 5)]
    assert maps.pack_aff_match_keys(keys) == b"".join(
        bytes(maps.AffMatchKey(b, s)) for b, s in keys
    )


def test_conntrack_filter_keeps_udp_of_the_given_frontends() -> None:
    def entry(proto: int, rid: int, sport: int) -> tuple[CtTuple, CtEntry]:
        key = CtTuple("10.0.0.1", "10.96.0.10", sport, 53, proto, FAMILY_V4, maps.CT_FORWARD)
        return key, CtEntry("10.244.1.11", "", 53, 0, rid, 4, 0, 1)

    entries = [entry(PROTO_UDP, 3, 1), entry(PROTO_TCP, 3, 2), entry(PROTO_UDP, 4, 3)]
    keys = b"".join(maps.pack_ct_key(k) for k, _ in entries)
    values = b"".join(bytes(maps.encode_ct_val(v)) for _, v in entries)
    assert maps.unpack_ct(*maps.filter_ct(keys, values, True, None)) == dict(entries[0::2])
    assert maps.unpack_ct(*maps.filter_ct(keys, values, True, {4})) == dict(entries[2:])
    assert maps.unpack_ct(*maps.filter_ct(keys, values, False, {3})) == dict(entries[:2])
