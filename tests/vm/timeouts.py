"""A pytest plugin for slow machines: stretch the harness's waiting, not the tests' logic.

Under software emulation (the IPVS VM runs without KVM) everything is 20-50x slower than on
the host: a daemon needs ~20 s just to import. `-p tests.vm.timeouts` with
LBD_TEST_TIMEOUT_SCALE=N multiplies every `lbd.testing.env.eventually` deadline (daemon
health, sync waits, traffic retries) by N. Per-request timeouts are left alone: a request
that must time out still does so quickly, and one that must succeed is retried.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from lbd.testing import env

T = TypeVar("T")

SCALE = float(os.environ.get("LBD_TEST_TIMEOUT_SCALE", "1") or 1)
_original = env.eventually


def _stretched(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.1) -> T:
    return _original(check, timeout * SCALE, interval)


if SCALE != 1:
    # Before the test modules import it (a `-p` plugin loads before collection), so their
    # own `from lbd.testing.env import eventually` binds the stretched one too.
    env.eventually = _stretched
