"""Network namespace primitives for the test harness.

Owns creating, configuring and deleting named network namespaces (the ones
`ip netns` knows), running commands inside them, switching the *calling
thread* into one for a moment (so in-process servers and clients can own
sockets that live there), and sweeping away namespaces that a crashed run
left behind. Nothing here ever configures the namespace the process started
in: every change is made inside a named namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")
# Who owns a cluster prefix: "<pid> <process start time>". A sweep leaves a
# prefix alone while that process is alive, so concurrent test sessions on one
# machine do not delete each other's namespaces.
OWNER_DIR = Path("/run/lbd-testing")
DEFAULT_PREFIX = "lbdt"

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int

# setns() moves only the calling thread, so other threads never observe the
# switch. The lock still keeps at most one of our threads away from its home
# namespace at a time, which bounds the damage of the (never expected) case of
# a failed switch back, and keeps the socket-creation path trivially auditable.
# Re-entrant because a signal handler (cluster clean-up on SIGTERM) may run on
# a thread that is inside `entered` already.
_switch_lock = threading.RLock()


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the tool's stderr."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    """Names of all named namespaces (those under /run/netns)."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def _run(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def create(name: str) -> None:
    """Create a named network namespace (fails if it already exists)."""
    _run(["ip", "netns", "add", name])


def create_many(names: Iterable[str]) -> None:
    """Create several namespaces with a single `ip` process."""
    names = list(names)
    if names:
        _run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names))


def delete(name: str) -> None:
    """Delete a namespace; a missing one is not an error (clean-up is idempotent)."""
    if not exists(name):
        return
    proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    if proc.returncode != 0 and exists(name):
        raise NetnsError(f"ip netns del {name} failed: {proc.stderr.strip()}")


def ip_batch(name: str | None, commands: Iterable[str]) -> None:
    """Run `ip` commands (one per line, without the leading `ip`) in namespace `name`.

    One process per namespace keeps building a cluster fast; the first failing
    line aborts the batch and raises with the line `ip` complained about.
    """
    text = "".join(f"{c}\n" for c in commands)
    argv = ["ip"] + (["-n", name] if name else []) + ["-batch", "-"]
    _run(argv, input=text)


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name`."""
    return ["ip", "netns", "exec", name, *argv]


def run(
    name: str, argv: Sequence[str], *, check: bool = True, timeout: float | None = 30.0, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command to completion inside a namespace (output captured as text by default)."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(exec_argv(name, argv), check=check, timeout=timeout, **kwargs)


def popen(name: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start a long-running command inside a namespace."""
    return subprocess.Popen(exec_argv(name, argv), **kwargs)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name`.

    Only the calling thread moves, and it always moves back, also when the
    body raises. Keep the body short and free of blocking calls: other
    callers wait on the switch lock. `None` means "stay where you are".
    """
    if name is None:
        yield
        return
    with _switch_lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                try:
                    _setns(home)
                except OSError as exc:  # pragma: no cover - would strand the thread
                    raise NetnsError(f"could not return from netns {name}: {exc}") from exc
        finally:
            os.close(home)


def socket_in(
    name: str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """Create a socket that lives in namespace `name`.

    A socket keeps the namespace it was created in for its whole life, so
    bind/connect/send on it act there no matter which thread uses it later.
    """
    with entered(name):
        return socket.socket(family, type, proto)


def set_sysctls(name: str, values: Mapping[str, str | int]) -> None:
    """Write sysctls (dotted keys) inside a namespace.

    /proc/sys/net resolves to the network namespace of the thread that opens
    the file, so writing from inside `entered` changes only that namespace.
    """
    with entered(name):
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w") as f:
                f.write(f"{value}\n")


def get_sysctl(name: str, key: str) -> str:
    with entered(name), open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name`."""
    proc = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [int(p) for p in proc.stdout.split()]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def kill_pids(victims: Iterable[int], *, grace: float = 2.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    me = os.getpid()
    victims = [p for p in set(victims) if p != me]
    for pid in victims:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while victims and time.monotonic() < deadline:
        victims = [p for p in victims if _alive(p)]
        if victims:
            time.sleep(0.02)
    for pid in victims:
        _signal(pid, signal.SIGKILL)


def kill_processes_in(names: Iterable[str], *, grace: float = 2.0) -> None:
    """Stop every process living in any of the namespaces."""
    victims: list[int] = []
    for name in names:
        victims.extend(pids(name))
    kill_pids(victims, grace=grace)


def _start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    return fields[19]  # field 22 of stat: start time in clock ticks since boot


def claim(prefix: str) -> bool:
    """Record that this process owns namespaces named `prefix-*`.

    Exclusive: returns False if another live process holds the prefix, so two
    sessions can never build (and later delete) the same namespaces. A record
    left by a dead process is taken over.
    """
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record = OWNER_DIR / prefix
    text = f"{pid} {_start_time(pid)}\n"
    try:
        with open(record, "x") as f:
            f.write(text)
        return True
    except FileExistsError:
        if owner_alive(prefix):
            return False
    record.write_text(text)
    return True


def release(prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (OWNER_DIR / prefix).unlink()


def owner_alive(prefix: str) -> bool:
    """Is the process that claimed `prefix` still running (and still the same process)?"""
    try:
        pid_s, start = (OWNER_DIR / prefix).read_text().split()
        pid = int(pid_s)
    except (FileNotFoundError, ValueError):
        return False
    return _alive(pid) and _start_time(pid) == start


def sweep(prefix: str = DEFAULT_PREFIX, *, include_live: bool = False) -> list[str]:
    """Delete namespaces whose names start with `prefix`, killing their processes first.

    Namespaces named `<cluster>-...` whose cluster prefix is still claimed by a
    live process are kept unless `include_live` is set, so one test session
    never sweeps away another's running cluster. Returns the deleted names.
    """
    doomed = []
    for name in list_netns():
        if not name.startswith(prefix):
            continue
        cluster = name.split("-", 1)[0]
        if not include_live and owner_alive(cluster):
            continue
        doomed.append(name)
    kill_processes_in(doomed)
    for name in doomed:
        with contextlib.suppress(NetnsError):
            delete(name)
    # Owner records whose namespaces are all gone are stale too.
    if OWNER_DIR.is_dir():
        live = {n.split("-", 1)[0] for n in list_netns()}
        for record in OWNER_DIR.iterdir():
            stale = record.name.startswith(prefix) and record.name not in live
            if stale and (include_live or not owner_alive(record.name)):
                with contextlib.suppress(FileNotFoundError):
                    record.unlink()
    return doomed


__all__ = [
    "DEFAULT_PREFIX",
    "NetnsError",
    "claim",
    "create",
    "create_many",
    "delete",
    "entered",
    "exec_argv",
    "exists",
    "get_sysctl",
    "ip_batch",
    "kill_pids",
    "kill_processes_in",
    "list_netns",
    "netns_path",
    "owner_alive",
    "pids",
    "popen",
    "release",
    "run",
    "set_sysctls",
    "socket_in",
    "sweep",
]


_scratch_lock = threading.Lock()
_scratch_prefix: str | None = None


@contextlib.contextmanager
def scratch(tag: str = "x") -> Iterator[str]:
    """A throw-away namespace (loopback up) for one test, deleted afterwards.

    Its name carries a prefix this process claims, so `sweep` in a concurrent session
    leaves it alone while we live and removes it if we crash.
    """
    global _scratch_prefix
    with _scratch_lock:
        if _scratch_prefix is None:
            while True:
                candidate = f"{DEFAULT_PREFIX}{secrets.token_hex(2)}"
                if claim(candidate):
                    _scratch_prefix = candidate
                    atexit.register(release, candidate)
                    break
    name = f"{_scratch_prefix}-{tag}{secrets.token_hex(3)}"
    create(name)
    try:
        ip_batch(name, ["link set lo up"])
        yield name
    finally:
        kill_processes_in([name])
        delete(name)
