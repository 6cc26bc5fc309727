"""The few bpf(2) commands BCC's Python API does not offer, issued directly.

Owns pinning and opening bpffs objects, BPF links (create, atomically replace the program
of, detach) and reading object info. Links are how lbd attaches its cgroup programs: a
link pinned in bpffs survives the daemon (socket LB keeps working while it restarts), its
program can be swapped in one step (BPF_LINK_UPDATE) by the next daemon, and it coexists
with other programs attached to the same cgroup (multi-attach semantics).
"""

from __future__ import annotations

import ctypes as ct
import os
import platform
import struct
from dataclasses import dataclass

_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}.get(platform.machine())

BPF_MAP_CREATE = 0
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

BPF_MAP_TYPE_ARRAY = 2
BPF_LINK_TYPE_CGROUP = 3

_ATTR_SIZE = 128

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


class BpfError(OSError):
    """A bpf(2) command failed; errno and the command are in the message."""


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    if _NR_BPF is None:
        raise BpfError(0, f"bpf(2) syscall number unknown on {platform.machine()}")
    buf = ct.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(ct.c_long(_NR_BPF), ct.c_int(cmd), buf, ct.c_uint(_ATTR_SIZE))
    if ret < 0:
        err = ct.get_errno()
        raise BpfError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return int(ret), buf.raw


def obj_pin(fd: int, path: str) -> None:
    """Pin a map, program or link at `path` (inside a bpffs mount)."""
    p = ct.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, struct.pack("=QI", ct.addressof(p), fd))


def obj_get(path: str) -> int:
    """Open a pinned object; the caller closes the returned fd."""
    p = ct.create_string_buffer(os.fsencode(path))
    fd, _ = _bpf(BPF_OBJ_GET, struct.pack("=QI", ct.addressof(p), 0))
    return fd


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """Attach `prog_fd` to `target_fd` (e.g. a cgroup directory fd) through a new link."""
    fd, _ = _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, target_fd, attach_type, flags))
    return fd


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Replace the program of a link in one step (no moment without a program)."""
    _bpf(BPF_LINK_UPDATE, struct.pack("=IIII", link_fd, new_prog_fd, 0, 0))


def link_detach(link_fd: int) -> None:
    """Detach a link's program now, even if the link is still pinned or open elsewhere."""
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to `target_fd` for `attach_type` (effective or not)."""
    ids = (ct.c_uint32 * 64)()
    attr = struct.pack("=IIIIQI", target_fd, attach_type, 0, 0, ct.addressof(ids), 64)
    _, out = _bpf(BPF_PROG_QUERY, attr)
    (count,) = struct.unpack_from("=I", out, 24)
    return list(ids[: min(count, 64)])


def _info(fd: int, size: int = 256) -> bytes:
    info = ct.create_string_buffer(size)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, size, ct.addressof(info)))
    return info.raw


@dataclass(frozen=True, slots=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = _info(fd)
    kind, map_id, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(kind, map_id, key_size, value_size, max_entries, flags, name)


@dataclass(frozen=True, slots=True)
class ProgInfo:
    type: int
    id: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd)
    kind, prog_id = struct.unpack_from("=II", raw, 0)
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(kind, prog_id, name)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    cgroup_id: int  # cgroup links only (0 once the cgroup is gone or the link detached)


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd)
    kind, link_id, prog_id = struct.unpack_from("=III", raw, 0)
    (cgroup_id,) = struct.unpack_from("=Q", raw, 16)
    return LinkInfo(kind, link_id, prog_id, cgroup_id if kind == BPF_LINK_TYPE_CGROUP else 0)


def probe() -> None:
    """Raise BpfError unless this process may use bpf(2) (creates and drops a tiny map)."""
    fd, _ = _bpf(BPF_MAP_CREATE, struct.pack("=IIIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0))
    os.close(fd)


BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4


class PinnedMap:
    """A pinned map opened by path, read and written through bpf(2) with ctypes types.

    Lets `lbd status`/`lbd cleanup` read lbd's maps without compiling anything (BCC's
    tables need a compiled module). Keys and values are ctypes instances.
    """

    def __init__(self, path: str, key_type: type, value_type: type) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.fd = obj_get(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _elem(self, cmd: int, key: ct._CData, value: ct._CData | None, flags: int = 0) -> None:
        vptr = ct.addressof(value) if value is not None else 0
        _bpf(cmd, struct.pack("=IIQQQ", self.fd, 0, ct.addressof(key), vptr, flags))

    def __getitem__(self, key: ct._CData) -> ct._CData:
        value = self.value_type()
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, value)
        except BpfError as e:
            raise KeyError(key) from e
        return value

    def __setitem__(self, key: ct._CData, value: ct._CData) -> None:
        self._elem(BPF_MAP_UPDATE_ELEM, key, value)

    def __delitem__(self, key: ct._CData) -> None:
        try:
            self._elem(BPF_MAP_DELETE_ELEM, key, None)
        except BpfError as e:
            raise KeyError(key) from e

    def __iter__(self):  # noqa: ANN204 - an iterator of key_type instances
        prev: ct._CData | None = None
        while True:
            nxt = self.key_type()
            kptr = ct.addressof(prev) if prev is not None else 0
            try:
                _bpf(
                    BPF_MAP_GET_NEXT_KEY, struct.pack("=IIQQ", self.fd, 0, kptr, ct.addressof(nxt))
                )
            except BpfError as e:
                if e.errno == 2:  # ENOENT: the end
                    return
                raise
            yield nxt
            prev = nxt

    def keys(self) -> list[ct._CData]:
        return list(self)

    def items(self) -> list[tuple[ct._CData, ct._CData]]:
        out = []
        for k in self:
            try:
                out.append((k, self[k]))
            except KeyError:
                continue  # deleted meanwhile
        return out
