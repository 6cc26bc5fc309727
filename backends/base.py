"""The Backend protocol every proxy mode implements, and the types it returns.

The sync runner calls a backend from a worker thread (applying touches the kernel and
may block); a backend is never called concurrently with itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lbd.model.state import ProxyState


class HostUnsupported(Exception):
    """The host cannot run this mode; the message is one sentence for the operator."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    full: bool  # False: a partial sync that rewrote only what changed
    changed_service_ports: int = 0  # service ports whose datapath entries were rewritten
    detail: dict[str, int] = field(default_factory=dict)  # backend-specific counters
    # Sync again after this many seconds even if nothing changes (the kernel holds a
    # transitional state the backend finishes later, e.g. IPVS real servers draining).
    resync_after: float | None = None


@dataclass(frozen=True, slots=True)
class FrontendStatus:
    """One frontend as read back from the kernel (for `lbd status`)."""

    service: str  # "namespace/name:port" as found in the kernel's comments/keys
    kind: str  # ClusterIP | NodePort | LoadBalancer | ExternalIP
    frontend: str  # "ip:port/proto" (node ports: "*:port/proto" or "ip:port/proto")
    endpoints: tuple[str, ...]  # "ip:port"


class Backend(Protocol):
    mode: str

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        """Make the kernel implement `state`. Raises on failure (the runner retries)."""
        ...

    def needs_full_sync(self) -> bool:
        """True when lbd's kernel state vanished under it (canary gone): resync at once."""
        ...

    def status(self) -> list[FrontendStatus]:
        """What the kernel holds now, read back from the kernel itself."""
        ...

    def cleanup(self) -> None:
        """Remove everything this mode created, and nothing else."""
        ...
