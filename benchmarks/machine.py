"""What machine and which code a benchmark ran on, recorded beside the numbers.

A timing without its kernel, CPU, tool versions and commit cannot be compared with
another; the load average is kept too, because this kind of VM is often shared with a
test run and two busy cores change every number.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lbd.testing import netns

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        # --no-optional-locks: a status must never refresh (write) the index of the
        # checkout being measured.
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_fingerprint() -> str:
    """A hash of the Python sources measured (lbd, backends, benchmarks), so two runs on
    the same commit with different uncommitted work can still be told apart."""
    digest = hashlib.sha256()
    for top in ("lbd", "backends", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _tool_version(ns: str, tool: str) -> str:
    if shutil.which(tool) is None:
        return "not installed"
    proc = netns.run(ns, [tool, "-V"], check=False, timeout=10)
    return (proc.stdout or proc.stderr).strip() or f"exit {proc.returncode}"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(ns: str) -> dict[str, Any]:
    """Facts about this host; `ns` is a scratch namespace for running the iptables tools
    (even `-V` is run there: no netfilter tool ever runs in the caller's namespace)."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    status = _git("status", "--porcelain")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "iptables_legacy": _tool_version(ns, "iptables-legacy"),
        "iptables_nft": _tool_version(ns, "iptables-nft"),
        "lbd_commit": commit,
        # Uncommitted work is part of what was measured; say so instead of pretending
        # the commit alone describes the code.
        "lbd_worktree_dirty": None if status is None else bool(status),
        "lbd_code_sha256": code_fingerprint(),
        "load_average_start": load_average(),
    }
