"""Session-wide plumbing shared by every test folder.

Owns two things only: skipping tests marked ``kernel`` where they cannot run
(not root, no iproute2), and sweeping network namespaces that *earlier*,
crashed runs left behind. Namespaces of a live session (another pytest or a
demo running right now) are claimed by their process and are left alone.
"""

from __future__ import annotations

import os
import shutil

import pytest

from lbd.testing import netns


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


require_root = pytest.mark.skipif(
    not can_use_netns(), reason="needs root and iproute2 to build network namespaces"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if can_use_netns():
        return
    skip = pytest.mark.skip(reason="kernel test: needs root and iproute2")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftover_namespaces() -> None:
    if can_use_netns():
        netns.sweep(netns.DEFAULT_PREFIX)


# Declared here, not in tests/reliability, so `pytest -m reliability --soak` works from
# the repository root.
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability")
    group.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the churn soak for minutes instead of the CI-sized one (tests/reliability)",
    )
    group.addoption(
        "--soak-seconds",
        type=float,
        default=None,
        help="run the churn soak for this many seconds (overrides --soak)",
    )
    group.addoption(
        "--soak-rate",
        type=float,
        default=None,
        help="Service/EndpointSlice changes per second in the churn soak (default 50; "
        "the IPVS VM, 20-50x slower under emulation, asks for fewer)",
    )
