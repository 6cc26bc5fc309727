"""The thin kernel layer of the IPVS mode: netlink for IPVS, ipsets, the dummy interface.

Owns talking to the kernel and nothing else: reading a KernelView, applying a plan's ops
one by one, writing sysctls. Everything goes over netlink through pyroute2 (no ipvsadm,
ipset or ip binaries on the sync path); the few iptables rules go through the iptables
mode's `Tools` (one iptables-restore), driven by the backend.

`Kernel(netns)` moves the calling thread into a named network namespace for the duration
of a `with` block, so that every socket it opens, every /proc/sys file it writes and every
/proc/thread-self/net file it reads belong to that namespace; other threads stay where
they are. pyroute2 speaks netlink through asyncio; a private selector loop per session
works under any event loop policy (the daemon's uvloop cannot carry AF_NETLINK sockets)
and in any thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import sys
from collections.abc import Awaitable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from backends.ipvs.plan import (
    DUMMY,
    SET_PREFIXES,
    Dest,
    Extension,
    KernelView,
    Member,
    Op,
    OpKind,
    RealServer,
    ServiceView,
    SetSpec,
    VirtualServer,
    VSKey,
    canonical_ip,
)
from lbd.model.state import IPFamily

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: IPFamily.V4, socket.AF_INET6: IPFamily.V6}
_IP_VS_SVC_F_PERSISTENT = 0x1
_IP_VS_CONN_F_MASQ = 0x0
_IFA_F_NODAD = 0x02
_IFA_F_NOPREFIXROUTE = 0x200
_RT_SCOPE_HOST = 254
_ETYPE = {
    "hash:ip,port": "ip,port",
    "hash:ip,port,ip": "ip,port,ip",
    "hash:ip,port,net": "ip,port,net",
    "hash:ip": "ip",
    "bitmap:port": "port",
}
# The kernel reads an IPv6 service's netmask attribute as a host-order prefix length
# stored in a big-endian field; pyroute2 encodes the attribute as an IPv4 address.
_V6_NETMASK = "128.0.0.0" if sys.byteorder == "little" else "0.0.0.128"

# What IPVS mode needs from the node's network namespace. conntrack: IPVS keeps netfilter
# conntrack entries, which iptables' MASQUERADE and lbd's UDP hygiene rely on.
# expire_nodest_conn: connections to a deleted real server are dropped at their next packet
# instead of black-holing. expire_quiescent_template: persistence (sessionAffinity) does not
# pin clients to a real server at weight 0. arp_ignore/arp_announce: the node answers ARP
# only for addresses of the receiving interface and never uses a virtual address as ARP
# source, so LB IPs on lbd-ipvs0 are not claimed on the wire.
SYSCTLS: dict[str, int] = {
    "net.ipv4.vs.conntrack": 1,
    "net.ipv4.vs.expire_nodest_conn": 1,
    "net.ipv4.vs.expire_quiescent_template": 1,
    "net.ipv4.conf.all.arp_ignore": 1,
    "net.ipv4.conf.all.arp_announce": 2,
}


class KernelError(RuntimeError):
    """A netlink request failed; the message names the op."""


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _code(err: BaseException) -> int:
    return int(getattr(err, "code", 0) or 0)


class Kernel:
    """A netlink session in one network namespace (the current one when `netns` is None).

    Use as a context manager; not thread-safe (one session per thread).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._home: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ipvs: Any = None
        self._ipset: Any = None
        self._ipr: Any = None
        self._dummy_index: int | None = None

    # --- session ------------------------------------------------------------------------

    def __enter__(self) -> Kernel:
        if self.netns is not None:
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            except OSError:
                os.close(self._home)
                self._home = None
                raise
            finally:
                os.close(target)
        self._loop = asyncio.SelectorEventLoop()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for sock in (self._ipvs, self._ipset, self._ipr):
                if sock is not None:
                    try:
                        sock.close()
                    except Exception:  # noqa: BLE001, S110 - closing; nothing to recover
                        pass
            if self._loop is not None:
                # Let the transports' close callbacks run before the loop goes.
                self._loop.run_until_complete(asyncio.sleep(0))
                self._loop.close()
        finally:
            self._ipvs = self._ipset = self._ipr = self._loop = None
            if self._home is not None:
                try:
                    _setns(self._home)
                finally:
                    os.close(self._home)
                    self._home = None

    def _run(self, coro: Awaitable[T]) -> T:
        assert self._loop is not None, "use Kernel as a context manager"
        return self._loop.run_until_complete(coro)  # type: ignore[arg-type]

    async def _ipvs_socket(self) -> Any:
        if self._ipvs is None:
            from pyroute2.ipvs import AsyncIPVS

            sock = AsyncIPVS()
            await sock.setup_endpoint()  # resolves the IPVS generic netlink family
            self._ipvs = sock
        return self._ipvs

    async def _ipset_socket(self) -> Any:
        if self._ipset is None:
            from pyroute2.ipset import AsyncIPSet

            sock = AsyncIPSet()
            await sock.setup_endpoint()
            self._ipset = sock
        return self._ipset

    async def _route_socket(self) -> Any:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            sock = AsyncIPRoute()
            await sock.setup_endpoint()
            self._ipr = sock
        return self._ipr

    # --- probes -------------------------------------------------------------------------

    @staticmethod
    def ipvs_loaded() -> bool:
        """Whether this namespace's kernel has IPVS loaded (never loads it)."""
        return Path("/proc/thread-self/net/ip_vs").exists()

    def set_sysctls(self, values: Mapping[str, int] = SYSCTLS) -> dict[str, int]:
        """Write the sysctls that differ; returns what was changed."""
        changed = {}
        for key, value in values.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                if path.read_text().strip() != str(value):
                    path.write_text(f"{value}\n")
                    changed[key] = value
            except OSError as e:
                raise KernelError(f"sysctl {key}={value}: {e.strerror}") from e
        return changed

    # --- reading ------------------------------------------------------------------------

    def read_view(self) -> KernelView:
        """Everything the plan needs: IPVS services with real servers, lbd's ipsets,
        the dummy interface's addresses and the node's other addresses."""
        return self._run(self._read_view())

    async def _read_view(self) -> KernelView:
        services: dict[VSKey, ServiceView] = {}
        if self.ipvs_loaded():
            for vs in await self._dump_services():
                services[vs.key] = ServiceView(vs, await self._dump_dests(vs.key))
        sets, kinds = await self._read_sets()
        exists, dummy, others = await self._read_addresses()
        return KernelView(services, sets, kinds, exists, frozenset(dummy), tuple(others))

    def read_dests(self, keys: Iterable[VSKey]) -> dict[VSKey, dict[Dest, RealServer]]:
        """The real servers (with connection counts) of the given virtual servers."""

        async def read() -> dict[VSKey, dict[Dest, RealServer]]:
            out = {}
            for key in keys:
                try:
                    out[key] = await self._dump_dests(key)
                except Exception as e:  # noqa: BLE001 - gone meanwhile: report as empty
                    if _code(e) not in (errno.ESRCH, errno.ENOENT):
                        raise
                    out[key] = {}
            return out

        return self._run(read())

    def count_services(self) -> int:
        """How many IPVS virtual servers this namespace has (cheap: no real servers)."""
        if not self.ipvs_loaded():
            return 0
        return len(self._run(self._dump_services()))

    def dummy_exists(self) -> bool:
        async def lookup() -> bool:
            ipr = await self._route_socket()
            return bool(await ipr.link_lookup(ifname=DUMMY))

        return self._run(lookup())

    async def _dump_services(self) -> list[VirtualServer]:
        ipvs = await self._ipvs_socket()
        out = []
        for msg in await ipvs.service("dump"):
            attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            if attrs is None:
                continue
            family = _FAMILY.get(attrs.get_attr("IPVS_SVC_ATTR_AF"))
            if family is None:
                continue
            fwmark = attrs.get_attr("IPVS_SVC_ATTR_FWMARK") or 0
            if fwmark:
                key = VSKey(family, 0, "", 0, fwmark)
            else:
                addr = canonical_ip(attrs.get_attr("IPVS_SVC_ATTR_ADDR") or "") or ""
                key = VSKey(
                    family,
                    attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0,
                    addr,
                    attrs.get_attr("IPVS_SVC_ATTR_PORT") or 0,
                )
            flags = (attrs.get_attr("IPVS_SVC_ATTR_FLAGS") or {}).get("flags", 0)
            timeout = attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0
            persistence = timeout if flags & _IP_VS_SVC_F_PERSISTENT else 0
            out.append(
                VirtualServer(key, attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME") or "", persistence)
            )
        return out

    async def _dump_dests(self, key: VSKey) -> dict[Dest, RealServer]:
        ipvs = await self._ipvs_socket()
        out = {}
        for msg in await ipvs.dest("dump", service=_service_key(key)):
            attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
            if attrs is None:
                continue
            ip = canonical_ip(attrs.get_attr("IPVS_DEST_ATTR_ADDR") or "")
            if ip is None:
                continue
            port = attrs.get_attr("IPVS_DEST_ATTR_PORT") or 0
            out[(ip, port)] = RealServer(
                ip,
                port,
                attrs.get_attr("IPVS_DEST_ATTR_WEIGHT") or 0,
                attrs.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0,
                attrs.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0,
            )
        return out

    async def _read_sets(self) -> tuple[dict[str, dict[Member, Extension]], dict[str, str]]:
        ips = await self._ipset_socket()
        sets: dict[str, dict[Member, Extension]] = {}
        kinds: dict[str, str] = {}
        # A big set arrives in several messages, each naming it again.
        async for msg in await ips.list():
            name = msg.get_attr("IPSET_ATTR_SETNAME")
            if not name or not name.startswith(SET_PREFIXES):
                continue
            members = sets.setdefault(name, {})
            kind = msg.get_attr("IPSET_ATTR_TYPENAME")
            if kind:
                kinds[name] = kind
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if adt is None:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                member, ext = _parse_member(data)
                members[member] = ext
        return sets, kinds

    async def _read_addresses(self) -> tuple[bool, list[str], list[str]]:
        ipr = await self._route_socket()
        found = await ipr.link_lookup(ifname=DUMMY)
        self._dummy_index = found[0] if found else None
        dummy, others = [], []
        async for msg in await ipr.get_addr():
            ip = canonical_ip(msg.get_attr("IFA_ADDRESS") or "")
            if ip is None:
                continue
            if msg.get("index") == self._dummy_index:
                dummy.append(ip)
            else:
                others.append(ip)
        return self._dummy_index is not None, dummy, others

    # --- applying -----------------------------------------------------------------------

    def apply(self, ops: Iterable[Op]) -> int:
        """Apply `ops` in order; returns how many were applied. Raises KernelError on the
        first failure (what was applied before it stays applied)."""
        return self._run(self._apply(list(ops)))

    async def _apply(self, ops: list[Op]) -> int:
        done = 0
        for op in ops:
            try:
                await self._apply_one(op)
            except KernelError:
                raise
            except Exception as e:  # noqa: BLE001 - netlink errors come in several types
                raise KernelError(f"{op}: {e}") from e
            done += 1
        return done

    async def _apply_one(self, op: Op) -> None:
        kind = op.kind
        if kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE, OpKind.DEL_SERVICE):
            assert op.vs is not None
            ipvs = await self._ipvs_socket()
            if kind == OpKind.DEL_SERVICE:
                await _tolerate(ipvs.service("del", service=_service_key(op.vs.key)), errno.ESRCH)
                return
            service = _service(op.vs)
            try:
                await ipvs.service("add" if kind == OpKind.ADD_SERVICE else "set", service=service)
            except Exception as e:
                if kind != OpKind.ADD_SERVICE or _code(e) != errno.EEXIST:
                    raise
                await ipvs.service("set", service=_service(op.vs))
        elif kind in (OpKind.ADD_DEST, OpKind.EDIT_DEST, OpKind.DEL_DEST):
            assert op.vs is not None and op.dest is not None
            ipvs = await self._ipvs_socket()
            key = _service_key(op.vs.key)
            if kind == OpKind.DEL_DEST:
                dest = _dest(op.dest)
                await _tolerate(ipvs.dest("del", service=key, dest=dest), errno.ENOENT)
                return
            try:
                await ipvs.dest(
                    "add" if kind == OpKind.ADD_DEST else "set", service=key, dest=_dest(op.dest)
                )
            except Exception as e:
                if kind != OpKind.ADD_DEST or _code(e) != errno.EEXIST:
                    raise
                await ipvs.dest("set", service=_service_key(op.vs.key), dest=_dest(op.dest))
        elif kind == OpKind.CREATE_SET:
            assert op.set is not None
            await self._create_set(op.set)
        elif kind in (OpKind.ADD_MEMBER, OpKind.DEL_MEMBER):
            assert op.set is not None and op.member is not None
            await self._member(op.set, op.member, op.ext, add=kind == OpKind.ADD_MEMBER)
        elif kind == OpKind.CREATE_DUMMY:
            await self._create_dummy()
        elif kind in (OpKind.ADD_ADDRESS, OpKind.DEL_ADDRESS):
            await self._address(op.address, add=kind == OpKind.ADD_ADDRESS)

    async def _create_set(self, spec: SetSpec) -> None:
        ips = await self._ipset_socket()
        kwargs: dict[str, Any] = {}
        if spec.kind == "bitmap:port":
            kwargs["bitmap_ports_range"] = (0, 65535)
        await ips.create(
            spec.name,
            stype=spec.kind,
            family=_AF[spec.family or IPFamily.V4],
            exclusive=False,  # an existing set of the same type is fine
            comment=spec.comment,
            skbinfo=spec.skbinfo,
            **kwargs,
        )

    async def _member(self, spec: SetSpec, m: Member, ext: Extension, *, add: bool) -> None:
        from pyroute2.ipset import PortEntry

        ips = await self._ipset_socket()
        etype = _ETYPE[spec.kind]
        entry: Any
        if etype == "port":
            entry = m.port
        elif etype == "ip":
            entry = m.ip
        elif etype == "ip,port":
            entry = (m.ip, PortEntry(m.port, m.proto))
        else:
            entry = (m.ip, PortEntry(m.port, m.proto), m.ip2)
        family = _AF[spec.family or IPFamily.V4]
        # Not exclusive: adding an existing entry updates its comment/mark, deleting a
        # missing one is a no-op (ipset's -exist).
        if not add:
            await ips.delete(spec.name, entry, family=family, exclusive=False, etype=etype)
            return
        kwargs: dict[str, Any] = {}
        if spec.comment:
            kwargs["comment"] = ext.comment
        if spec.skbinfo:
            kwargs["skbmark"] = (ext.mark, 0xFFFFFFFF)
        await ips.add(spec.name, entry, family=family, exclusive=False, etype=etype, **kwargs)

    async def _create_dummy(self) -> None:
        ipr = await self._route_socket()
        found = await ipr.link_lookup(ifname=DUMMY)
        if not found:
            await _tolerate(ipr.link("add", ifname=DUMMY, kind="dummy"), errno.EEXIST)
            found = await ipr.link_lookup(ifname=DUMMY)
        self._dummy_index = found[0]
        # Up, so that IPv6 addresses are usable at once; the dummy never sends anything.
        await ipr.link("set", index=self._dummy_index, state="up")

    async def _address(self, ip: str, *, add: bool) -> None:
        ipr = await self._route_socket()
        if self._dummy_index is None:
            found = await ipr.link_lookup(ifname=DUMMY)
            if not found:
                if not add:
                    return
                raise KernelError(f"{DUMMY} is missing")
            self._dummy_index = found[0]
        v6 = ":" in ip
        kwargs: dict[str, Any] = {"index": self._dummy_index, "address": ip}
        kwargs["prefixlen"] = 128 if v6 else 32
        if not add:
            await _tolerate(ipr.addr("del", **kwargs), errno.EADDRNOTAVAIL, errno.ENOENT)
            return
        # Virtual addresses must never be picked as a source address for traffic to other
        # destinations (MASQUERADE and connect() pick one by scope and preference). IPv4:
        # scope host, which source selection only considers for local destinations. IPv6
        # has no settable scope: the address is deprecated (preferred lifetime 0), which
        # source selection avoids whenever anything else fits, yet it still receives. No
        # prefix route either way, and no duplicate address detection.
        if v6:
            kwargs.update(
                flags=_IFA_F_NODAD | _IFA_F_NOPREFIXROUTE, preferred_lft=0, valid_lft=0xFFFFFFFF
            )
        else:
            kwargs.update(scope=_RT_SCOPE_HOST, flags=_IFA_F_NOPREFIXROUTE)
        await _tolerate(ipr.addr("add", **kwargs), errno.EEXIST)

    # --- cleanup ------------------------------------------------------------------------

    def remove_all_owned(self, *, ipset: bool = True) -> list[str]:
        """Delete lbd's virtual servers, its ipsets (when `ipset`: the host has ipset) and
        the dummy interface; the errors (as text) of what could not be removed."""

        async def run() -> list[str]:
            services = {}
            if self.ipvs_loaded():
                services = {vs.key: ServiceView(vs) for vs in await self._dump_services()}
            sets, kinds = await self._read_sets() if ipset else ({}, {})
            exists, dummy, others = await self._read_addresses()
            view = KernelView(services, sets, kinds, exists, frozenset(dummy), tuple(others))
            owned = [key for key in services if view.owns(key)]
            return await self._remove_all(owned, list(sets))

        return self._run(run())

    async def _remove_all(self, owned: list[VSKey], set_names: list[str]) -> list[str]:
        errors = []
        if owned:
            ipvs = await self._ipvs_socket()
            for key in owned:
                try:
                    await _tolerate(ipvs.service("del", service=_service_key(key)), errno.ESRCH)
                except Exception as e:  # noqa: BLE001 - report and carry on
                    errors.append(f"delete virtual server {key}: {e}")
        if set_names:
            ips = await self._ipset_socket()
            for name in set_names:
                try:
                    await _tolerate(ips.destroy(name), errno.ENOENT)
                except Exception as e:  # noqa: BLE001 - report and carry on
                    errors.append(f"destroy ipset {name}: {e}")
        ipr = await self._route_socket()
        found = await ipr.link_lookup(ifname=DUMMY)
        if found:
            try:
                await _tolerate(ipr.link("del", index=found[0]), errno.ENODEV)
            except Exception as e:  # noqa: BLE001 - report and carry on
                errors.append(f"delete {DUMMY}: {e}")
        return errors


async def _tolerate(coro: Awaitable[Any], *codes: int) -> None:
    """Await `coro`, ignoring netlink errors with one of `codes` (already done)."""
    try:
        await coro
    except Exception as e:
        if _code(e) not in codes:
            raise


def _service_key(key: VSKey) -> Any:
    from pyroute2.ipvs import IPVSService

    if key.fwmark:
        return IPVSService(fwmark=key.fwmark, af=_AF[key.family])
    return IPVSService(addr=key.addr, port=key.port, protocol=key.protocol)


def _service(vs: VirtualServer) -> Any:
    from pyroute2.ipvs import IPVSService

    key = vs.key
    netmask = _V6_NETMASK if key.family == IPFamily.V6 else "255.255.255.255"
    flags = {"flags": _IP_VS_SVC_F_PERSISTENT if vs.persistence else 0, "mask": 0xFFFFFFFF}
    common = {
        "sched_name": vs.scheduler,
        "flags": flags,
        "timeout": vs.persistence,
        "netmask": netmask,
    }
    if key.fwmark:
        return IPVSService(fwmark=key.fwmark, af=_AF[key.family], **common)
    return IPVSService(addr=key.addr, port=key.port, protocol=key.protocol, **common)


def _dest(rs: RealServer) -> Any:
    from pyroute2.ipvs import IPVSDest

    # pyroute2 defaults to direct routing; Kubernetes services need NAT (masquerading).
    return IPVSDest(addr=rs.ip, port=rs.port, weight=rs.weight, fwd_method=_IP_VS_CONN_F_MASQ)


def _nested_ip(value: Any) -> str:
    if value is None:
        return ""
    for key in ("IPSET_ATTR_IPADDR_IPV4", "IPSET_ATTR_IPADDR_IPV6"):
        ip = value.get_attr(key)
        if ip:
            return canonical_ip(ip) or ""
    return ""


def _parse_member(data: Any) -> tuple[Member, Extension]:
    ip = _nested_ip(data.get_attr("IPSET_ATTR_IP_FROM"))
    port = data.get_attr("IPSET_ATTR_PORT_FROM") or 0
    proto = data.get_attr("IPSET_ATTR_PROTO") or 0
    ip2 = _nested_ip(data.get_attr("IPSET_ATTR_IP2"))
    cidr2 = data.get_attr("IPSET_ATTR_CIDR2")
    if ip2 and cidr2 is not None:
        ip2 = f"{ip2}/{cidr2}"  # hash:ip,port,net
    mark = data.get_attr("IPSET_ATTR_SKBMARK")
    comment = data.get_attr("IPSET_ATTR_COMMENT") or ""
    return Member(ip, proto, port, ip2), Extension(comment, mark[0] if mark else 0)
