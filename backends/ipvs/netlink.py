"""Batched netlink writes for the IPVS mode: many requests per system call.

Owns the hot path of a sync: adding and removing virtual servers, real servers, ipset
members and dummy-interface addresses. A full sync of 10,000 services is ~140,000 such
requests; through pyroute2's request/response API each costs a round trip plus pure-Python
message building (~100 µs natively, ~15 ms under the test VM's emulation). Here each
request is packed with `struct` and up to BATCH_MAX of them go to the kernel in one
sendmsg: netlink processes the messages of one buffer in order, answering only failures,
and the last request of each buffer asks for an ACK, which says the buffer is done.

Message layouts follow the kernel's uapi headers (linux/ip_vs.h, linux/netfilter/ipset/
ip_set.h, linux/if_addr.h); tests/vm checks the result with ipvsadm, ipset and ip.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_GENERIC = 16
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10  # error messages without the failed request echoed back
_NETLINK_EXT_ACK = 11  # ... but with the kernel's explanation, when it has one
_SO_RCVBUFFORCE = 33

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
_NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSGERR_ATTR_MSG = 1
_NLA_F_NESTED = 0x8000
_NLA_F_NET_BYTEORDER = 0x4000

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_BE16 = struct.Struct(">H")

# Requests per sendmsg, and bytes: well under the default socket buffers, so neither the
# request nor the (rare) error answers can be dropped for space.
BATCH_MAX = 256
BATCH_BYTES = 64 * 1024
RECV_TIMEOUT_S = 120.0  # one buffer under emulation takes well under a second


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return _NLA.pack(size, kind) + data + b"\0" * (-size % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _packed_ip(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


@dataclass(frozen=True, slots=True)
class Request:
    """One netlink request: its type, flags (REQUEST and ACK are added) and payload."""

    type: int
    flags: int
    payload: bytes


# --- IPVS (generic netlink family "IPVS") ------------------------------------------------

IPVS_CMD_NEW_SERVICE = 1
IPVS_CMD_SET_SERVICE = 2
IPVS_CMD_DEL_SERVICE = 3
_IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_NEW_DEST = 5
IPVS_CMD_SET_DEST = 6
IPVS_CMD_DEL_DEST = 7
_IPVS_CMD_GET_DEST = 8
_IPVS_GENL_VERSION = 1
_IPVS_CMD_ATTR_SERVICE = 1
_IPVS_CMD_ATTR_DEST = 2
_SVC_AF, _SVC_PROTOCOL, _SVC_ADDR, _SVC_PORT, _SVC_FWMARK = 1, 2, 3, 4, 5
_SVC_SCHED_NAME, _SVC_FLAGS, _SVC_TIMEOUT, _SVC_NETMASK = 6, 7, 8, 9
_DEST_ADDR, _DEST_PORT, _DEST_FWD_METHOD, _DEST_WEIGHT = 1, 2, 3, 4
_DEST_U_THRESH, _DEST_L_THRESH, _DEST_ADDR_FAMILY = 5, 6, 11
IP_VS_SVC_F_PERSISTENT = 0x1
IP_VS_CONN_F_MASQ = 0x0


def ipvs_service_key(af: int, protocol: int, addr: str, port: int, fwmark: int) -> bytes:
    """The attributes that identify a virtual server (inside IPVS_CMD_ATTR_SERVICE)."""
    attrs = [_attr(_SVC_AF, _U16.pack(af))]
    if fwmark:
        attrs.append(_attr(_SVC_FWMARK, _U32.pack(fwmark)))
    else:
        attrs.append(_attr(_SVC_PROTOCOL, _U16.pack(protocol)))
        attrs.append(_attr(_SVC_ADDR, _packed_ip(addr)))
        attrs.append(_attr(_SVC_PORT, _BE16.pack(port)))
    return b"".join(attrs)


def ipvs_service(
    family_id: int, cmd: int, key: bytes, *, scheduler: str = "", persistence: int = 0
) -> Request:
    """NEW/SET_SERVICE (with the settings) or DEL_SERVICE (key only) of `key`."""
    attrs = [key]
    if cmd != IPVS_CMD_DEL_SERVICE:
        v6 = _U16.unpack_from(key, 4)[0] == socket.AF_INET6
        flags = IP_VS_SVC_F_PERSISTENT if persistence else 0
        attrs += [
            _attr(_SVC_SCHED_NAME, _cstr(scheduler)),
            _attr(_SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF)),
            _attr(_SVC_TIMEOUT, _U32.pack(persistence)),
            # IPv4: a /32 mask in network order. IPv6: the kernel takes the field as a
            # prefix length in host order.
            _attr(_SVC_NETMASK, _U32.pack(128) if v6 else b"\xff\xff\xff\xff"),
        ]
    payload = struct.pack("=BBH", cmd, _IPVS_GENL_VERSION, 0)
    payload += _nested(_IPVS_CMD_ATTR_SERVICE, *attrs)
    return Request(family_id, 0, payload)


def ipvs_dest(family_id: int, cmd: int, key: bytes, ip: str, port: int, weight: int) -> Request:
    """NEW/SET/DEL_DEST: a masquerading real server `ip:port` of the virtual server `key`."""
    af = socket.AF_INET6 if ":" in ip else socket.AF_INET
    attrs = [
        _attr(_DEST_ADDR, _packed_ip(ip)),
        _attr(_DEST_PORT, _BE16.pack(port)),
        _attr(_DEST_ADDR_FAMILY, _U16.pack(af)),
    ]
    if cmd != IPVS_CMD_DEL_DEST:
        attrs += [
            _attr(_DEST_FWD_METHOD, _U32.pack(IP_VS_CONN_F_MASQ)),
            _attr(_DEST_WEIGHT, _U32.pack(weight)),
            _attr(_DEST_U_THRESH, _U32.pack(0)),
            _attr(_DEST_L_THRESH, _U32.pack(0)),
        ]
    payload = struct.pack("=BBH", cmd, _IPVS_GENL_VERSION, 0)
    payload += _nested(_IPVS_CMD_ATTR_SERVICE, key) + _nested(_IPVS_CMD_ATTR_DEST, *attrs)
    return Request(family_id, 0, payload)


# --- ipset (nfnetlink subsystem 6) -------------------------------------------------------

_NFNL_SUBSYS_IPSET = 6
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
_IPSET_CMD_LIST = 7
# The oldest protocol revision the kernel accepts for add/del (IPSET_PROTOCOL_MIN).
_IPSET_PROTOCOL = 6
_IPSET_ATTR_PROTOCOL, _IPSET_ATTR_SETNAME, _IPSET_ATTR_TYPENAME = 1, 2, 3
_IPSET_ATTR_DATA, _IPSET_ATTR_ADT = 7, 8
_IPSET_ATTR_IP, _IPSET_ATTR_PORT, _IPSET_ATTR_PROTO = 1, 4, 7
_IPSET_ATTR_IP2, _IPSET_ATTR_CIDR2, _IPSET_ATTR_COMMENT, _IPSET_ATTR_SKBMARK = 20, 21, 26, 27
_IPSET_ATTR_IPADDR_IPV4, _IPSET_ATTR_IPADDR_IPV6 = 1, 2


def _ipset_ip(kind: int, ip: str) -> bytes:
    inner = _IPSET_ATTR_IPADDR_IPV6 if ":" in ip else _IPSET_ATTR_IPADDR_IPV4
    return _nested(kind, _attr(inner | _NLA_F_NET_BYTEORDER, _packed_ip(ip)))


def ipset_member(
    cmd: int,
    set_name: str,
    af: int,
    *,
    ip: str = "",
    proto: int = 0,
    port: int | None = None,
    ip2: str = "",
    comment: str | None = None,
    skbmark: int | None = None,
) -> Request:
    """ADD or DEL of one entry. Without NLM_F_EXCL: adding an existing entry updates its
    comment or mark and deleting a missing one succeeds (ipset's -exist)."""
    data = []
    if ip:
        data.append(_ipset_ip(_IPSET_ATTR_IP, ip))
    if port is not None:
        data.append(_attr(_IPSET_ATTR_PORT | _NLA_F_NET_BYTEORDER, _BE16.pack(port)))
    if proto:
        data.append(_attr(_IPSET_ATTR_PROTO | _NLA_F_NET_BYTEORDER, bytes((proto,))))
    if ip2:
        addr, _, cidr = ip2.partition("/")
        data.append(_ipset_ip(_IPSET_ATTR_IP2, addr))
        if cidr:
            data.append(_attr(_IPSET_ATTR_CIDR2 | _NLA_F_NET_BYTEORDER, bytes((int(cidr),))))
    if comment is not None:
        data.append(_attr(_IPSET_ATTR_COMMENT, _cstr(comment)))
    if skbmark is not None:
        mark = struct.pack(">II", skbmark, 0xFFFFFFFF)
        data.append(_attr(_IPSET_ATTR_SKBMARK | _NLA_F_NET_BYTEORDER, mark))
    payload = struct.pack("=BBH", af, 0, 0)  # nfgenmsg: family, version 0, res_id 0
    payload += _attr(_IPSET_ATTR_PROTOCOL, bytes((_IPSET_PROTOCOL,)))
    payload += _attr(_IPSET_ATTR_SETNAME, _cstr(set_name))
    payload += _nested(_IPSET_ATTR_DATA, *data)
    return Request((_NFNL_SUBSYS_IPSET << 8) | cmd, 0, payload)


# --- addresses (rtnetlink) ---------------------------------------------------------------

RTM_NEWADDR = 20
RTM_DELADDR = 21
_RTM_GETADDR = 22
_IFA_ADDRESS, _IFA_LOCAL, _IFA_CACHEINFO, _IFA_FLAGS = 1, 2, 6, 8


def address(
    cmd: int,
    index: int,
    ip: str,
    *,
    scope: int = 0,
    flags: int = 0,
    preferred_lft: int | None = None,
    valid_lft: int | None = None,
) -> Request:
    """RTM_NEWADDR (exclusive create) or RTM_DELADDR of a host address on link `index`."""
    v6 = ":" in ip
    af = socket.AF_INET6 if v6 else socket.AF_INET
    packed = _packed_ip(ip)
    payload = struct.pack("=BBBBI", af, 128 if v6 else 32, flags & 0xFF, scope, index)
    payload += _attr(_IFA_LOCAL, packed) + _attr(_IFA_ADDRESS, packed)
    if cmd == RTM_NEWADDR:
        payload += _attr(_IFA_FLAGS, _U32.pack(flags))
        if preferred_lft is not None and valid_lft is not None:
            payload += _attr(_IFA_CACHEINFO, struct.pack("=IIII", preferred_lft, valid_lft, 0, 0))
        return Request(cmd, NLM_F_CREATE | NLM_F_EXCL, payload)
    return Request(cmd, 0, payload)


# --- the socket ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """A request the kernel refused: its index in the batch, errno and explanation."""

    index: int
    code: int
    message: str = ""

    def __str__(self) -> str:
        text = os.strerror(self.code) if self.code < 4096 else f"error {self.code}"
        return f"{text} ({self.message})" if self.message else text


class NetlinkError(OSError):
    """The conversation itself failed (not one request): socket error, timeout."""


class BatchSocket:
    """A netlink socket of one protocol in the calling thread's network namespace."""

    def __init__(self, protocol: int) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            for option in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(_SOL_NETLINK, option, 1)
                except OSError:
                    pass  # older kernels: full echoes, no explanations; still correct
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 4 << 20)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._sock.bind((0, 0))
            self._sock.settimeout(RECV_TIMEOUT_S)
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def request(self, req: Request) -> bytes:
        """Send one request and return the payload of its single answer (not an ACK)."""
        self._seq += 1
        seq = self._seq
        header = _HDR.pack(
            _HDR.size + len(req.payload), req.type, NLM_F_REQUEST | req.flags, seq, 0
        )
        self._send(header + req.payload)
        while True:
            for kind, flags, got_seq, body in self._receive():
                if got_seq != seq:
                    continue
                if kind == _NLMSG_ERROR:
                    failure = _failure(0, flags, body)
                    raise NetlinkError(failure.code, str(failure))
                return body

    def dump(self, req: Request) -> list[tuple[int, bytes]]:
        """Send a dump request; every answer's (type, payload) until NLMSG_DONE."""
        self._seq += 1
        seq = self._seq
        flags = NLM_F_REQUEST | NLM_F_DUMP | req.flags
        self._send(_HDR.pack(_HDR.size + len(req.payload), req.type, flags, seq, 0) + req.payload)
        out = []
        while True:
            for kind, flags, got_seq, body in self._receive():
                if got_seq != seq:
                    continue
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    failure = _failure(0, flags, body)
                    if not failure.code:
                        return out
                    raise NetlinkError(failure.code, str(failure))
                out.append((kind, body))

    def run(self, requests: Sequence[Request]) -> list[Failure]:
        """Send `requests` in order, BATCH_MAX per system call; the ones that failed.

        The kernel handles every request even after one failed, exactly as if each had
        been sent alone; the caller decides what a failure means.
        """
        failures: list[Failure] = []
        start = 0
        while start < len(requests):
            end = start
            size = 0
            while end < len(requests) and end - start < BATCH_MAX:
                size += _HDR.size + len(requests[end].payload)
                end += 1
                if size >= BATCH_BYTES:
                    break
            failures.extend(self._run_chunk(requests, start, end))
            start = end
        return failures

    def _run_chunk(self, requests: Sequence[Request], start: int, end: int) -> list[Failure]:
        first = self._seq + 1
        parts = []
        for i in range(start, end):
            req = requests[i]
            flags = NLM_F_REQUEST | req.flags | (NLM_F_ACK if i == end - 1 else 0)
            self._seq += 1
            parts.append(_HDR.pack(_HDR.size + len(req.payload), req.type, flags, self._seq, 0))
            parts.append(req.payload)
        last = self._seq
        self._send(b"".join(parts))
        failures = []
        while True:
            for kind, flags, seq, body in self._receive():
                if kind != _NLMSG_ERROR or not first <= seq <= last:
                    continue  # not an answer to this chunk
                failure = _failure(start + seq - first, flags, body)
                if failure.code:
                    failures.append(failure)
                if seq == last:
                    return failures

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, (0, 0))
        except OSError as e:
            raise NetlinkError(e.errno or errno.EIO, f"netlink send: {e}") from e

    def _receive(self) -> list[tuple[int, int, int, bytes]]:
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError as e:
            raise NetlinkError(errno.ETIMEDOUT, "no answer from the kernel") from e
        except OSError as e:
            # ENOBUFS: answers were dropped; the caller must not trust what it applied.
            raise NetlinkError(e.errno or errno.EIO, f"netlink receive: {e}") from e
        out = []
        offset = 0
        while offset + _HDR.size <= len(data):
            size, kind, flags, seq, _pid = _HDR.unpack_from(data, offset)
            if size < _HDR.size:
                break
            out.append((kind, flags, seq, data[offset + _HDR.size : offset + size]))
            offset += (size + 3) & ~3
        return out


def _failure(index: int, flags: int, body: bytes) -> Failure:
    """An NLMSG_ERROR body: a negative errno (0: ACK), the request's header, maybe TLVs."""
    code = -struct.unpack_from("=i", body)[0]
    message = ""
    if code and flags & _NLM_F_ACK_TLVS:
        # With CAP_ACK only the request's header is echoed; the TLVs follow it.
        offset = 4 + _HDR.size
        while offset + 4 <= len(body):
            size, kind = _NLA.unpack_from(body, offset)
            if size < 4:
                break
            if kind & 0x3FFF == _NLMSGERR_ATTR_MSG:
                message = body[offset + 4 : offset + size].rstrip(b"\0").decode(errors="replace")
            offset += (size + 3) & ~3
    return Failure(index, code, message)


# --- generic netlink family lookup -------------------------------------------------------

_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2


def genl_family_id(sock: BatchSocket, name: str) -> int:
    """The id of generic netlink family `name` (IPVS) in this namespace's kernel."""
    payload = struct.pack("=BBH", _CTRL_CMD_GETFAMILY, 1, 0)
    payload += _attr(_CTRL_ATTR_FAMILY_NAME, _cstr(name))
    body = sock.request(Request(_GENL_ID_CTRL, 0, payload))
    offset = 4  # genlmsghdr
    while offset + 4 <= len(body):
        size, kind = _NLA.unpack_from(body, offset)
        if size < 4:
            break
        if kind & 0x3FFF == _CTRL_ATTR_FAMILY_ID:
            return int(_U16.unpack_from(body, offset + 4)[0])
        offset += (size + 3) & ~3
    raise NetlinkError(errno.ENOENT, f"generic netlink family {name} has no id")


# --- dumps -------------------------------------------------------------------------------


def parse_attrs(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Netlink attributes as {type (flags stripped): payload}; a repeated type keeps the
    last (use `attr_list` for lists)."""
    return dict(attr_list(data, offset, end))


def attr_list(data: bytes, offset: int = 0, end: int | None = None) -> list[tuple[int, bytes]]:
    end = len(data) if end is None else end
    out = []
    while offset + 4 <= end:
        size, kind = _NLA.unpack_from(data, offset)
        if size < 4:
            break
        out.append((kind & 0x3FFF, data[offset + 4 : offset + size]))
        offset += (size + 3) & ~3
    return out


def ipvs_dump_services(sock: BatchSocket, family_id: int) -> list[dict[int, bytes]]:
    """Every virtual server's attributes (IPVS_SVC_ATTR_*)."""
    payload = struct.pack("=BBH", _IPVS_CMD_GET_SERVICE, _IPVS_GENL_VERSION, 0)
    out = []
    for _kind, body in sock.dump(Request(family_id, 0, payload)):
        outer = parse_attrs(body, 4)
        inner = outer.get(_IPVS_CMD_ATTR_SERVICE)
        if inner is not None:
            out.append(parse_attrs(inner))
    return out


def ipvs_dump_dests(sock: BatchSocket, family_id: int, key: bytes) -> list[dict[int, bytes]]:
    """The real servers' attributes (IPVS_DEST_ATTR_*) of the virtual server `key`."""
    payload = struct.pack("=BBH", _IPVS_CMD_GET_DEST, _IPVS_GENL_VERSION, 0)
    payload += _nested(_IPVS_CMD_ATTR_SERVICE, key)
    out = []
    for _kind, body in sock.dump(Request(family_id, 0, payload)):
        inner = parse_attrs(body, 4).get(_IPVS_CMD_ATTR_DEST)
        if inner is not None:
            out.append(parse_attrs(inner))
    return out


def ipset_dump(sock: BatchSocket) -> list[tuple[dict[int, bytes], list[bytes]]]:
    """Every set: (its top-level IPSET_ATTR_*, its entries' raw IPSET_ATTR_DATA payloads).
    A big set comes in several messages, each naming it again."""
    payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    payload += _attr(_IPSET_ATTR_PROTOCOL, bytes((_IPSET_PROTOCOL,)))
    req = Request((_NFNL_SUBSYS_IPSET << 8) | _IPSET_CMD_LIST, 0, payload)
    out = []
    for _kind, body in sock.dump(req):
        top = parse_attrs(body, 4)
        entries = [data for _k, data in attr_list(top.get(_IPSET_ATTR_ADT, b""))]
        out.append((top, entries))
    return out


def address_dump(sock: BatchSocket) -> list[tuple[int, str]]:
    """Every address of the namespace as (interface index, canonical text)."""
    req = Request(_RTM_GETADDR, 0, struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0))
    out = []
    for kind, body in sock.dump(req):
        if kind != RTM_NEWADDR or len(body) < 8:
            continue
        af, _plen, _flags, _scope, index = struct.unpack_from("=BBBBI", body)
        attrs = parse_attrs(body, 8)
        raw = attrs.get(_IFA_ADDRESS) or attrs.get(_IFA_LOCAL)
        if raw is None or af not in (socket.AF_INET, socket.AF_INET6):
            continue
        out.append((index, socket.inet_ntop(af, raw[: 4 if af == socket.AF_INET else 16])))
    return out


_IPSET_ATTR_FLAGS = 6
_IPSET_FLAG_LIST_HEADER = 1 << 2
_IPSET_ATTR_ELEMENTS = 24


def ipset_sizes(sock: BatchSocket) -> dict[str, int | None]:
    """Every set's number of entries from the headers alone (no entries are listed);
    None where the kernel does not say."""
    payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    payload += _attr(_IPSET_ATTR_PROTOCOL, bytes((_IPSET_PROTOCOL,)))
    payload += _attr(_IPSET_ATTR_FLAGS, struct.pack(">I", _IPSET_FLAG_LIST_HEADER))
    req = Request((_NFNL_SUBSYS_IPSET << 8) | _IPSET_CMD_LIST, 0, payload)
    out: dict[str, int | None] = {}
    for _kind, body in sock.dump(req):
        top = parse_attrs(body, 4)
        name = top.get(_IPSET_ATTR_SETNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
        if not name:
            continue
        elements = parse_attrs(top.get(_IPSET_ATTR_DATA, b"")).get(_IPSET_ATTR_ELEMENTS)
        out[name] = struct.unpack(">I", elements[:4])[0] if elements else out.get(name)
    return out
