"""Tests that need a kernel with IPVS (run inside the VM by scripts/vm-test).

They skip, with the registry's own sentence, wherever IPVS mode cannot run (the host).
"""

from __future__ import annotations

import pytest

from backends.base import HostUnsupported
from backends.registry import check_host


@pytest.fixture(scope="session", autouse=True)
def _needs_ipvs() -> None:
    try:
        check_host("ipvs")
    except HostUnsupported as err:
        pytest.skip(str(err))
