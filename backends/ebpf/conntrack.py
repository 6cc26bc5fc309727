"""Which lbd_ct entries to delete (pure): idle flows, and UDP flows to departed backends.

The datapath creates conntrack entries in pairs (the forward tuple as the client sends it,
the reply tuple as the backend answers) and refreshes each on every packet; the LRU map
evicts under pressure but never expires anything. The control plane therefore deletes
pairs that went idle (per-protocol timeouts, much shorter once a TCP FIN/RST was seen or
while a TCP flow never got a reply), and, after a sync, UDP pairs whose backend left the
frontend (kube-proxy's UDP conntrack hygiene: a client that keeps sending would otherwise
stick to a dead backend forever). Both members of a pair always get the same verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from backends.ebpf.plan import MapView
from bpf_lb.maps import (
    CT_CLOSING,
    CT_FORWARD,
    CT_REPLY,
    CT_SEEN_REPLY,
    CT_SNAT,
    PROTO_TCP,
    PROTO_UDP,
    CtEntry,
    CtTuple,
)

_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class CtTimeouts:
    """Idle timeouts in seconds (Cilium's defaults)."""

    tcp: float = 21600.0  # established
    tcp_syn: float = 60.0  # no reply seen yet
    tcp_closing: float = 10.0  # FIN or RST seen
    other: float = 60.0  # UDP and the rest


def partner(key: CtTuple, val: CtEntry) -> CtTuple:
    """The other entry of the pair `key` belongs to."""
    if key.dir == CT_FORWARD:
        snat = bool(val.flags & CT_SNAT)
        return CtTuple(
            saddr=val.addr,
            daddr=val.addr2 if snat else key.saddr,
            sport=val.port,
            dport=val.port2 if snat else key.sport,
            proto=key.proto,
            family=key.family,
            dir=CT_REPLY,
        )
    return CtTuple(
        saddr=val.addr2,
        daddr=val.addr,
        sport=val.port2,
        dport=val.port,
        proto=key.proto,
        family=key.family,
        dir=CT_FORWARD,
    )


def timeout_of(proto: int, flags: int, t: CtTimeouts) -> float:
    if proto != PROTO_TCP:
        return t.other
    if flags & CT_CLOSING:
        return t.tcp_closing
    if not flags & CT_SEEN_REPLY:
        return t.tcp_syn
    return t.tcp


def expired(
    entries: Mapping[CtTuple, CtEntry], now_ns: int, timeouts: CtTimeouts | None = None
) -> list[CtTuple]:
    """Entries whose pair has been idle longer than its timeout (`now_ns`: CLOCK_MONOTONIC)."""
    t = timeouts or CtTimeouts()
    out = []
    for key, val in entries.items():
        other = entries.get(partner(key, val))
        last = max(val.last_seen_ns, other.last_seen_ns if other else 0)
        flags = val.flags | (other.flags if other else 0)
        if now_ns - last > timeout_of(key.proto, flags, t) * _NS:
            out.append(key)
    return sorted(out)


def frontend_backends(view: MapView) -> dict[int, set[tuple[str, int]]]:
    """rev-NAT id → the backend addresses its frontend entries (both scopes) list."""
    return {rid: _rid_backends(view, rid) for rid in view.index().rid_fes}


def _rid_backends(view: MapView, rid: int) -> set[tuple[str, int]]:
    ix = view.index()
    return {(b.addr, b.port) for fe in ix.rid_fes.get(rid, ()) for b in view.live_backends(fe)}


def stale_udp(entries: Mapping[CtTuple, CtEntry], view: MapView) -> list[CtTuple]:
    """UDP entries whose backend is no longer one of its frontend's (or whose frontend is
    gone): deleting them lets the client's next datagram pick a live backend."""
    live: dict[int, set[tuple[str, int]]] = {}  # only the frontends UDP flows name
    out = []
    for key, val in entries.items():
        if key.proto != PROTO_UDP:
            continue
        backends = live.get(val.rev_nat_id)
        if backends is None:
            backends = live[val.rev_nat_id] = _rid_backends(view, val.rev_nat_id)
        backend = (val.addr, val.port) if key.dir == CT_FORWARD else (key.saddr, key.sport)
        if backend not in backends:
            out.append(key)
    return sorted(out)
