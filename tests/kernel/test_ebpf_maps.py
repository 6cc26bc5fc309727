"""The maps as the kernel sees them: C layouts vs the ctypes mirrors, pinning, re-adoption.

Compiles bpf_lb/ with BCC into a private bpffs directory (nothing is attached anywhere)
and compares every key/value struct BCC derived from lb.h with bpf_lb.maps' mirror,
field by field; then checks that a second load re-opens the pinned maps (content kept)
and that a pin whose layout changed (another Maglev table size) is recreated; that
batched writes, reads and deletions round-trip; and that a state too big for the maps is
refused whole, with the map named.
"""

from __future__ import annotations

import ctypes as ct
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ebpf_support import EBPF_KERNEL_MARKS

from backends.ebpf.loader import Datapath, MapSizes
from backends.ebpf.plan import BACKENDS, SERVICES, MapView, Op, fill_slots
from bpf_lb import bpfsys, maps
from lbd.model.state import Endpoint, IPFamily, Protocol, ProxyState, ServicePort
from lbd.model.state import ServicePortName as Name

pytestmark = EBPF_KERNEL_MARKS

SMALL = MapSizes(
    services=1024,
    backends=1024,
    rev_nat=1024,
    maglev=16,
    affinity=1024,
    conntrack=1024,
    source_ranges=128,
    sock_rev=1024,
)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path(f"/sys/fs/bpf/lbd/lbdt-maps-{secrets.token_hex(3)}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if path.parent.exists() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def _layout(t: type) -> tuple[int, list[tuple[str, int, int]]]:
    if not issubclass(t, ct.Structure):
        return ct.sizeof(t), []
    fields = []
    for name, *_ in t._fields_:
        desc = getattr(t, name)
        fields.append((name, desc.offset, desc.size))
    return ct.sizeof(t), fields


def test_ctypes_mirrors_match_the_c_structs(pin_dir: Path) -> None:
    dp = Datapath(pin_dir, maglev_table_size=251, sizes=SMALL)
    dp.load()
    try:
        for spec in maps.MAP_SPECS.values():
            native = dp._bpf.get_table(spec.name.encode())  # BCC's own reading of lb.h
            mirror_value = spec.value or maps.maglev_val_type(251)
            for what, theirs, mine in (
                ("key", native.Key, spec.key),
                ("value", native.Leaf, mirror_value),
            ):
                size, fields = _layout(theirs)
                my_size, my_fields = _layout(mine)
                assert size == my_size, (spec.name, what, size, my_size)
                # BCC names padding it invents "__pad_*": there must be none
                assert not [f for f in fields if f[0].startswith("__pad")], (spec.name, what)
                if fields:
                    assert fields == my_fields, (spec.name, what)
            # and the kernel agrees on the sizes
            fd = bpfsys.obj_get(str(pin_dir / spec.name))
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            assert info.key_size == ct.sizeof(spec.key), spec.name
            assert info.value_size == ct.sizeof(mirror_value), spec.name
            assert info.name == spec.name[:15]
    finally:
        dp.close()


def test_pinned_maps_are_readopted_and_incompatible_ones_recreated(pin_dir: Path) -> None:
    first = Datapath(pin_dir, maglev_table_size=251, sizes=SMALL)
    first.load()
    first.apply(Op(BACKENDS, 7, maps.Backend("10.244.1.11", 8080, 4)))
    first.apply(Op("lbd_maglev", 1, tuple([7] * 251)))
    first.close()
    assert sorted(p.name for p in pin_dir.iterdir() if p.is_file()) == sorted(maps.MAP_SPECS)

    second = Datapath(pin_dir, maglev_table_size=251, sizes=SMALL)
    second.load()
    view = second.read_view()
    assert view.backends == {7: maps.Backend("10.244.1.11", 8080, 4)}
    assert view.maglev == {1: frozenset({7})}
    second.close()

    # a new Maglev size changes the maglev map's value size: that map alone starts over
    third = Datapath(pin_dir, maglev_table_size=1021, sizes=SMALL)
    third.load()
    view = third.read_view()
    assert view.backends == {7: maps.Backend("10.244.1.11", 8080, 4)}
    assert view.maglev == {}
    third.close()

    # bpftool, an independent reader, sees the pinned backend with its BTF field names
    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(pin_dir / "lbd_backends")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"port":' in out.stdout and '"family":4' in out.stdout.replace(" ", "")
    Datapath(pin_dir).unpin()
    assert not pin_dir.exists()


def test_batched_writes_reads_and_deletes_round_trip(pin_dir: Path) -> None:
    dp = Datapath(pin_dir, maglev_table_size=251, sizes=SMALL)
    dp.load()
    try:
        fe = maps.Frontend("10.96.0.10", 80, maps.PROTO_TCP, 4)
        ops = [Op(BACKENDS, i, maps.Backend(f"10.244.1.{i}", 8080, 4)) for i in range(1, 201)]
        # the frontend's 200 slots, then its head: one op, 201 entries
        head = maps.ServiceValue(0, 1, 1, 0, 200, 0)
        ops.append(Op(SERVICES, (fe, fill_slots(200)), (*range(1, 201), head)))
        view = MapView()
        view.index()
        dp.apply_ops(ops, view)
        assert dp.read_view().services == view.services and len(view.services) == 201
        assert dp.read_view().backends == view.backends
        # deleting a mix of present and absent keys deletes the present ones
        gone = [Op(BACKENDS, i) for i in (5, 999, 6, 1000, 7)]
        dp.apply_ops(gone, view)
        assert sorted(set(range(1, 201)) - set(dp.read_view().backends)) == [5, 6, 7]
    finally:
        dp.close()


def cluster(n: int) -> ProxyState:
    """`n` ClusterIP service ports with 3 endpoints each."""
    ports = {}
    for i in range(n):
        eps = tuple(Endpoint(f"10.244.{i}.{j}", 8080) for j in range(1, 4))
        sp = ServicePort(
            Name("default", f"s{i}", "", Protocol.TCP),
            IPFamily.V4,
            f"10.96.0.{i + 1}",
            80,
            Protocol.TCP,
            cluster_endpoints=eps,
        )
        ports[(sp.name, sp.family)] = sp
    return ProxyState("node-1", ("192.168.0.10",), service_ports=ports)


def test_a_full_map_is_reported_not_half_written(pin_dir: Path) -> None:
    from backends.ebpf.backend import MAP_PRESSURE, EbpfBackend
    from backends.ebpf.plan import MapCapacityError

    # 8 service ports x (1 + 3 slots) = 32 service entries; 40 fit, 44 do not
    sizes = MapSizes(services=40, backends=1024, rev_nat=1024, maglev=16, sock_rev=1024)
    backend = EbpfBackend(cgroup=None, bpffs=str(pin_dir), gc_interval=0, map_sizes=sizes)
    try:
        backend.sync(cluster(8), full=True)
        assert MAP_PRESSURE.labels("lbd_services")._value.get() == pytest.approx(32 / 40)
        with pytest.raises(MapCapacityError, match="lbd_services needs 44 entries and holds 40"):
            backend.sync(cluster(11), full=False)
        # nothing of the refused state went in, and the next state that fits does
        assert len(backend.datapath.read_view().services) == 32
        backend.sync(cluster(9), full=False)
        assert len(backend.datapath.read_view().services) == 36
        # the kernel's own refusal (E2BIG) is an error naming the map, too
        fe = maps.Frontend("10.96.9.9", 80, maps.PROTO_TCP, 4)
        extra = [Op(SERVICES, (fe, (i,)), (1,)) for i in range(1, 10)]
        view = backend.datapath.read_view()
        view.index()
        with pytest.raises(bpfsys.MapFullError, match="lbd_services is full"):
            backend.datapath.apply_ops(extra, view)
        # the refused run is not recorded in the view (the kernel took what fitted)
        kernel = backend.datapath.read_view().services
        assert view.services.items() <= kernel.items()
        assert len(view.services) == 36 and len(kernel) == 40
    finally:
        backend.cleanup()


def test_withdrawing_the_frontends_keeps_what_balanced_flows_need(pin_dir: Path) -> None:
    """The first half of leaving ebpf (a mode switch): every frontend goes, so new flows
    pass to the next mode, and what established flows use stays until cleanup."""
    from backends.ebpf.backend import EbpfBackend

    backend = EbpfBackend(cgroup=None, bpffs=str(pin_dir), gc_interval=0)
    try:
        backend.sync(cluster(3), full=True)
        before = backend.datapath.read_view()
        assert len(before.services) == 3 * 4
        assert backend.withdraw() == 3
        after = backend.datapath.read_view()
        assert after.services == {}
        assert after.backends == before.backends and after.rev_nat == before.rev_nat
        assert backend.status() == []
        assert backend.withdraw() == 0  # nothing left to withdraw
        # a separate instance (the next mode's daemon) works from the pins alone
        backend.sync(cluster(3), full=True)
        other = EbpfBackend(cgroup=None, bpffs=str(pin_dir), gc_interval=0)
        assert other.withdraw() == 3
        assert backend.datapath.read_view().services == {}
        assert list(pin_dir.rglob("*"))  # the pins stay until cleanup
    finally:
        backend.cleanup()
    assert not [p for p in pin_dir.rglob("*") if p.is_file()]
