"""The reliability suite's plumbing: markers, the soak options and the per-mode fixture.

Every test here runs `lbd run` processes in a netns mini-cluster (LbdEnv) for each proxy
mode the host can run; a mode it cannot run is reported as skipped with the daemon's own
one-sentence reason, as in tests/e2e. The churn soak is CI-sized (about a minute) unless
`--soak` (10 minutes) or `--soak-seconds N` asks for a longer run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from reliability_support import publish_stable

from backends.base import HostUnsupported
from backends.registry import check_host
from lbd.testing.env import LbdEnv

ALL_MODES = ["iptables", "ebpf", "ipvs"]
# LBD_E2E_MODES=ipvs (comma-separated) limits the modes, as for tests/e2e: the IPVS VM runs
# the ipvs ones, the others have run on the host.
MODES = [m for m in os.environ.get("LBD_E2E_MODES", ",".join(ALL_MODES)).split(",") if m]

CI_SOAK_SECONDS = 60.0
DEFAULT_SOAK_RATE = 50.0
LONG_SOAK_SECONDS = 600.0
# What a soak test needs beyond its churn phase (set-up, convergence, checks).
SOAK_OVERHEAD_SECONDS = 240.0


def pytest_configure(config: pytest.Config) -> None:
    # `reliability` and `kernel` are declared in pyproject.toml too; declaring them here
    # keeps `--strict-markers` happy when this folder is run from another rootdir.
    config.addinivalue_line("markers", "reliability: fault, restart and churn tests")
    config.addinivalue_line("markers", "kernel: needs root and network namespaces")
    config.addinivalue_line("markers", "soak: a churn soak whose length --soak sets")


def soak_seconds(config: pytest.Config) -> float:
    # getoption's default covers runs where this conftest was not an initial one (e.g.
    # `pytest -m reliability` from the repository root): the options then do not exist.
    given = config.getoption("soak_seconds", default=None)
    if given is not None:
        return float(given)
    return LONG_SOAK_SECONDS if config.getoption("soak", default=False) else CI_SOAK_SECONDS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The project-wide per-test timeout (pyproject) is shorter than a long soak: give
    # soak tests their own, derived from the requested duration.
    limit = soak_seconds(config) + SOAK_OVERHEAD_SECONDS
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(limit))


def pytest_report_header(config: pytest.Config) -> str:
    return f"reliability: churn soak {soak_seconds(config):.0f} s"


def skip_unless_supported(mode: str) -> None:
    """Skip (with the daemon's own reason) when this host cannot run `mode`."""
    try:
        check_host(mode)
    except HostUnsupported as err:
        pytest.skip(str(err))


@pytest.fixture(params=MODES, scope="module")
def mode(request: pytest.FixtureRequest) -> str:
    skip_unless_supported(request.param)
    return request.param


@pytest.fixture(scope="module")
def env(mode: str, request: pytest.FixtureRequest) -> Iterator[LbdEnv]:
    """A 2-node mini-cluster with one daemon per node and the stable service programmed."""
    with LbdEnv(mode) as e:
        publish_stable(e)
        failed_before = request.session.testsfailed
        yield e
        # The daemons' last log lines, when something in the module failed.
        if request.session.testsfailed > failed_before:
            for node in e.cluster.nodes:
                print(f"--- lbd on {node.name} ---\n{e.logs(node.name, 40)}")


@pytest.fixture
def soak_rate(request: pytest.FixtureRequest) -> float:
    """Changes per second the churn soak makes (issue 7: 50; --soak-rate overrides)."""
    given = request.config.getoption("soak_rate", default=None)
    return float(given) if given is not None else DEFAULT_SOAK_RATE


@pytest.fixture
def soak_duration(request: pytest.FixtureRequest) -> float:
    """How long the churn soak churns (seconds): CI-sized unless --soak/--soak-seconds."""
    return soak_seconds(request.config)
