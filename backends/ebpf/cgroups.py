"""A private cgroup v2 subtree, and running processes inside it.

Socket-LB programs act on every process of the cgroup they are attached to (and of its
descendants), whatever network namespace the process is in. In production lbd attaches
them to the root of the host's cgroup2 hierarchy; tests, the demo and benchmarks must not
(that is global to the kernel): they create `CgroupSandbox`, one child cgroup per
simulated node, attach each node's lbd to its child, and start that node's client
processes inside it. Only processes can be placed in a cgroup (not threads of a
process like pytest), so clients there are subprocesses:

    with CgroupSandbox() as sb:
        cg = sb.node("node-1")                      # /run/lbd/cgroupv2/lbdt-xxxx/node-1
        EbpfBackend(cgroup=str(cg), ...).sync(...)
        sb.run(cg, pod_netns, [sys.executable, "-m", "lbd.testing.traffic", ...])

A child process is moved into the cgroup between fork and exec (`preexec_fn` writes its
pid to `cgroup.procs`), so the very first connect() is already balanced; `ip netns exec`
then execs in place and stays in the cgroup.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from backends.ebpf.loader import CGROUP2_DEFAULT, ensure_cgroup2


def enter_cgroup(cgroup: str | Path) -> Callable[[], None]:
    """A preexec_fn that moves the child into `cgroup` before it execs."""
    procs = os.fsencode(Path(cgroup) / "cgroup.procs")

    def preexec() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    return preexec


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


class CgroupSandbox:
    """`<root>/<name>/` with a child per node; removed (processes killed) on close."""

    def __init__(self, name: str | None = None, root: str | Path = CGROUP2_DEFAULT) -> None:
        self.root = Path(root)
        self.name = name or f"lbdt-{secrets.token_hex(3)}"
        self.path = self.root / self.name
        self._children: list[Path] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> CgroupSandbox:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> CgroupSandbox:
        if self.root == CGROUP2_DEFAULT:
            ensure_cgroup2(self.root)
        self.path.mkdir()
        return self

    def node(self, name: str) -> Path:
        """The child cgroup for one node (created on first use)."""
        child = self.path / name
        if not child.exists():
            child.mkdir()
            self._children.append(child)
        return child

    def popen(
        self, cgroup: str | Path, netns: str | None, argv: Sequence[str], **kwargs
    ) -> subprocess.Popen:
        """Start `argv` inside `cgroup` (and network namespace `netns`)."""
        proc = subprocess.Popen(netns_argv(netns, argv), preexec_fn=enter_cgroup(cgroup), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        cgroup: str | Path,
        netns: str | None,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = False,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        """Run `argv` to completion inside `cgroup` (output captured as text by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            netns_argv(netns, argv),
            preexec_fn=enter_cgroup(cgroup),
            timeout=timeout,
            check=check,
            **kwargs,
        )

    @staticmethod
    def pids(cgroup: str | Path) -> list[int]:
        try:
            text = (Path(cgroup) / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def close(self) -> None:
        """Kill whatever still runs in the subtree and remove it. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._procs.clear()
        if not self.path.exists():
            return
        children = [p for p in self.path.iterdir() if p.is_dir()]
        for cg in [*children, self.path]:
            kill = cg / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            else:
                for pid in self.pids(cg):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        for cg in [*children, self.path]:
            while True:
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # EBUSY until the killed processes are reaped
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self._children.clear()
