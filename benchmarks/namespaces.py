"""Scratch network namespaces for the benchmarks, and the guarantee that they go away.

Every program that touches netfilter runs inside a namespace made here, never in the
namespace the benchmark was started in. Each one is named `lbdb-<pid>-<random>` and
deleted when its `with` block ends, also on Ctrl-C or SIGTERM; the pid in the name lets
a later run remove what a SIGKILLed run left behind without touching namespaces of a run
that is still going.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterator
from types import FrameType

from lbd.testing import netns

PREFIX = "lbdb"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+$")
_DEFERRED = {signal.SIGINT, signal.SIGTERM}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> list[str]:
    """Delete `lbdb-<pid>-*` namespaces whose run is dead (it was SIGKILLed)."""
    removed = []
    for name in netns.list_netns():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(netns.NetnsError):
                netns.kill_processes_in([name])
                netns.delete(name)
                removed.append(name)
    return removed


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until the block ends: a clean-up must not be interrupted
    half-way (that is exactly how a namespace would be leaked)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    """A fresh namespace with only `lo` up; deleted (with anything running in it) after."""
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    with signals_deferred():
        netns.create(name)
    try:
        netns.ip_batch(name, ["link set lo up"])
        yield name
    finally:
        with signals_deferred():
            netns.kill_processes_in([name])
            netns.delete(name)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGINT unwind as KeyboardInterrupt wherever the program is, so
    every `finally` (namespaces, the API server subprocess) runs.

    SIGINT gets our handler too, because asyncio.run() installs its own only when it finds
    Python's default one, and that one merely cancels the main task at its next `await`:
    an interrupt arriving during a long synchronous step was seen to be lost.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
