"""Echo servers that say who answered and whom they saw.

Owns the harness's server side: every reply is the line
``"<server-name> <client-ip> <client-port>\\n"``, so a test can tell which
backend served a request and whether the client's source address survived
the trip. One `EchoServer` serves any number of names, namespaces, ports and
both families from a single background thread (non-blocking sockets and a
selector), which keeps thousands of short connections per second cheap and
needs no process per pod.

Protocols:
- TCP: read one line (or until the client half-closes, or a short timeout),
  answer the line, close. If the first line is an HTTP request line, speak
  HTTP/1.x instead: ``200 OK`` with the line as body, keep-alive honoured
  (wrk, ``ab -k``) and ``Connection: close`` / HTTP/1.0 honoured (ab, curl).
- UDP: answer each datagram with the line, from the address it was sent to.

Run standalone (e.g. under ``ip netns exec``) with
``python -m lbd.testing.echo --name N --tcp 8080 --udp 8080``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import re
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lbd.testing.netns import socket_in

# Python does not export IP_PKTINFO; this is Linux's value.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
LISTEN_BACKLOG = 4096
_REQUEST_LINE = re.compile(rb"^[A-Z]+ \S+ HTTP/(1\.[01])\r?$")
_MAX_REQUEST = 64 * 1024


def _client_ip(addr: tuple) -> str:
    ip = addr[0]
    # A v4 client on a dual-stack socket shows up v4-mapped; report it as v4.
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip.split("%", 1)[0]


@dataclass
class _Conn:
    sock: socket.socket
    name: str
    line: bytes
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    http: bool = False
    close_after_write: bool = False
    peer_closed: bool = False
    # Whether the selector also watches for writability (only while a reply
    # is stuck in the send buffer; avoids an epoll_ctl per connection).
    writing: bool = False


@dataclass
class EchoStats:
    tcp_connections: int = 0
    http_requests: int = 0
    udp_datagrams: int = 0


class EchoServer:
    """Serves the echo protocol for many (name, namespace, port) listeners in one thread.

    Usage::

        srv = EchoServer()
        srv.listen("pod-1-1", "lbdtab12-n1p1", tcp_ports=(8080,), udp_ports=(8080,))
        srv.start()
        ...
        srv.stop()
    """

    def __init__(self, *, line_timeout: float = 0.5, idle_timeout: float = 300.0) -> None:
        # How long a plain TCP client may stay silent before it gets its line
        # anyway (lets "connect and read" clients work), and how long an idle
        # HTTP keep-alive connection is kept: long enough for a test's established
        # connection to outlive a large sync under emulation (a minute or more in the
        # VM), so that a closed connection means the datapath broke it.
        self.line_timeout = line_timeout
        self.idle_timeout = idle_timeout
        self.stats = EchoStats()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._pending: list[tuple[str, socket.socket, str]] = []
        self._listeners: list[socket.socket] = []
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- configuration -------------------------------------------------------

    def listen(
        self,
        name: str,
        netns: str | None,
        *,
        tcp_ports: Iterable[int] = (),
        udp_ports: Iterable[int] = (),
        families: Sequence[int] = (socket.AF_INET, socket.AF_INET6),
        address: str | None = None,
    ) -> list[tuple[str, int, int]]:
        """Open listeners answering as `name` inside `netns` (None: this namespace).

        Binds the wildcard address of each family unless `address` is given.
        May be called before or after `start`. Returns (proto, family, port)
        for each socket opened; with port 0 the kernel-chosen port is returned.
        """
        opened = []
        for family in families:
            if address is not None and (":" in address) != (family == socket.AF_INET6):
                continue
            host = address if address is not None else ("::" if family == socket.AF_INET6 else "")
            for port in tcp_ports:
                s = socket_in(netns, family, socket.SOCK_STREAM)
                self._prepare(s, family)
                s.bind((host, port))
                s.listen(LISTEN_BACKLOG)
                opened.append(("tcp", family, s.getsockname()[1]))
                self._add("tcp", s, name)
            for port in udp_ports:
                s = socket_in(netns, family, socket.SOCK_DGRAM)
                self._prepare(s, family)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                s.bind((host, port))
                opened.append(("udp", family, s.getsockname()[1]))
                self._add("udp", s, name)
        return opened

    @staticmethod
    def _prepare(s: socket.socket, family: int) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # One socket per family keeps client addresses unmapped and lets a
            # v4-only namespace work.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setblocking(False)

    def _add(self, kind: str, s: socket.socket, name: str) -> None:
        with self._lock:
            self._listeners.append(s)
            if self._thread is None:
                self._sel.register(s, selectors.EVENT_READ, (kind, name))
                return
            # The loop thread owns the selector once running.
            self._pending.append((kind, s, name))
        self._wake()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> EchoServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="echo-server", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until `stop` is called (from a signal handler)."""
        with self._lock:
            self._thread = threading.current_thread()
        self._loop()

    def shutdown(self) -> None:
        """Ask the loop to end soon; safe from a signal handler. `stop` also closes."""
        self._stop.set()
        self._wake()

    def stop(self) -> None:
        """Stop serving and close every socket. Idempotent."""
        if self._closed:
            return
        self.shutdown()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._closed = True
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the loop --------------------------------------------------------------

    def _loop(self) -> None:
        next_sweep = time.monotonic() + 0.1
        while not self._stop.is_set():
            for key, events in self._sel.select(timeout=0.1):
                kind, name = key.data
                try:
                    if kind == "conn":
                        self._on_conn(key.fd, events)
                    elif kind == "tcp":
                        self._accept(key.fileobj, name)
                    elif kind == "udp":
                        self._datagrams(key.fileobj, name)
                    else:
                        self._drain_wake()
                except Exception:
                    # One bad client or socket must never take the server down.
                    if kind == "conn":
                        self._close(key.fd)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.1
                self._expire(now)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            pending, self._pending = self._pending, []
        for kind, s, name in pending:
            self._sel.register(s, selectors.EVENT_READ, (kind, name))

    def _accept(self, listener: socket.socket, name: str) -> None:
        # Drain the backlog in one go; a burst of clients should not cost a
        # selector round trip each.
        for _ in range(256):
            try:
                s, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            self.stats.tcp_connections += 1
            s.setblocking(False)
            line = f"{name} {_client_ip(addr)} {addr[1]}\n".encode()
            conn = _Conn(s, name, line, time.monotonic() + self.line_timeout)
            self._conns[s.fileno()] = conn
            self._sel.register(s, selectors.EVENT_READ, ("conn", name))
            # The request often arrives with (or right after) the handshake.
            self._on_conn(s.fileno(), selectors.EVENT_READ)

    def _on_conn(self, fd: int, events: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        if events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except ConnectionError:
                self._close(fd)
                return
            if data == b"":
                conn.peer_closed = True
            elif data:
                conn.inbuf += data
            self._process(conn)
            if self._conns.get(fd) is not conn:
                return
        if conn.outbuf:
            self._flush(conn)

    def _process(self, conn: _Conn) -> None:
        if not conn.http:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                # A half-closed (or absurdly chatty) client gets its line now.
                if conn.peer_closed or len(conn.inbuf) > _MAX_REQUEST:
                    self._respond(conn, conn.line, close=True)
                return
            if not _REQUEST_LINE.match(bytes(conn.inbuf[:nl])):
                self._respond(conn, conn.line, close=True)
                return
            conn.http = True
        self._process_http(conn)

    def _process_http(self, conn: _Conn) -> None:
        # Answer every complete request in the buffer (pipelining is legal).
        while True:
            end = conn.inbuf.find(b"\r\n\r\n")
            sep = 4
            if end < 0:
                end, sep = conn.inbuf.find(b"\n\n"), 2
            if end < 0:
                if conn.peer_closed or len(conn.inbuf) > _MAX_REQUEST:
                    # Let a reply still in flight finish before closing.
                    if conn.outbuf:
                        conn.close_after_write = True
                    else:
                        self._close(conn.sock.fileno())
                return
            head = bytes(conn.inbuf[:end]).decode("latin-1").split("\n")
            request_line = head[0].rstrip("\r")
            match = _REQUEST_LINE.match(request_line.encode("latin-1"))
            if match is None:
                self._close(conn.sock.fileno())
                return
            headers = {}
            for h in head[1:]:
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip().lower()
            try:
                body_len = max(0, int(headers.get("content-length", "0") or 0))
            except ValueError:
                self._close(conn.sock.fileno())
                return
            total = end + sep + body_len
            if len(conn.inbuf) < total:
                return
            del conn.inbuf[:total]
            version = match.group(1).decode()
            connection = headers.get("connection", "")
            if version == "1.0":
                keep = "keep-alive" in connection
            else:
                keep = "close" not in connection
            self.stats.http_requests += 1
            body = conn.line
            head_only = request_line.startswith("HEAD ")
            response = (
                f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
            ).encode() + (b"" if head_only else body)
            self._respond(conn, response, close=not keep)
            if not keep or self._conns.get(conn.sock.fileno()) is not conn:
                return
            conn.deadline = time.monotonic() + self.idle_timeout

    def _respond(self, conn: _Conn, data: bytes, *, close: bool) -> None:
        conn.outbuf += data
        conn.close_after_write = conn.close_after_write or close
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except ConnectionError:
            self._close(fd)
            return
        del conn.outbuf[:sent]
        if conn.outbuf:
            if not conn.writing:
                conn.writing = True
                events = selectors.EVENT_READ | selectors.EVENT_WRITE
                self._sel.modify(conn.sock, events, ("conn", conn.name))
            return
        if conn.close_after_write:
            self._close(fd)
            return
        if conn.writing:
            conn.writing = False
            self._sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn.name))

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _expire(self, now: float) -> None:
        for fd, conn in list(self._conns.items()):
            if now < conn.deadline:
                continue
            if conn.http or conn.outbuf:
                self._close(fd)
            else:
                # A silent plain client still gets its line.
                self._respond(conn, conn.line, close=True)

    def _datagrams(self, s: socket.socket, name: str) -> None:
        for _ in range(256):
            try:
                _, anc, _, addr = s.recvmsg(65536, 256)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                # An ICMP error for an earlier reply; nothing to do.
                continue
            self.stats.udp_datagrams += 1
            reply = f"{name} {_client_ip(addr)} {addr[1]}\n".encode()
            with contextlib.suppress(OSError):
                s.sendmsg([reply], _reply_source(s.family, anc), 0, addr)


def _reply_source(family: int, anc: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes a UDP reply leave from the address the request hit.

    Without it a wildcard-bound socket picks its source by route, which
    breaks the reply whenever the request was sent to a secondary address.
    """
    for level, kind, data in anc:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            _ifindex, _spec_dst, dst = struct.unpack("i4s4s", data[:12])
            return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, dst, b"\0" * 4))]
        if (
            family == socket.AF_INET6
            and level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
        ):
            dst6, _ifindex = struct.unpack("16si", data[:20])
            if ipaddress.IPv6Address(dst6).is_multicast:
                return []
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("16si", dst6, 0))]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbd.testing.echo",
        description="Answer TCP/HTTP/UDP requests with '<name> <client-ip> <client-port>'.",
    )
    parser.add_argument("--name", default=socket.gethostname(), help="name put in every reply")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP port (repeat)")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port (repeat)")
    parser.add_argument("--address", help="bind this address instead of both wildcards")
    parser.add_argument("--no-ipv6", action="store_true", help="IPv4 only")
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("give at least one --tcp or --udp port")
    families = [socket.AF_INET] if args.no_ipv6 else [socket.AF_INET, socket.AF_INET6]
    server = EchoServer()
    server.listen(
        args.name,
        None,
        tcp_ports=args.tcp,
        udp_ports=args.udp,
        families=families,
        address=args.address,
    )

    def _stop(signum: int, frame: object) -> None:
        server.shutdown()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"echo {args.name} ready tcp={args.tcp} udp={args.udp}", flush=True)
    server.serve_forever()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
