"""The thin kernel layer of the eBPF mode: compile, pin, attach, read and write maps.

Owns one lbd instance's kernel objects, all named under one bpffs directory:

    <pin_dir>/lbd_*          the maps (BPF_TABLE_PINNED: BCC creates and pins them on the
                             first load, and re-opens the pinned ones on every later load,
                             so a restarted daemon re-adopts their contents)
    <pin_dir>/links/<prog>   one BPF link per socket-LB program, attached to the cgroup

tc programs are attached with pyroute2 as cls_bpf filters (direct-action, lbd's own
priority) on clsact qdiscs of the given devices inside the given network namespace.
Replacing a program never leaves a gap: links get BPF_LINK_UPDATE, tc filters "replace".
Nothing here decides what the maps should hold: see plan.py.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import fnmatch
import itertools
import operator
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from backends.ebpf.plan import (
    AFF_MATCH,
    BACKENDS,
    CONFIG,
    MAGLEV,
    REV_NAT,
    SERVICES,
    SRC_RANGE,
    SVC_NAMES,
    MapView,
    Op,
    Run,
    runs_of,
)
from bpf_lb import bpfsys, maps
from bpf_lb.maglev import DEFAULT_TABLE_SIZE, validate_table_size

log = structlog.get_logger("lbd.backends.ebpf.loader")
T = TypeVar("T")

BPFFS_ROOT = Path("/sys/fs/bpf")
CGROUP2_DEFAULT = Path("/run/lbd/cgroupv2")
LINKS_DIR = "links"

# BPF attach types (uapi bpf_attach_type), by socket-LB program.
SOCK_PROGRAMS: tuple[tuple[str, int], ...] = (
    ("lbd_sock_connect4", 10),  # BPF_CGROUP_INET4_CONNECT
    ("lbd_sock_connect6", 11),  # BPF_CGROUP_INET6_CONNECT
    ("lbd_sock_sendmsg4", 14),  # BPF_CGROUP_UDP4_SENDMSG
    ("lbd_sock_sendmsg6", 15),  # BPF_CGROUP_UDP6_SENDMSG
    ("lbd_sock_recvmsg4", 19),  # BPF_CGROUP_UDP4_RECVMSG
    ("lbd_sock_recvmsg6", 20),  # BPF_CGROUP_UDP6_RECVMSG
    ("lbd_sock_getpeername4", 29),  # BPF_CGROUP_INET4_GETPEERNAME
    ("lbd_sock_getpeername6", 30),  # BPF_CGROUP_INET6_GETPEERNAME
)
TC_FROM_NETDEV = "lbd_tc_from_netdev"
TC_FROM_POD = "lbd_tc_from_pod"
TC_EGRESS = "lbd_tc_egress"
TC_PRIO = 0x4C42  # "LB": lbd's filters are recognised by priority and name
TC_HANDLE = 1
TC_INGRESS = "ffff:fff2"
TC_EGRESS_PARENT = "ffff:fff3"

# Plans this big (a full sync) are written by _apply_pipelined, in chunks of this many
# entries (one batched syscall each); smaller ones (a partial sync) need no thread.
PIPELINE_MIN_OPS = 8192
PIPELINE_CHUNK = bpfsys.BATCH_ENTRIES
_ONE_BY_ONE = (SRC_RANGE, CONFIG)  # written entry by entry through BCC's tables

# Value packers that need nothing but the value (maglev tables need the table size).
_PACKED_BY: dict[str, Callable[[Any], bytes]] = {
    REV_NAT: maps.pack_rev_nat,
    SVC_NAMES: maps.pack_svc_name,
}
_VALUE = operator.itemgetter(2)  # an Op's

_MAP_TYPES = {"hash": 1, "array": 2, "lru_hash": 9, "lpm_trie": 11}
_FLAGS_COMPARED = maps.BPF_F_NO_PREALLOC  # a pin created with other flags is recreated
SO_NETNS_COOKIE = 71


class LoaderError(RuntimeError):
    """The datapath could not be loaded or attached; the message says what and where."""


@dataclass(frozen=True, slots=True)
class MapSizes:
    """max_entries of lbd's maps (memory: the LRU maps are preallocated; the others
    allocate per entry, so their limits cost nothing until used).

    The defaults hold 10k service ports with 10 endpoints each twice over: the services
    map takes 1 + endpoints entries per frontend (cluster IP, each node port address,
    external and load-balancer IP), the backends map one per distinct endpoint.
    """

    services: int = 262144  # frontend heads + backend slots
    backends: int = 262144
    rev_nat: int = 65536
    maglev: int = 4096  # Maglev tables (only with lb_algorithm=maglev)
    affinity: int = 65536
    conntrack: int = 131072
    source_ranges: int = 16384
    sock_rev: int = 65536

    def defines(self) -> dict[str, int]:
        return {
            "LBD_SERVICES_MAX": self.services,
            "LBD_BACKENDS_MAX": self.backends,
            "LBD_REV_NAT_MAX": self.rev_nat,
            "LBD_MAGLEV_MAX": self.maglev,
            "LBD_AFFINITY_MAX": self.affinity,
            "LBD_CT_MAX": self.conntrack,
            "LBD_SRC_RANGE_MAX": self.source_ranges,
            "LBD_SOCK_REV_MAX": self.sock_rev,
        }


def source_text() -> str:
    """lb.h + sock.c + tc.c as one translation unit (BCC rewrites map calls in the main
    file only, so the local #includes are inlined here rather than resolved by clang)."""
    parts = []
    for name in maps.C_SOURCES:
        text = (maps.SOURCE_DIR / name).read_text()
        parts.append(re.sub(r'^#include "[^"]+"[ \t]*$', "", text, flags=re.M))
    return "\n".join(parts)


def is_mountpoint(path: Path, fstype: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == str(path) and fields[2] == fstype:
                    return True
    except OSError:
        pass
    return False


def bpffs_mount_of(path: Path) -> Path | None:
    """The bpffs mount `path` is (or would be) under, if any."""
    best: Path | None = None
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "bpf":
                mnt = Path(fields[1])
                if (path == mnt or mnt in path.parents) and (
                    best is None or len(str(mnt)) > len(str(best))
                ):
                    best = mnt
    return best


def ensure_bpffs(root: Path = BPFFS_ROOT) -> None:
    """Mount bpffs at `root` unless one is mounted there already."""
    if is_mountpoint(root, "bpf"):
        return
    root.mkdir(parents=True, exist_ok=True)
    _mount("bpf", str(root), "bpf")


def ensure_cgroup2(root: Path = CGROUP2_DEFAULT) -> None:
    """Mount the cgroup v2 hierarchy at `root` unless it is mounted there already."""
    if is_mountpoint(root, "cgroup2"):
        return
    root.mkdir(parents=True, exist_ok=True)
    _mount("none", str(root), "cgroup2")


def _mount(source: str, target: str, fstype: str) -> None:
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ct.get_errno()
        raise LoaderError(f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` on a short-lived thread that has entered network namespace `name`
    (/run/netns/<name>); None: in this thread, here.

    Only that thread moves (setns affects the calling thread), so the rest of the daemon
    never changes namespace. Sockets `fn` creates (netlink included) stay bound to `name`.
    pyroute2's NetNS is avoided on purpose: it forks a helper process and stops it with
    SIGTERM, which runs whatever SIGTERM handler the parent installed in the child.
    """
    if name is None:
        return fn()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ct.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ct.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name=f"lbd-netns-{name}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def netns_cookie(name: str | None) -> int:
    """The network namespace cookie (what bpf_get_netns_cookie returns) of namespace
    `name`, or of this thread's namespace for None."""

    def probe() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return int.from_bytes(raw, "little")

    try:
        return in_netns(name, probe)
    except OSError as e:
        raise LoaderError(f"cannot read the netns cookie of {name or 'this namespace'}: {e}") from e


def with_iproute(netns: str | None, fn: Callable[[Any], T]) -> T:
    """`fn(ip)` with a pyroute2 IPRoute talking to namespace `netns`."""
    from pyroute2 import IPRoute

    def run() -> T:
        with IPRoute() as ip:
            return fn(ip)

    return in_netns(netns, run)


class Datapath:
    """One lbd instance's programs and maps in the kernel."""

    def __init__(
        self,
        pin_dir: str | Path,
        *,
        maglev_table_size: int = DEFAULT_TABLE_SIZE,
        sizes: MapSizes | None = None,
        netns: str | None = None,
    ) -> None:
        self.pin_dir = Path(pin_dir)
        self.maglev_table_size = validate_table_size(maglev_table_size)
        self.sizes = sizes or MapSizes()
        self.netns = netns
        self._bpf: Any = None
        self._tables: dict[str, Any] = {}
        self._tc_devices: dict[str, str] = {}  # device -> role ("netdev" | "pod")
        self.cgroup: Path | None = None

    # --- layout -------------------------------------------------------------------------

    def _value_type(self, spec: maps.MapSpec) -> Any:
        if spec.value is None:
            return maps.maglev_val_type(self.maglev_table_size)
        return spec.value

    def _max_entries(self, spec: maps.MapSpec) -> int:
        return self.sizes.defines()[spec.size_macro] if spec.size_macro else 1

    def cflags(self) -> list[str]:
        flags = [f'-DLBD_PIN_DIR="{self.pin_dir}"', f"-DLBD_MAGLEV_M={self.maglev_table_size}"]
        flags += [f"-D{k}={v}" for k, v in self.sizes.defines().items()]
        return flags

    def _drop_incompatible_pins(self) -> list[str]:
        """Unpin maps whose layout or size no longer matches (another lbd version, another
        Maglev table size): BCC would re-open them as they are. The next sync refills
        them; the datapath keeps the old maps until the new programs replace it."""
        dropped = []
        for spec in maps.MAP_SPECS.values():
            path = self.pin_dir / spec.name
            if not path.exists():
                continue
            try:
                fd = bpfsys.obj_get(str(path))
            except OSError:
                path.unlink(missing_ok=True)
                dropped.append(spec.name)
                continue
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            want = (
                _MAP_TYPES[spec.kind],
                ct.sizeof(spec.key),
                ct.sizeof(self._value_type(spec)),
                self._max_entries(spec),
                spec.flags,
            )
            have = (
                info.type,
                info.key_size,
                info.value_size,
                info.max_entries,
                info.flags & _FLAGS_COMPARED,
            )
            if have != want:
                log.warning("recreating pinned map", map=spec.name, have=have, want=want)
                path.unlink()
                dropped.append(spec.name)
        return dropped

    # --- load ---------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._bpf is not None

    def load(self) -> None:
        """Compile the programs; create + pin the maps, or re-open the pinned ones."""
        from bcc import BPF

        mount = bpffs_mount_of(self.pin_dir)
        if mount is None:
            if self.pin_dir.is_relative_to(BPFFS_ROOT):
                ensure_bpffs(BPFFS_ROOT)
            else:
                raise LoaderError(f"{self.pin_dir} is not inside a bpffs mount")
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        (self.pin_dir / LINKS_DIR).mkdir(exist_ok=True)
        self._drop_incompatible_pins()
        try:
            self._bpf = BPF(text=source_text().encode(), cflags=self.cflags())
        except Exception as e:
            raise LoaderError(f"compiling lbd's eBPF programs failed: {e}") from e
        for spec in maps.MAP_SPECS.values():
            self._tables[spec.name] = self._bpf.get_table(
                spec.name.encode(), keytype=spec.key, leaftype=self._value_type(spec)
            )

    def open_pins(self) -> bool:
        """Open the pinned maps without compiling anything (status, cleanup, inspection).
        False when this instance has no (complete) set of pins."""
        if self.loaded or not self.maps_intact():
            return self.loaded
        self._tables = {
            spec.name: bpfsys.PinnedMap(
                str(self.pin_dir / spec.name), spec.key, self._value_type(spec)
            )
            for spec in maps.MAP_SPECS.values()
        }
        return True

    def _func(self, name: str, prog_type: int, attach_type: int = -1) -> Any:
        return self._bpf.load_func(name.encode(), prog_type, attach_type=attach_type)

    # --- cgroup (socket LB) ---------------------------------------------------------------

    def attach_cgroup(self, cgroup: str | Path) -> None:
        """Attach the socket-LB programs to `cgroup` (a cgroup v2 directory) through pinned
        links, replacing the programs of links a previous instance left."""
        from bcc import BPFProgType

        cgroup = Path(cgroup)
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            cg_id = os.fstat(cg_fd).st_ino
            for name, attach_type in SOCK_PROGRAMS:
                fn = self._func(name, BPFProgType.CGROUP_SOCK_ADDR, attach_type)
                self._attach_link(name, fn.fd, cg_fd, cg_id, attach_type)
        finally:
            os.close(cg_fd)
        self.cgroup = cgroup

    def _attach_link(self, name: str, prog_fd: int, cg_fd: int, cg_id: int, at: int) -> None:
        path = self.pin_dir / LINKS_DIR / name
        if path.exists():
            fd = bpfsys.obj_get(str(path))
            try:
                raw_cg = _link_cgroup_id(fd)
                if raw_cg == cg_id:
                    bpfsys.link_update(fd, prog_fd)
                    return
                # pinned for another cgroup (or a cgroup that was removed): start over
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(fd)
            finally:
                os.close(fd)
            path.unlink()
        fd = bpfsys.link_create(prog_fd, cg_fd, at)
        try:
            bpfsys.obj_pin(fd, str(path))
        finally:
            os.close(fd)

    def detach_cgroup(self) -> None:
        links = self.pin_dir / LINKS_DIR
        if not links.is_dir():
            return
        for path in sorted(links.iterdir()):
            try:
                fd = bpfsys.obj_get(str(path))
            except OSError:
                path.unlink(missing_ok=True)
                continue
            try:
                with contextlib.suppress(OSError):
                    bpfsys.link_detach(fd)
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
        self.cgroup = None

    def cgroup_links_intact(self) -> bool:
        for name, _ in SOCK_PROGRAMS:
            path = self.pin_dir / LINKS_DIR / name
            try:
                fd = bpfsys.obj_get(str(path))
            except OSError:
                return False
            try:
                if bpfsys.link_info(fd).prog_id == 0 or _link_cgroup_id(fd) == 0:
                    return False
            finally:
                os.close(fd)
        return True

    # --- tc -------------------------------------------------------------------------------

    def attach_tc(self, netdevs: Sequence[str], pod_devices: Sequence[str] = ()) -> list[str]:
        """Attach the tc programs: uplinks get ingress + egress, pod-facing devices ingress.
        Entries of `pod_devices` may be glob patterns ("vp*", "lxc*"). Returns the devices
        newly attached."""
        from bcc import BPF

        ingress = self._func(TC_FROM_NETDEV, BPF.SCHED_CLS)
        egress = self._func(TC_EGRESS, BPF.SCHED_CLS)
        from_pod = self._func(TC_FROM_POD, BPF.SCHED_CLS)
        added: list[str] = []

        def attach(ip: Any) -> None:
            names = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ip.get_links()}
            wanted: dict[str, str] = {}
            for dev in netdevs:
                if dev not in names:
                    raise LoaderError(f"device {dev} not found in netns {self.netns or '(own)'}")
                wanted[dev] = "netdev"
            for pattern in pod_devices:
                for dev in names:
                    if fnmatch.fnmatchcase(dev, pattern) and dev not in wanted:
                        wanted[dev] = "pod"
            for dev, role in sorted(wanted.items()):
                idx = names[dev]
                _ensure_clsact(ip, idx)
                if role == "netdev":
                    _replace_filter(ip, idx, TC_INGRESS, ingress)
                    _replace_filter(ip, idx, TC_EGRESS_PARENT, egress)
                else:
                    _replace_filter(ip, idx, TC_INGRESS, from_pod)
                if dev not in self._tc_devices:
                    added.append(dev)
                self._tc_devices[dev] = role
            # devices that went away (a deleted pod's veth)
            for dev in [d for d in self._tc_devices if d not in names]:
                del self._tc_devices[dev]

        with_iproute(self.netns, attach)
        return added

    def tc_intact(self) -> bool:
        if not self._tc_devices:
            return True

        def check(ip: Any) -> bool:
            names = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ip.get_links()}
            for dev, role in self._tc_devices.items():
                if dev not in names:
                    continue
                parents = [TC_INGRESS] + ([TC_EGRESS_PARENT] if role == "netdev" else [])
                for parent in parents:
                    if not _our_filters(ip, names[dev], parent):
                        return False
            return True

        try:
            return with_iproute(self.netns, check)
        except Exception as e:  # noqa: BLE001 - a vanished netns is "not intact"
            log.warning("cannot check tc filters", error=str(e))
            return False

    def detach_tc(self) -> list[str]:
        """Remove lbd's filters from every device of the namespace (also those a previous
        instance attached), and the clsact qdiscs left empty."""

        def detach(ip: Any) -> list[str]:
            # Find every filter first, then delete them back to back: a device's ingress
            # does forward NAT and another's the reverse NAT of the same flows, so the
            # datapath is half there from the first deletion to the last (a mode switch
            # serves through it until then). Pod-facing programs go first: no new flow
            # is balanced by tc while the uplinks still translate replies.
            found: list[tuple[bool, int, str, str]] = []
            for link in ip.get_links():
                idx, dev = link["index"], link.get_attr("IFLA_IFNAME")
                for parent in (TC_INGRESS, TC_EGRESS_PARENT):
                    for f in _our_filters(ip, idx, parent):
                        name = f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")
                        found.append((not str(name).startswith(TC_FROM_POD), idx, dev, parent))
            for _, idx, _, parent in sorted(set(found)):
                with contextlib.suppress(Exception):
                    ip.tc("del-filter", "bpf", idx, parent=parent, prio=TC_PRIO)
            removed = []
            for idx, dev in sorted({(idx, dev) for _, idx, dev, _ in found}):
                removed.append(dev)
                if not any(_all_filters(ip, idx, p) for p in (TC_INGRESS, TC_EGRESS_PARENT)):
                    with contextlib.suppress(Exception):
                        ip.tc("del", "clsact", idx)
            return removed

        self._tc_devices.clear()
        if self.netns is not None and not os.path.exists(f"/run/netns/{self.netns}"):
            return []  # the namespace is gone, and its devices with it
        return with_iproute(self.netns, detach)

    # --- maps -----------------------------------------------------------------------------

    def table(self, name: str) -> Any:
        return self._tables[name]

    def _fd(self, name: str) -> int:
        t = self._tables[name]
        return t.fd if isinstance(t, bpfsys.PinnedMap) else t.map_fd

    def _sizes(self, name: str) -> tuple[int, int]:
        spec = maps.MAP_SPECS[name]
        return ct.sizeof(spec.key), ct.sizeof(self._value_type(spec))

    def dump(self, name: str) -> tuple[bytes, bytes]:
        """Every entry of a map as packed (keys, values), in batches where possible."""
        ks, vs = self._sizes(name)
        return bpfsys.map_dump(self._fd(name), ks, vs)

    def items(self, name: str) -> list[tuple[Any, Any]]:
        """Every entry of a map as ctypes (key, value) pairs."""
        spec = maps.MAP_SPECS[name]
        key_type, value_type = spec.key, self._value_type(spec)
        ks, vs = self._sizes(name)
        keys, values = self.dump(name)
        return [
            (
                key_type.from_buffer_copy(keys, i * ks),
                value_type.from_buffer_copy(values, i * vs),
            )
            for i in range(len(keys) // ks)
        ]

    def read_view(self) -> MapView:
        """What the control-plane maps hold now."""
        v = MapView()
        v.frontends = maps.unpack_frontends(*self.dump(SERVICES))
        keys, values = self.dump(BACKENDS)
        v.backends = dict(
            zip(maps.unpack_u32_keys(keys), maps.unpack_backends(values), strict=True)
        )
        keys, values = self.dump(REV_NAT)
        v.rev_nat = dict(zip(maps.unpack_u32_keys(keys), maps.unpack_rev_nats(values), strict=True))
        keys, values = self.dump(SVC_NAMES)
        v.svc_names = dict(
            zip(maps.unpack_u32_keys(keys), maps.unpack_svc_names(values), strict=True)
        )
        v.maglev, v.aff_match, v.src_ranges, v.config = self._read_summaries()
        return v

    def _read_summaries(
        self,
    ) -> tuple[dict[int, frozenset[int]], set[tuple[int, int]], set[Any], Any]:
        """The maps a view holds decoded or summarised rather than entry for entry:
        Maglev tables (as their backend-id sets), affinity matches, source ranges and
        the config."""
        keys, values = self.dump(MAGLEV)
        tables = maps.unpack_maglev_ids(values, self.maglev_table_size)
        maglev = dict(zip(maps.unpack_u32_keys(keys), tables, strict=True))
        keys, _ = self.dump(AFF_MATCH)
        aff_match = set(maps.AFF_MATCH_KEY.iter_unpack(keys))
        src_ranges = {maps.decode_src_range(k) for k in self.table(SRC_RANGE)}
        cfg = self.table(CONFIG)[ct.c_uint32(0)]
        config = maps.decode_config(cfg) if any(bytes(cfg)) else None
        return maglev, aff_match, src_ranges, config

    def holds(self, view: MapView) -> bool:
        """Whether the control-plane maps hold exactly `view`.

        A periodic full sync asks this of the view lbd keeps: comparing packed bytes
        (what lbd would write for `view` against what the kernel returns) costs a
        fraction of decoding a quarter of a million entries into a new view and
        re-indexing it, and it is the common case, as nothing else writes these maps.
        A difference, whatever it is, sends the caller down the decoding path."""
        v = view
        packed = (
            (SERVICES, *maps.pack_frontends(v.frontends)),
            (BACKENDS, maps.pack_u32s(v.backends), maps.pack_backends(v.backends.values())),
            (
                REV_NAT,
                maps.pack_u32s(v.rev_nat),
                b"".join(map(maps.pack_rev_nat, v.rev_nat.values())),
            ),
            (
                SVC_NAMES,
                maps.pack_u32s(v.svc_names),
                b"".join(map(maps.pack_svc_name, v.svc_names.values())),
            ),
        )
        for name, keys, values in packed:
            ks, vs = self._sizes(name)
            if _entries(*self.dump(name), ks, vs) != _entries(keys, values, ks, vs):
                return False
        return self._read_summaries() == (v.maglev, v.aff_match, v.src_ranges, v.config)

    def mark_handover(self) -> bool:
        """Tell the programs another mode is taking the node over (LBD_CFG_HANDOVER).
        False when no configuration was ever written (nothing served here)."""
        table = self.table(CONFIG)
        cfg = table[ct.c_uint32(0)]
        if not any(bytes(cfg)):
            return False
        cfg.flags |= maps.CFG_HANDOVER
        table[ct.c_uint32(0)] = cfg
        return True

    def withdraw_frontends(self) -> int:
        """Delete every service map entry: heads first, so no lookup meets a head whose
        slots are gone. New flows then pass to the kernel's own stack, while flows already
        balanced carry on through conntrack and reverse NAT, which stay. Returns the
        number of frontends (heads) deleted."""
        ks, _ = self._sizes(SERVICES)
        keys, _ = self.dump(SERVICES)
        entries = [keys[i : i + ks] for i in range(0, len(keys), ks)]
        heads = [k for k in entries if k[maps.SVC_KEY_SLOT] == b"\0\0"]
        slots = [k for k in entries if k[maps.SVC_KEY_SLOT] != b"\0\0"]
        fd = self._fd(SERVICES)
        bpfsys.map_delete(fd, b"".join(heads), ks)
        bpfsys.map_delete(fd, b"".join(slots), ks)
        return len(heads)

    def apply(self, op: Op) -> None:
        """Perform one planned write (deleting something already gone is not an error)."""
        self.apply_ops([op])

    def apply_ops(
        self, ops: Sequence[Op], view: MapView | None = None, runs: Sequence[Run] | None = None
    ) -> int:
        """Perform planned writes in their order, each run of writes (or deletions) to one
        map in one batched syscall; record each run in `view` once it is in. `runs` are
        the maximal runs of `ops` when the caller has them (Plan.runs). Returns the
        number of syscalls made. Raises bpfsys.MapFullError when a map has no room (the
        runs before it are in, and recorded)."""
        runs = runs if runs is not None else runs_of(ops)
        if len(ops) >= PIPELINE_MIN_OPS:
            return self._apply_pipelined(ops, view, runs)
        calls = 0
        for name, delete, start, stop in runs:
            run = ops[start:stop]
            calls += self._write_run(name, delete, run)
            if view is not None:
                view.apply_run(name, delete, run)
        return calls

    def _apply_pipelined(self, ops: Sequence[Op], view: MapView | None, runs: Sequence[Run]) -> int:
        """apply_ops for big plans (a full sync: a quarter of a million entries at 10k
        services), with the kernel's work overlapping Python's.

        Runs are cut into chunks of one batch each. A worker thread makes the syscalls,
        one chunk at a time and in plan order (the datapath never sees a reference
        before what it names); meanwhile this thread packs the next chunk and records
        the previous one in `view` (ctypes releases the GIL for the syscall, in which
        the kernel copies and allocates every entry: ~0.2 s of a full sync at 10k). A
        chunk is recorded only once its syscall succeeded, so a failure leaves `view` as
        the serial path does.

        Each chunk is handed over only once the worker is inside its syscall: packing
        holds the GIL for the whole chunk (one C call), so a worker still waiting for
        the GIL to reach the syscall would start only after the next chunk is packed,
        and the two would take turns instead of overlapping (measured: the kernel sat
        idle between chunks for as long as the packing took, ~0.1 s at 10k)."""
        calls = 0
        sent: tuple[Future[int], str, bool, Sequence[Op]] | None = None
        in_syscall = threading.Event()

        def announced(send: Callable[[], int]) -> Callable[[], int]:
            def run() -> int:
                in_syscall.set()  # the GIL goes to the caller when the syscall drops it
                return send()

            return run

        def finish() -> None:
            nonlocal calls, sent
            if sent is None:
                return
            future, name, delete, run = sent
            sent = None
            calls += future.result()  # raises what the syscall raised: not recorded
            if view is not None:
                view.apply_run(name, delete, run)

        with ThreadPoolExecutor(1, thread_name_prefix="lbd-bpf-write") as pool:
            try:
                for name, delete, start, stop in runs:
                    for at, end in _chunks(name, ops, start, stop):
                        run = ops[at:end]
                        if name in _ONE_BY_ONE:  # BCC's tables: used from this thread only
                            finish()
                            calls += self._write_run(name, delete, run)
                            if view is not None:
                                view.apply_run(name, delete, run)
                            continue
                        send = self._packed_run(name, delete, run)  # while `sent` is sent
                        waiting, sent = sent, None
                        if waiting is not None:
                            calls += waiting[0].result()  # raises: not recorded
                        in_syscall.clear()
                        sent = (pool.submit(announced(send)), name, delete, run)
                        in_syscall.wait()
                        if waiting is not None and view is not None:
                            view.apply_run(*waiting[1:])  # while `sent` is sent
            except BaseException:
                with contextlib.suppress(Exception):
                    finish()  # what went in before the error is recorded
                raise
            finish()
        return calls

    def _write_run(self, name: str, delete: bool, run: Sequence[Op]) -> int:
        if name in _ONE_BY_ONE:  # an LPM trie and an array: few entries, one by one
            t = self.table(name)
            for op in run:
                key, value = self._encode(op)
                if value is None:
                    with contextlib.suppress(KeyError):
                        del t[key]
                else:
                    t[key] = value
            return len(run)
        return self._packed_run(name, delete, run)()

    def _packed_run(self, name: str, delete: bool, run: Sequence[Op]) -> Callable[[], int]:
        """`run` packed, and the syscall(s) that write it (returning how many were made)."""
        ks, vs = self._sizes(name)
        if name == SERVICES:
            keys = maps.pack_svc_keys([op[1] for op in run])
        elif name == AFF_MATCH:
            keys = maps.pack_aff_match_keys([op[1] for op in run])
        else:  # u32 ids
            keys = maps.pack_u32s([op[1] for op in run])
        fd = self._fd(name)
        if delete:

            def delete_all() -> int:
                bpfsys.map_delete(fd, keys, ks)
                return 1

            return delete_all
        if name == SERVICES:
            values = maps.pack_svc_slot_values(itertools.chain.from_iterable([op[2] for op in run]))
        elif name == BACKENDS:
            values = maps.pack_backends([op[2] for op in run])
        elif name in _PACKED_BY:  # one C-level pass, not a Python call per entry
            values = b"".join(map(_PACKED_BY[name], map(_VALUE, run)))
        else:
            values = b"".join([self._pack_value(name, op.value) for op in run])
        limit = self._max_entries(maps.MAP_SPECS[name])

        def write() -> int:
            try:
                return bpfsys.map_update(fd, keys, values, ks, vs)
            except bpfsys.MapFullError as e:
                raise bpfsys.MapFullError(
                    e.errno, f"{name} is full ({limit} entries): {e.strerror}"
                ) from e

        return write

    def _pack_value(self, name: str, value: Any) -> bytes:
        if name == SERVICES:
            return maps.SVC_VAL.pack(*value)
        if name == BACKENDS:
            return maps.pack_backend(value)
        if name == REV_NAT:
            return maps.pack_rev_nat(value)
        if name == MAGLEV:
            return maps.pack_maglev(value, self.maglev_table_size)
        if name == SVC_NAMES:
            return maps.pack_svc_name(value)
        if name == AFF_MATCH:
            return b"\x01"
        raise ValueError(f"unknown map {name}")

    def _encode(self, op: Op) -> tuple[Any, Any]:
        delete = op.value is None
        if op.map == SRC_RANGE:
            return maps.encode_src_range(op.key), None if delete else ct.c_uint8(1)
        if op.map == CONFIG:
            value = maps.encode_config(op.value) if op.value is not None else maps.ConfigVal()
            return ct.c_uint32(0), value
        raise ValueError(f"{op.map} is written in batches")

    def capacity(self) -> dict[str, int]:
        """max_entries of the control-plane maps."""
        return {
            name: self._max_entries(maps.MAP_SPECS[name])
            for name in (SERVICES, BACKENDS, REV_NAT, MAGLEV, AFF_MATCH, SRC_RANGE, SVC_NAMES)
        }

    def ct_entries(
        self, *, udp_only: bool = False, rev_nat_ids: set[int] | None = None
    ) -> dict[maps.CtTuple, maps.CtEntry]:
        """The conntrack map, decoded; optionally only UDP entries and only those of some
        frontends (rev-NAT ids), filtered before decoding: a busy node has 100k entries,
        and a one-service sync must not decode them all."""
        keys, values = self.dump("lbd_ct")
        if udp_only or rev_nat_ids is not None:
            keys, values = maps.filter_ct(keys, values, udp_only, rev_nat_ids)
        return maps.unpack_ct(keys, values)

    def ct_delete(self, keys: Iterable[maps.CtTuple]) -> int:
        raw = b"".join([maps.pack_ct_key(k) for k in keys])
        ks, _ = self._sizes("lbd_ct")
        return bpfsys.map_delete(self._fd("lbd_ct"), raw, ks)

    def affinity_delete_idle(self, max_idle_ns: dict[int, int], now_ns: int) -> tuple[int, int]:
        """Delete affinity entries idle longer than their service's timeout (svc id →
        timeout in ns; entries of unknown svc ids go too). Returns (deleted, left)."""
        entries = self.items("lbd_affinity")
        doomed = [
            bytes(k) for k, v in entries if now_ns - v.last_used_ns > max_idle_ns.get(k.svc_id, 0)
        ]
        ks, _ = self._sizes("lbd_affinity")
        bpfsys.map_delete(self._fd("lbd_affinity"), b"".join(doomed), ks)
        return len(doomed), len(entries) - len(doomed)

    def maps_intact(self) -> bool:
        return all((self.pin_dir / name).exists() for name in maps.MAP_SPECS)

    def repin(self) -> list[str]:
        """Pin again the maps whose pin someone removed (the programs still use them; a
        restarted daemon must find these, not create new ones)."""
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        (self.pin_dir / LINKS_DIR).mkdir(exist_ok=True)
        repinned = []
        for name, table in self._tables.items():
            path = self.pin_dir / name
            if not path.exists():
                bpfsys.obj_pin(table.map_fd, str(path))
                repinned.append(name)
        return repinned

    # --- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this process's handles; attached programs and pinned maps stay."""
        for table in self._tables.values():
            if isinstance(table, bpfsys.PinnedMap):
                table.close()
        self._tables.clear()
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def unpin(self) -> None:
        """Remove the pinned maps (and the links directory): the maps die with their last
        user."""
        if self.pin_dir.is_dir():
            for path in sorted(self.pin_dir.iterdir()):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.pin_dir.rmdir()
        # remove /sys/fs/bpf/lbd when this was its last instance
        parent = self.pin_dir.parent
        if parent.name == "lbd":
            with contextlib.suppress(OSError):
                parent.rmdir()


def _chunks(name: str, ops: Sequence[Op], start: int, stop: int) -> Iterator[tuple[int, int]]:
    """`ops[start:stop]` (one run) cut into pieces of about PIPELINE_CHUNK entries each
    (an lbd_services op writes several)."""
    if name != SERVICES:
        for at in range(start, stop, PIPELINE_CHUNK):
            yield at, min(stop, at + PIPELINE_CHUNK)
        return
    at, n = start, 0
    for i in range(start, stop):
        n += len(ops[i][1][1])
        if n >= PIPELINE_CHUNK:
            yield at, i + 1
            at, n = i + 1, 0
    if at < stop:
        yield at, stop


def _entries(keys: bytes, values: bytes, ks: int, vs: int) -> dict[bytes, bytes]:
    """Packed map entries (fixed-size keys and values back to back) as key -> value:
    a map's order is its hash order, so two dumps compare as mappings."""
    return dict(
        zip(
            [keys[i : i + ks] for i in range(0, len(keys), ks)],
            [values[i : i + vs] for i in range(0, len(values), vs)],
            strict=True,
        )
    )


def _link_cgroup_id(fd: int) -> int:
    """The cgroup id (inode number) a cgroup link is attached to; 0 once detached."""
    return bpfsys.link_info(fd).cgroup_id


def _ensure_clsact(ip: Any, idx: int) -> None:
    try:
        ip.tc("add", "clsact", idx)
    except Exception as e:  # pyroute2 raises NetlinkError(EEXIST) when it exists
        if getattr(e, "code", None) != errno.EEXIST:
            raise


def _replace_filter(ip: Any, idx: int, parent: str, fn: Any) -> None:
    ip.tc(
        "replace-filter",
        "bpf",
        idx,
        f":{TC_HANDLE}",
        fd=fn.fd,
        name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
        parent=parent,
        classid=1,
        direct_action=True,
        prio=TC_PRIO,
    )


def _all_filters(ip: Any, idx: int, parent: str) -> list[Any]:
    try:
        return [m for m in ip.get_filters(index=idx, parent=parent) if m.get_attr("TCA_KIND")]
    except Exception:  # noqa: BLE001 - no clsact: no filters
        return []


def _our_filters(ip: Any, idx: int, parent: str) -> list[Any]:
    out = []
    for m in _all_filters(ip, idx, parent):
        prio = (m["info"] >> 16) & 0xFFFF
        opts = m.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if prio == TC_PRIO and m.get_attr("TCA_KIND") == "bpf" and str(name).startswith("lbd_"):
            out.append(m)
    return out
