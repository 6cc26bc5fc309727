"""What every eBPF kernel test module shares: the marks that skip it, with the host
check's own reason, where this kernel cannot run lbd's eBPF datapath."""

from __future__ import annotations

import pytest

from backends.base import HostUnsupported
from backends.ebpf import check_host


def _unsupported() -> str:
    try:
        check_host()
    except HostUnsupported as e:
        return str(e)
    return ""


UNSUPPORTED = _unsupported()
EBPF_KERNEL_MARKS = [
    pytest.mark.kernel,
    pytest.mark.skipif(bool(UNSUPPORTED), reason=UNSUPPORTED or "ebpf supported"),
]
