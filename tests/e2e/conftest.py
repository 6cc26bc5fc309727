"""The e2e fixture: one LbdEnv per proxy mode, shared by a module's scenarios.

Scenarios are written once and run for every mode this host can run; a mode the host
cannot run is reported as skipped with the daemon's own one-sentence reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from backends.base import HostUnsupported
from backends.registry import check_host
from lbd.testing.env import LbdEnv

MODES = ["iptables", "ebpf", "ipvs"]


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
