"""Client side of the harness: requests sent from inside a namespace.

Owns one-shot TCP/UDP requests against the echo protocol (see
`lbd.testing.echo`), failure classification (refused vs timeout vs reset vs
unreachable, because a test about a rejected Service must not pass on a
timeout), summaries of which backends answered (`spread`), and steady
background traffic for tests that demand zero failed requests
(`SteadyTraffic`). Sockets are created in the namespace with `socket_in`, so
no process is spawned per request.

For clients that must be a process of their own (e.g. one placed in a cgroup
for socket-level load balancing), run under ``ip netns exec``:
``python -m lbd.testing.traffic tcp IP PORT --count N --json``.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lbd.testing.netns import socket_in

Proto = Literal["tcp", "udp"]


@dataclass(frozen=True)
class Reply:
    """What the echo server said: who answered and the client address it saw."""

    pod: str
    client_ip: str
    client_port: int

    @classmethod
    def parse(cls, data: bytes) -> Reply:
        text = data.decode("utf-8", "replace")
        # Tolerate an HTTP response: the echo line is its body.
        if text.startswith("HTTP/"):
            text = text.split("\r\n\r\n", 1)[-1]
        parts = text.strip().split()
        if len(parts) != 3 or not parts[2].isdigit():
            raise BadReply(f"unexpected reply {data[:80]!r}")
        return cls(parts[0], parts[1], int(parts[2]))


class RequestError(Exception):
    """A request failed; `kind` names how, for counting and asserting."""

    kind: ClassVar[str] = "error"


class RequestRefused(RequestError):
    """The target actively refused (TCP RST, or ICMP port/admin unreachable)."""

    kind = "refused"


class RequestTimeout(RequestError):
    """No answer within the timeout (dropped somewhere)."""

    kind = "timeout"


class RequestReset(RequestError):
    """An established connection was reset or closed before a full reply."""

    kind = "reset"


class RequestUnreachable(RequestError):
    """No route to the target (reported locally or by ICMP host/net unreachable)."""

    kind = "unreachable"


class BadReply(RequestError):
    """Something answered, but not with the echo protocol."""

    kind = "bad-reply"


def _classify(exc: OSError, what: str) -> RequestError:
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"{what}: timed out")
    if isinstance(exc, ConnectionRefusedError):
        return RequestRefused(f"{what}: connection refused")
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return RequestReset(f"{what}: {exc.strerror or exc}")
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return RequestUnreachable(f"{what}: {exc.strerror}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        # An ICMP "administratively prohibited" (REJECT) surfaces this way.
        return RequestRefused(f"{what}: {exc.strerror}")
    return RequestError(f"{what}: {exc}")


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def tcp_request(
    ns: str | None,
    ip: str,
    port: int,
    timeout: float = 2.0,
    *,
    source: str | None = None,
) -> Reply:
    """Connect from namespace `ns`, send a line, and return the echo reply.

    `timeout` bounds the whole exchange. Raises a `RequestError` subclass.
    """
    what = f"tcp {ip}:{port}"
    deadline = time.monotonic() + timeout
    s = socket_in(ns, _family(ip), socket.SOCK_STREAM)
    try:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((ip, port))
        s.sendall(b"ping\n")
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            s.settimeout(remaining)
            data = s.recv(4096)
            if not data:
                break
            chunks.append(data)
    except OSError as exc:
        raise _classify(exc, what) from None
    finally:
        s.close()
    if not chunks:
        raise RequestReset(f"{what}: closed without a reply")
    return Reply.parse(b"".join(chunks))


def udp_request(
    ns: str | None,
    ip: str,
    port: int,
    timeout: float = 1.0,
    *,
    source: str | None = None,
) -> Reply:
    """Send one datagram from namespace `ns` and return the echo reply.

    The socket is connected, so an ICMP port unreachable comes back as
    `RequestRefused` rather than a timeout.
    """
    what = f"udp {ip}:{port}"
    s = socket_in(ns, _family(ip), socket.SOCK_DGRAM)
    try:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((ip, port))
        s.send(b"ping\n")
        data = s.recv(4096)
    except OSError as exc:
        raise _classify(exc, what) from None
    finally:
        s.close()
    return Reply.parse(data)


def request(ns: str | None, ip: str, port: int, proto: Proto = "tcp", **kwargs) -> Reply:
    if proto == "tcp":
        return tcp_request(ns, ip, port, **kwargs)
    if proto == "udp":
        return udp_request(ns, ip, port, **kwargs)
    raise ValueError(f"unknown protocol {proto!r}")


@dataclass
class Spread:
    """Which backends answered a series of requests, and what the servers saw."""

    pods: Counter[str] = field(default_factory=Counter)
    client_ips: set[str] = field(default_factory=set)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return sum(self.pods.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "pods": dict(sorted(self.pods.items())),
            "client_ips": sorted(self.client_ips),
            "failures": dict(sorted(self.failures.items())),
        }


def spread(
    ns: str | None,
    ip: str,
    port: int,
    proto: Proto = "tcp",
    count: int = 50,
    timeout: float | None = None,
) -> Spread:
    """Send `count` requests and summarise who answered; failures are counted by kind."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    result = Spread()
    for _ in range(count):
        try:
            reply = request(ns, ip, port, proto, **kwargs)
        except RequestError as exc:
            result.failures[exc.kind] += 1
            continue
        result.pods[reply.pod] += 1
        result.client_ips.add(reply.client_ip)
    return result


@dataclass(frozen=True)
class Sample:
    """One request of a `SteadyTraffic` run. `at` is `time.monotonic()` at send time."""

    at: float
    ok: bool
    latency: float
    pod: str | None = None
    client_ip: str | None = None
    error: str | None = None
    detail: str | None = None


class SteadyTraffic:
    """Background requests at a fixed rate, every outcome recorded with a timestamp.

    ::

        with SteadyTraffic(c.external.netns, "203.0.113.10", 80, rate=20) as t:
            restart_the_daemon()
        assert t.failures == []

    Requests are sequential; a slot missed because a request hung is
    skipped rather than made up with a burst, so the rate never exceeds `rate`.
    """

    def __init__(
        self,
        ns: str | None,
        ip: str,
        port: int,
        proto: Proto = "tcp",
        rate: float = 20.0,
        timeout: float = 1.0,
    ) -> None:
        self.ns, self.ip, self.port, self.proto = ns, ip, port, proto
        self.interval = 1.0 / rate
        self.timeout = timeout
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SteadyTraffic:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steady-traffic", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)

    def __enter__(self) -> SteadyTraffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                reply = request(self.ns, self.ip, self.port, self.proto, timeout=self.timeout)
            except RequestError as exc:
                sample = Sample(
                    start, False, time.monotonic() - start, error=exc.kind, detail=str(exc)
                )
            else:
                sample = Sample(start, True, time.monotonic() - start, reply.pod, reply.client_ip)
            with self._lock:
                self._samples.append(sample)
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval - ((now - next_at) % self.interval)
            self._stop.wait(next_at - now)

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    @property
    def successes(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    def pods(self, since: float | None = None) -> Counter[str]:
        """Backends that answered (optionally only requests sent at or after `since`)."""
        return Counter(
            s.pod for s in self.samples if s.ok and s.pod and (since is None or s.at >= since)
        )

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least `n` samples exist; False if `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._samples) >= n:
                    return True
            time.sleep(0.01)
        return False

    def summary(self) -> dict:
        samples = self.samples
        failures = Counter(s.error for s in samples if not s.ok)
        return {
            "sent": len(samples),
            "ok": sum(1 for s in samples if s.ok),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "pods": dict(Counter(s.pod for s in samples if s.ok)),
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbd.testing.traffic",
        description="Send echo requests from this process's namespace and summarise who answered."
        " Exit status 1 if any request failed.",
    )
    parser.add_argument("proto", choices=["tcp", "udp"])
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    result = spread(None, args.ip, args.port, args.proto, args.count, args.timeout)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for pod, n in sorted(result.pods.items()):
            print(f"{pod} {n}")
        for kind, n in sorted(result.failures.items()):
            print(f"FAILED {kind} {n}")
        print("client ips:", " ".join(sorted(result.client_ips)))
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
