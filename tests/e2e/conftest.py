"""The e2e fixture: one LbdEnv per proxy mode, shared by a module's scenarios.

Scenarios are written once and run for every mode this host can run; a mode the host
cannot run is reported as skipped with the daemon's own one-sentence reason.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import HostUnsupported
from backends.registry import check_host
from lbd.testing.env import LbdEnv

ALL_MODES = ["iptables", "ebpf", "ipvs"]
# LBD_E2E_MODES=ipvs (comma-separated) limits the runs, e.g. inside the IPVS VM, where the
# other modes have already run on the host.
MODES = [m for m in os.environ.get("LBD_E2E_MODES", ",".join(ALL_MODES)).split(",") if m]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the e2e runs of modes outside LBD_E2E_MODES (whichever module's `env`
    fixture parameterises them)."""
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        mode = callspec.params.get("env") if callspec is not None else None
        inside = here in item.path.parents
        (drop if inside and mode is not None and mode not in MODES else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="module", params=MODES)
def env(request: pytest.FixtureRequest) -> Iterator[LbdEnv]:
    mode = request.param
    try:
        check_host(mode)
    except HostUnsupported as err:
        pytest.skip(str(err))
    with LbdEnv(mode) as e:
        yield e
        # Print the daemons' last log lines when something in the module failed.
        if request.session.testsfailed:
            for node in e.cluster.nodes:
                print(f"--- lbd on {node.name} ---\n{e.logs(node.name, 40)}")


_counter = itertools.count(1)


@pytest.fixture
def uid() -> int:
    """A number unique in the session, for service names and cluster IPs."""
    return next(_counter)
