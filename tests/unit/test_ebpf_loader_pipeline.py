"""The loader's pipelined writes of big plans, without a kernel: bpf(2) is faked.

Checks what the datapath relies on: the syscalls go out in plan order, every entry once,
and the view records a chunk only after its syscall succeeded (a failure leaves it as the
serial path would).
"""

from __future__ import annotations

import threading

import pytest

from backends.ebpf import loader
from backends.ebpf.plan import BACKENDS, SERVICES, MapView, Op, fill_slots, runs_of
from bpf_lb import bpfsys, maps
from bpf_lb.maps import Backend, Frontend, ServiceValue

CHUNK = loader.PIPELINE_CHUNK


def _addr(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _ops(n_backends: int) -> list[Op]:
    """n backends, then one frontend per 10 of them, each written whole (slots first,
    head last)."""
    ops = [Op(BACKENDS, i, Backend(_addr(i), 8080, 4)) for i in range(1, n_backends + 1)]
    for f in range(n_backends // 10):
        fe = Frontend(f"10.96.{f >> 8}.{f & 255}", 80, 6, 4)
        head = ServiceValue(0, f + 1, f + 1, 0, 10, 0)
        ops.append(Op(SERVICES, (fe, fill_slots(10)), (*range(f * 10 + 1, f * 10 + 11), head)))
    return ops


class FakeBpf:
    """Records the batched writes (map, first key, entries, thread) it is asked for."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, bytes, int, str]] = []
        self.fail_at = fail_at

    def update(self, fd: int, keys: bytes, values: bytes, ks: int, vs: int) -> int:
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise bpfsys.MapFullError(7, "map update: Argument list too long")
        assert len(keys) // ks == len(values) // vs
        self.calls.append((fd, keys[:ks], len(keys) // ks, threading.current_thread().name))
        return 1

    def delete(self, fd: int, keys: bytes, ks: int) -> int:
        self.calls.append((fd, keys[:ks], len(keys) // ks, threading.current_thread().name))
        return len(keys) // ks


@pytest.fixture
def datapath(monkeypatch: pytest.MonkeyPatch) -> loader.Datapath:
    dp = loader.Datapath("/nonexistent/lbd-test")
    fds = {BACKENDS: 3, SERVICES: 4}
    monkeypatch.setattr(dp, "_fd", lambda name: fds[name])
    return dp


def _serial_view(ops: list[Op]) -> MapView:
    view = MapView()
    view.index()
    view.apply_all(ops, runs_of(ops))
    return view


def test_a_big_plan_is_written_in_order_in_chunks_and_recorded(
    datapath: loader.Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBpf()
    monkeypatch.setattr(bpfsys, "map_update", fake.update)
    ops = _ops(2 * CHUNK + 100)
    assert len(ops) >= loader.PIPELINE_MIN_OPS
    view = MapView()
    view.index()
    calls = datapath.apply_ops(ops, view, runs_of(ops))
    # the backends in 3 chunks, then the services (11 entries a frontend, never split
    # between two chunks) in 3
    sizes = [n for _, _, n, _ in fake.calls]
    n_backends = 2 * CHUNK + 100
    assert sizes[:3] == [CHUNK, CHUNK, 100]
    assert sum(sizes[3:]) == n_backends // 10 * 11
    assert all(CHUNK <= n < CHUNK + 11 and n % 11 == 0 for n in sizes[3:5])
    assert calls == len(fake.calls)
    assert [fd for fd, _, _, _ in fake.calls] == [3, 3, 3, 4, 4, 4]
    first_ids = [maps.U32.unpack(k)[0] for _, k, _, _ in fake.calls[:3]]
    assert first_ids == [1, CHUNK + 1, 2 * CHUNK + 1]  # plan order
    assert {t for _, _, _, t in fake.calls} != {threading.current_thread().name}
    serial = _serial_view(ops)
    assert view == serial
    assert view.frontends == serial.frontends
    assert view.index().sid_fes == serial.index().sid_fes
    assert view.index().backend_refs == serial.index().backend_refs


def test_a_failed_chunk_stops_the_writes_and_is_not_recorded(
    datapath: loader.Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBpf(fail_at=2)
    monkeypatch.setattr(bpfsys, "map_update", fake.update)
    ops = _ops(2 * CHUNK + 100)
    view = MapView()
    view.index()
    with pytest.raises(bpfsys.MapFullError, match="lbd_backends is full"):
        datapath.apply_ops(ops, view, runs_of(ops))
    assert len(fake.calls) == 2  # nothing after the failed chunk went out
    assert view == _serial_view(ops[: 2 * CHUNK])  # what went in, and only that


def test_small_plans_are_written_on_the_calling_thread(
    datapath: loader.Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBpf()
    monkeypatch.setattr(bpfsys, "map_update", fake.update)
    monkeypatch.setattr(bpfsys, "map_delete", fake.delete)
    ops = _ops(100)
    ops += [Op(BACKENDS, 1)]  # a deletion: its own run
    datapath.apply_ops(ops, None, runs_of(ops))
    assert [n for _, _, n, _ in fake.calls] == [100, 110, 1]
    assert {t for _, _, _, t in fake.calls} == {threading.current_thread().name}
