"""The C traffic tools of the data-plane benchmark: their command lines and their output.

Owns how wrk, iperf3 and sockperf (Debian packages, never a Python client, which would
measure itself) are invoked for each measurement, and the parsers that turn what they
print into numbers. Pure functions: nothing here runs a process, so the parsers are
tested on the tools' real output (tests/bench).

Every parser returns a dict of plain numbers and raises `ToolFailed` when the tool did
not measure what was asked (a refused connection, no reply, zero requests): a number
from a run that did not work must never reach a table.
"""

from __future__ import annotations

import json
import re
from typing import Any

JSON = dict[str, Any]

# Ports inside the server pod. The HTTP server listens on 8080 (a Service's usual
# targetPort); iperf3 and sockperf on their own defaults.
HTTP_PORT = 8080
IPERF_PORT = 5201
SOCKPERF_PORT = 11111


class ToolFailed(RuntimeError):
    """The tool ran but did not produce a valid measurement."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Latencies are kept in microseconds: a pod-to-pod round trip is tens of them, and
# results.json rounds floats to 6 decimals, which in seconds would leave 2 digits.
_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _microseconds(text: str) -> float:
    """wrk's time format: "180.00us", "2.27ms", "1.00s", "1.00m"."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ToolFailed(f"not a wrk time: {text!r}")
    return float(m.group(1)) * _US[m.group(2)]


# --------------------------------------------------------------------------------------
# wrk: HTTP, new connections per second and kept-alive latency


def wrk_argv(url: str, *, connections: int, seconds: float, close: bool) -> list[str]:
    """One wrk thread (the client must not eat the core the server needs on a small
    machine); `close`: one request per connection (`Connection: close`, so wrk opens a
    new connection for every request), else kept-alive connections with the latency
    distribution."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "2s"]
    argv += ["-H", "Connection: close"] if close else ["--latency"]
    return [*argv, url]


def parse_wrk(stdout: str) -> JSON:
    """{"requests", "duration_s", "requests_per_s", "errors": {...}, "non_2xx",
    "latency_us": {"p50", "p75", "p90", "p99"} (only with --latency)}."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", stdout, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", stdout, re.MULTILINE)
    if not m or not rate:
        raise ToolFailed(f"wrk printed no result: {stdout.strip()[-300:]!r}")
    out: JSON = {
        "requests": int(m.group(1)),
        "duration_s": _microseconds(m.group(2)) / 1e6,
        "requests_per_s": float(rate.group(1)),
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non_2xx": 0,
    }
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout
    )
    if errors:
        kinds = ("connect", "read", "write", "timeout")
        out["errors"] = dict(zip(kinds, map(int, errors.groups()), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    if non_2xx:
        out["non_2xx"] = int(non_2xx.group(1))
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)\s*$", stdout, re.MULTILINE))
    if dist:
        out["latency_us"] = {f"p{q}": _microseconds(v) for q, v in dist.items()}
    if out["requests"] == 0:
        raise ToolFailed(f"wrk completed no request (errors {out['errors']})")
    # A run where a noticeable share of attempts failed measured something else (a
    # refusing or black-holing path), not the rate of working connections.
    failed = out["errors"]["connect"] + out["errors"]["timeout"] + out["non_2xx"]
    if failed > max(10, out["requests"] // 100):
        raise ToolFailed(
            f"wrk: {failed} failed of {out['requests']} requests "
            f"(errors {out['errors']}, non-2xx {out['non_2xx']})"
        )
    return out


# --------------------------------------------------------------------------------------
# iperf3: bulk TCP throughput


def iperf3_argv(host: str, port: int, *, seconds: float) -> list[str]:
    # -O 1: the first second (slow start) is not counted.
    secs = str(max(1, round(seconds)))
    return ["iperf3", "-c", host, "-p", str(port), "-t", secs, "-O", "1", "-J"]


def parse_iperf3(stdout: str) -> JSON:
    """{"bits_per_s" (received), "sent_bits_per_s", "retransmits", "duration_s"}."""
    try:
        data = json.loads(stdout)
    except ValueError:
        raise ToolFailed(f"iperf3 printed no JSON: {stdout.strip()[-300:]!r}") from None
    if data.get("error"):
        raise ToolFailed(f"iperf3: {data['error']}")
    try:
        sent, received = data["end"]["sum_sent"], data["end"]["sum_received"]
        out = {
            "bits_per_s": float(received["bits_per_second"]),
            "sent_bits_per_s": float(sent["bits_per_second"]),
            "retransmits": int(sent.get("retransmits", 0)),
            "duration_s": float(received["seconds"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ToolFailed(f"iperf3 JSON without a result ({e})") from None
    if out["bits_per_s"] <= 0:
        raise ToolFailed("iperf3 received nothing")
    return out


# --------------------------------------------------------------------------------------
# sockperf: UDP request/response latency


def sockperf_server_argv(port: int) -> list[str]:
    return ["sockperf", "server", "-i", "0.0.0.0", "-p", str(port)]


def sockperf_argv(host: str, port: int, *, seconds: float) -> list[str]:
    # --full-rtt reports round trips (the default halves them into a one-way estimate).
    # sockperf spends the first 0.4 s warming up, which it does not count.
    secs = str(max(1, round(seconds)))
    return ["sockperf", "ping-pong", "-i", host, "-p", str(port), "-t", secs, "--full-rtt"]


def parse_sockperf(stdout: str) -> JSON:
    """{"observations", "rtt_us": {"avg", "p50", "p90", "p99", "max"}, "dropped",
    "messages_per_s"}."""
    text = _ANSI.sub("", stdout)
    if "No messages were received" in text:
        raise ToolFailed("sockperf: no reply from the server")
    obs = re.search(r"Total (\d+) observations", text)
    avg = re.search(r"avg-rtt=([\d.]+)", text)
    valid = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+)", text)
    pct = {float(q): float(v) for q, v in re.findall(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)", text)}
    top = re.search(r"<MAX> observation\s*=\s*([\d.]+)", text)
    if not obs or not avg or not pct or not valid:
        raise ToolFailed(f"sockperf printed no statistics: {text.strip()[-300:]!r}")
    try:
        rtt = {
            "avg": float(avg.group(1)),
            "p50": pct[50.0],
            "p90": pct[90.0],
            "p99": pct[99.0],
            "max": float(top.group(1)) if top else None,
        }
    except KeyError as e:
        raise ToolFailed(f"sockperf printed no percentile {e}") from None
    dropped = re.search(r"# dropped messages = (\d+)", text)
    runtime = float(valid.group(1))
    return {
        "observations": int(obs.group(1)),
        "rtt_us": rtt,
        "dropped": int(dropped.group(1)) if dropped else 0,
        "messages_per_s": int(obs.group(1)) / runtime if runtime > 0 else None,
    }


# --------------------------------------------------------------------------------------
# Versions, for the record


VERSION_ARGV = {
    "wrk": ["wrk", "-v"],
    "iperf3": ["iperf3", "-v"],
    "sockperf": ["sockperf", "--version"],
    "nginx": ["nginx", "-v"],
}


def first_line(text: str) -> str:
    """The tool's first non-empty line, without colour codes."""
    for line in _ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""
