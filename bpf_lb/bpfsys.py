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


# --- batched and raw element access -----------------------------------------------------------
# Whole runs of map writes in one bpf(2) call each (BPF_MAP_*_BATCH, kernel 5.6+, hash
# maps), with keys and values as packed bytes: a full sync of 10k services writes a quarter
# of a million entries, which one syscall (and one ctypes object) per entry cannot do in a
# second. Maps or kernels without batch support fall back to one call per entry.

BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
_BATCH_ATTR = struct.Struct("=QQQQIIQQ")  # in_batch out_batch keys values count map_fd ...
_ENOENT, _E2BIG, _ENOSPC, _EINVAL, _EOPNOTSUPP, _ENOTSUPP = 2, 7, 28, 22, 95, 524
# Entries per syscall (the kernel copies them one by one; this only bounds our buffers).
BATCH_ENTRIES = 16384
BATCH_BYTES = 4 << 20


class MapFullError(BpfError):
    """A write needed a new entry in a map that has max_entries of them (E2BIG)."""


def _bpf_count(cmd: int, attr: bytes) -> tuple[int, int]:
    """(errno or 0, the batch count the kernel wrote back)."""
    if _NR_BPF is None:
        raise BpfError(0, f"bpf(2) syscall number unknown on {platform.machine()}")
    buf = ct.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _libc.syscall(ct.c_long(_NR_BPF), ct.c_int(cmd), buf, ct.c_uint(_ATTR_SIZE))
    err = ct.get_errno() if ret < 0 else 0
    (count,) = struct.unpack_from("=I", buf.raw, 32)
    return err, count


def _batch_unsupported(err: int) -> bool:
    return err in (_EINVAL, _EOPNOTSUPP, _ENOTSUPP)


def _raise(err: int, what: str) -> None:
    cls = MapFullError if err == _E2BIG else BpfError
    raise cls(err, f"{what}: {os.strerror(err)}")


def map_update(fd: int, keys: bytes, values: bytes, key_size: int, value_size: int) -> int:
    """Write len(keys)//key_size entries (BPF_ANY); returns the syscalls made."""
    n = len(keys) // key_size
    if n == 0:
        return 0
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    kp, vp = ct.addressof(kbuf), ct.addressof(vbuf)
    per = max(1, min(BATCH_ENTRIES, BATCH_BYTES // max(value_size, 1)))
    done = calls = 0
    while done < n:
        count = min(per, n - done)
        attr = _BATCH_ATTR.pack(0, 0, kp + done * key_size, vp + done * value_size, count, fd, 0, 0)
        err, written = _bpf_count(BPF_MAP_UPDATE_BATCH, attr)
        calls += 1
        if err == 0:
            done += count
            continue
        if _batch_unsupported(err) and written == 0:
            return calls + _update_each(fd, kp, vp, key_size, value_size, done, n)
        _raise(err, f"map update (entry {done + written} of {n})")
    return calls


def _update_each(fd: int, kp: int, vp: int, ks: int, vs: int, start: int, n: int) -> int:
    for i in range(start, n):
        attr = struct.pack("=IIQQQ", fd, 0, kp + i * ks, vp + i * vs, 0)
        err, _ = _bpf_count(BPF_MAP_UPDATE_ELEM, attr)
        if err:
            _raise(err, f"map update (entry {i} of {n})")
    return n - start


def map_delete(fd: int, keys: bytes, key_size: int) -> int:
    """Delete len(keys)//key_size entries; keys already gone are skipped. Returns the
    number of entries that were there."""
    n = len(keys) // key_size
    if n == 0:
        return 0
    kbuf = ct.create_string_buffer(keys, len(keys))
    kp = ct.addressof(kbuf)
    done = deleted = 0
    batch = True
    while done < n:
        if not batch:
            attr = struct.pack("=IIQQQ", fd, 0, kp + done * key_size, 0, 0)
            err, _ = _bpf_count(BPF_MAP_DELETE_ELEM, attr)
            if err not in (0, _ENOENT):
                _raise(err, "map delete")
            deleted += err == 0
            done += 1
            continue
        count = min(BATCH_ENTRIES, n - done)
        attr = _BATCH_ATTR.pack(0, 0, kp + done * key_size, 0, count, fd, 0, 0)
        err, gone = _bpf_count(BPF_MAP_DELETE_BATCH, attr)
        if err == 0:
            done += count
            deleted += count
        elif err == _ENOENT:
            # the batch stops at the first missing key: skip it, go on after it
            done += gone + 1
            deleted += gone
        elif _batch_unsupported(err) and gone == 0:
            batch = False
        else:
            _raise(err, "map delete")
    return deleted


def map_dump(fd: int, key_size: int, value_size: int) -> tuple[bytes, bytes]:
    """Every entry of a map as (keys, values), packed back to back."""
    per = max(8, min(BATCH_ENTRIES // 4, BATCH_BYTES // max(value_size, 1)))
    keys, values = [], []
    token_in = ct.create_string_buffer(max(key_size, 8))
    token_out = ct.create_string_buffer(max(key_size, 8))
    first = True
    while True:
        kbuf = ct.create_string_buffer(per * key_size)
        vbuf = ct.create_string_buffer(per * value_size)
        attr = _BATCH_ATTR.pack(
            0 if first else ct.addressof(token_in),
            ct.addressof(token_out),
            ct.addressof(kbuf),
            ct.addressof(vbuf),
            per,
            fd,
            0,
            0,
        )
        err, got = _bpf_count(BPF_MAP_LOOKUP_BATCH, attr)
        if err not in (0, _ENOENT):
            if err == _ENOSPC and got == 0:  # one bucket holds more than `per`
                per *= 2
                continue
            if _batch_unsupported(err) and first:
                return _dump_each(fd, key_size, value_size)
            _raise(err, "map lookup batch")
        keys.append(kbuf.raw[: got * key_size])
        values.append(vbuf.raw[: got * value_size])
        if err == _ENOENT:
            break
        ct.memmove(token_in, token_out, len(token_out))
        first = False
    return b"".join(keys), b"".join(values)


def _dump_each(fd: int, key_size: int, value_size: int) -> tuple[bytes, bytes]:
    keys, values = [], []
    prev = None
    nxt = ct.create_string_buffer(key_size)
    val = ct.create_string_buffer(value_size)
    while True:
        kptr = ct.addressof(prev) if prev is not None else 0
        err, _ = _bpf_count(
            BPF_MAP_GET_NEXT_KEY, struct.pack("=IIQQ", fd, 0, kptr, ct.addressof(nxt))
        )
        if err == _ENOENT:
            break
        if err:
            _raise(err, "map get next key")
        err, _ = _bpf_count(
            BPF_MAP_LOOKUP_ELEM,
            struct.pack("=IIQQQ", fd, 0, ct.addressof(nxt), ct.addressof(val), 0),
        )
        if err == 0:
            keys.append(nxt.raw)
            values.append(val.raw)
        elif err != _ENOENT:  # deleted meanwhile: skip
            _raise(err, "map lookup")
        prev = ct.create_string_buffer(nxt.raw, key_size)
    return b"".join(keys), b"".join(values)
