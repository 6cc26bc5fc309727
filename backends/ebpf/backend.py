"""EbpfBackend: the Backend protocol for the eBPF mode.

Owns the sync policy: load (or re-adopt) the datapath on first use, diff the desired maps
against lbd's model of the kernel (re-read from the kernel on full syncs and after any
failure), write only the differences, clean UDP conntrack entries of departed backends,
and run the conntrack/affinity garbage collector. Also reads the kernel back for status
and removes everything on cleanup. The programs and the map layouts live in bpf_lb/.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog
from prometheus_client import Gauge

from backends.base import FrontendStatus, HostUnsupported, SyncResult
from backends.ebpf import conntrack
from backends.ebpf.loader import (
    Datapath,
    LoaderError,
    MapSizes,
    ensure_cgroup2,
    netns_cookie,
)
from backends.ebpf.plan import (
    BACKENDS,
    SERVICES,
    FrontendCache,
    MapView,
    Op,
    PlanOptions,
    check_capacity,
    plan,
)
from bpf_lb import bpfsys
from bpf_lb.maglev import DEFAULT_TABLE_SIZE
from bpf_lb.maps import (
    SCOPE_EXT,
    SVC_EXTERNAL_IP,
    SVC_LOADBALANCER,
    SVC_NODEPORT,
)
from lbd.config import ProxyConfig
from lbd.model.build import gc_paused
from lbd.model.state import ProxyState

log = structlog.get_logger("lbd.backends.ebpf")

# Fill levels, as Cilium's bpf_map_pressure: a map that fills refuses the next state.
MAP_ENTRIES = Gauge("lbd_bpf_map_entries", "Entries in one of lbd's BPF maps", ["map"])
MAP_PRESSURE = Gauge(
    "lbd_bpf_map_pressure", "Fill level of one of lbd's BPF maps (entries / max_entries)", ["map"]
)

DEFAULT_BPFFS = "/sys/fs/bpf/lbd/default"
# A sync that reads or writes this many entries leaves its objects to the GC's permanent
# generation (see lbd.model.build.gc_paused); small ones leave them to the usual collections.
FREEZE_AFTER_OPS = 20000
DEFAULT_CGROUP = "/run/lbd/cgroupv2"
# How long a datapath taking a node over from iptables (whose rules it found there, see
# backends.registry.hand_over_modes) leaves mid-flow TCP segments without a conntrack
# entry to the kernel's NAT (lb_config.takeover_until_ns): the connections the previous
# mode balanced keep their backend instead of being reset; and replies tc translates skip
# the stack, whose nat hooks the previous mode may still hold (see lbd_reply in
# bpf_lb/tc.c). Long enough for an idle keep-alive connection (HTTP servers close those
# after 1-5 minutes) to send again; a flow seen in it stays on the kernel's NAT for its
# lifetime. A node lbd's eBPF mode is the first to serve gets no window: a mid-flow
# segment without an entry there means lbd_ct lost the flow, and balancing it again is
# the better guess (Maglev picks the same backend).
TAKEOVER_SECONDS = 600.0


def check_host() -> None:
    """Raise HostUnsupported (one sentence) when this host cannot run the eBPF mode."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise HostUnsupported(
            "ebpf mode needs BCC's Python bindings (Debian: python3-bpfcc, linked into lbd's "
            "Python by scripts/setup), which cannot be imported here."
        ) from None
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "include").exists():
        raise HostUnsupported(
            f"ebpf mode needs kernel headers for BCC at {build}, which is missing "
            "(mount the host's /lib/modules and /usr/src, or run scripts/setup)."
        )
    try:
        filesystems = Path("/proc/filesystems").read_text().split()
    except OSError:
        filesystems = []
    if "cgroup2" not in filesystems:
        raise HostUnsupported("ebpf mode needs cgroup v2, which this kernel does not offer.")
    if "bpf" not in filesystems:
        raise HostUnsupported("ebpf mode needs the bpf filesystem, which this kernel lacks.")
    try:
        bpfsys.probe()
    except OSError as e:
        raise HostUnsupported(
            f"ebpf mode needs the bpf() system call, which fails here ({e.strerror}): "
            "run lbd as root (CAP_BPF and CAP_NET_ADMIN)."
        ) from None


def from_config(cfg: ProxyConfig, netns: str | None = None) -> EbpfBackend:
    """An EbpfBackend from `cfg.extra["ebpf"]` (a dict; every key optional):

    cgroup (default DEFAULT_CGROUP, the whole node; "" disables socket LB), bpffs,
    lb_algorithm, maglev_table_size, hostns_only, devices, pod_devices, gc_interval,
    snat_port_range ([min, max]), map_sizes (a dict of MapSizes fields).
    """
    opts = dict(cfg.extra.get("ebpf") or {})
    cgroup = opts.pop("cgroup", DEFAULT_CGROUP) or None
    if cgroup == DEFAULT_CGROUP:
        ensure_cgroup2(Path(DEFAULT_CGROUP))
    sizes = opts.pop("map_sizes", None)
    if "snat_port_range" in opts:
        opts["snat_port_range"] = tuple(opts["snat_port_range"])
    return EbpfBackend(
        netns=netns,
        cgroup=cgroup,
        map_sizes=MapSizes(**sizes) if sizes else None,
        **opts,
    )


def _kind(flags: int) -> str:
    if flags & SVC_NODEPORT:
        return "NodePort"
    if flags & SVC_LOADBALANCER:
        return "LoadBalancer"
    if flags & SVC_EXTERNAL_IP:
        return "ExternalIP"
    return "ClusterIP"


class EbpfBackend:
    """kube-proxy's job done with eBPF: socket LB in a cgroup, tc LB on devices."""

    mode = "ebpf"

    def __init__(
        self,
        *,
        netns: str | None = None,
        cgroup: str | None = None,
        bpffs: str = DEFAULT_BPFFS,
        lb_algorithm: str = "random",
        maglev_table_size: int = DEFAULT_TABLE_SIZE,
        map_sizes: MapSizes | None = None,
        hostns_only: bool = False,
        devices: Sequence[str] = (),
        pod_devices: Sequence[str] = (),
        ct_timeouts: conntrack.CtTimeouts | None = None,
        gc_interval: float = 10.0,
        snat_port_range: tuple[int, int] = (0, 0),
    ) -> None:
        """
        netns: the network namespace (name under /run/netns) whose devices get tc programs
            and which counts as the host's for `hostns_only`; None: lbd's own.
        cgroup: the cgroup v2 directory whose processes (and descendants) get socket LB;
            None: no socket LB. On a real node this is the root of the cgroup2 hierarchy
            (DEFAULT_CGROUP, mounted there if needed); never the root on a shared test
            machine (programs there act for every process of the kernel).
        bpffs: this instance's directory in a bpffs mount (maps and links are pinned here;
            a later instance with the same directory re-adopts them).
        lb_algorithm: "random" or "maglev"; maglev_table_size: Maglev's prime M.
        hostns_only: socket LB only for sockets of `netns` (pods are then balanced by tc on
            `pod_devices`).
        devices: uplinks (tc ingress + egress: node ports, external and LB IPs).
        pod_devices: pod-facing devices or glob patterns (tc ingress; re-scanned on every
            sync so new pods are covered).
        """
        self.netns = netns
        self.cgroup = cgroup
        self.bpffs = Path(bpffs)
        self.hostns_only = hostns_only
        self.devices = list(devices)
        self.pod_devices = list(pod_devices)
        self.ct_timeouts = ct_timeouts or conntrack.CtTimeouts()
        self.gc_interval = gc_interval
        self._lb_algorithm = lb_algorithm
        self._snat = snat_port_range
        self._options: PlanOptions | None = None
        PlanOptions(lb_algorithm=lb_algorithm, maglev_table_size=maglev_table_size)  # validate
        self.datapath = Datapath(
            self.bpffs, maglev_table_size=maglev_table_size, sizes=map_sizes, netns=netns
        )
        self._view: MapView | None = None  # None: unknown, re-read from the kernel
        # The state the maps implement (as far as lbd wrote them): lets a partial sync
        # plan only the service ports that changed since.
        self._synced: ProxyState | None = None
        self._frontends = FrontendCache()
        self._taking_over = False  # see take_over
        self._lock = threading.RLock()
        self._gc_stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        self.gc_stats = {"runs": 0, "ct_expired": 0, "affinity_expired": 0}

    # --- start ------------------------------------------------------------------------------

    def _plan_options(self, view: MapView) -> PlanOptions:
        if self._options is None:
            cookie = netns_cookie(self.netns) if self.hostns_only else 0
            if self._taking_over:
                takeover = time.monotonic_ns() + int(TAKEOVER_SECONDS * 1e9)
                log.info("taking the node over", pass_mid_flow_tcp_seconds=TAKEOVER_SECONDS)
            else:
                # a restart keeps the takeover its predecessor started, if any
                takeover = view.config.takeover_until_ns if view.config else 0
            self._options = PlanOptions(
                lb_algorithm=self._lb_algorithm,
                maglev_table_size=self.datapath.maglev_table_size,
                hostns_only=self.hostns_only,
                host_netns_cookie=cookie,
                snat_port_min=self._snat[0],
                snat_port_max=self._snat[1],
                takeover_until_ns=takeover,
            )
        return self._options

    def start(self) -> None:
        """Load (or re-adopt) the datapath and attach it. Idempotent; sync() calls it."""
        with self._lock:
            if self.datapath.loaded:
                return
            self.datapath.load()
            try:
                if self.cgroup:
                    self.datapath.attach_cgroup(self.cgroup)
                if self.devices or self.pod_devices:
                    self.datapath.attach_tc(self.devices, self.pod_devices)
            except Exception:
                self.datapath.close()
                raise
            self._view = None
            self._synced = None
            log.info(
                "eBPF datapath attached",
                bpffs=str(self.bpffs),
                cgroup=self.cgroup,
                devices=self.devices,
                netns=self.netns,
            )

    # --- sync -------------------------------------------------------------------------------

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        started = time.monotonic()
        timings: dict[str, int] = {}
        with self._lock, gc_paused() as pause:
            fresh = not self.datapath.loaded
            if fresh:
                # Compiling and loading the programs is a start-up cost, reported apart
                # from the map work (BCC's compile alone takes seconds).
                self.start()
                timings["load_ms"] = _ms_since(started)
            reread = full or self._view is None
            if reread and not fresh:
                # a full sync also restores what someone removed behind lbd's back
                self._reattach()
            elif self.pod_devices:
                self.datapath.attach_tc(self.devices, self.pod_devices)
            if reread:
                t = time.monotonic()
                if self._view is not None and self.datapath.holds(self._view):
                    # The kernel holds what lbd wrote: keep the view (and its indexes)
                    # rather than decode it again; the plan still compares every entry.
                    timings["verified_ms"] = _ms_since(t)
                else:
                    self._view = self.datapath.read_view()
                    timings["read_ms"] = _ms_since(t)
                self._synced = None
            view = self._view
            assert view is not None
            t = time.monotonic()
            p = plan(
                state,
                view,
                self._plan_options(view),
                previous=self._synced,
                cache=self._frontends,
            )
            timings["plan_ms"] = _ms_since(t)
            # Nothing is written when the result would not fit: the datapath keeps the
            # state it has, whole, and the error says which map and which flag.
            detail = p.counts()
            check_capacity(view, p.ops, self.datapath.capacity(), detail)
            # the frontends whose slots change, by rev-NAT id (before and after): only
            # their UDP flows can have lost their backend
            touched = None if reread else self._touched_rev_nat_ids(view, p.ops)
            t = time.monotonic()
            try:
                # a plan from nothing brings the view it leaves: nothing to record
                record = view if p.expected is None else None
                timings["syscalls"] = self.datapath.apply_ops(p.ops, record, p.op_runs())
            except Exception:
                self._view = None  # the kernel is somewhere between two states
                self._synced = None
                raise
            if p.expected is not None:
                self._view = view = p.expected
            timings["write_ms"] = _ms_since(t)
            self._synced = state
            pause.freeze = reread or len(p.ops) >= FREEZE_AFTER_OPS
            if touched is not None:
                touched |= self._touched_rev_nat_ids(view, p.ops)
            backends_removed = detail.get(f"{BACKENDS}_delete", 0)
            slots_changed = detail.get(f"{SERVICES}_write", 0) + detail.get(f"{SERVICES}_delete", 0)
            if backends_removed or slots_changed or reread:
                detail["conntrack_deleted"] = self._clean_udp(view, touched)
            self._export_fill(view)
            detail.update(timings)
            detail["elapsed_ms"] = _ms_since(started)
        self._start_gc()
        return SyncResult(full=reread, changed_service_ports=p.changed_service_ports, detail=detail)

    def _export_fill(self, view: MapView) -> None:
        capacity = self.datapath.capacity()
        for name, n in view.counts().items():
            MAP_ENTRIES.labels(name).set(n)
            MAP_PRESSURE.labels(name).set(n / capacity[name] if capacity.get(name) else 0.0)

    @staticmethod
    def _touched_rev_nat_ids(view: MapView, ops: Sequence[Op]) -> set[int]:
        frontends = view.frontends
        out = set()
        for fe in {op.key[0] for op in ops if op.map == SERVICES}:
            slots = frontends.get(fe)
            if slots and slots[0] is not None:
                out.add(slots[0].rev_nat_id)
        return out

    def _clean_udp(self, view: MapView, rev_nat_ids: set[int] | None = None) -> int:
        """Delete UDP conntrack entries whose backend left their frontend (of the given
        rev-NAT ids only, when the caller knows which frontends changed)."""
        try:
            entries = self.datapath.ct_entries(udp_only=True, rev_nat_ids=rev_nat_ids)
            return self.datapath.ct_delete(conntrack.stale_udp(entries, view))
        except Exception as e:  # noqa: BLE001 - the maps are in; a later sync retries
            log.warning("UDP conntrack cleanup failed", error=str(e))
            return 0

    # --- garbage collection -----------------------------------------------------------------

    def gc(self, now_ns: int | None = None) -> dict[str, int]:
        """Expire idle conntrack pairs and affinity entries once (the GC thread's body)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            if not self.datapath.loaded:
                return {}
            entries = self.datapath.ct_entries()
            ct_n = self.datapath.ct_delete(conntrack.expired(entries, now_ns, self.ct_timeouts))
            ct_left = len(entries) - ct_n
            timeouts = {}
            # only services with affinity have members (lbd_aff_match): no walk of them all
            view = self._view or MapView()
            ix = view.index()
            for sid in ix.aff_by_sid:
                for fe in ix.sid_fes.get(sid, ()):
                    head = view.frontends[fe][0]
                    if head.affinity_timeout:
                        timeouts[sid] = head.affinity_timeout * 1_000_000_000
            aff_n, aff_left = self.datapath.affinity_delete_idle(timeouts, now_ns)
        capacity = self.datapath.sizes
        for name, n, cap in (
            ("lbd_ct", ct_left, capacity.conntrack),
            ("lbd_affinity", aff_left, capacity.affinity),
        ):
            MAP_ENTRIES.labels(name).set(n)
            MAP_PRESSURE.labels(name).set(n / cap)
        self.gc_stats["runs"] += 1
        self.gc_stats["ct_expired"] += ct_n
        self.gc_stats["affinity_expired"] += aff_n
        return {"ct_expired": ct_n, "affinity_expired": aff_n}

    def _start_gc(self) -> None:
        if self.gc_interval <= 0 or self._gc_thread is not None:
            return
        self._gc_stop.clear()
        self._gc_thread = threading.Thread(target=self._gc_loop, name="lbd-ebpf-gc", daemon=True)
        self._gc_thread.start()

    def _gc_loop(self) -> None:
        while not self._gc_stop.wait(self.gc_interval):
            try:
                self.gc()
            except Exception as e:  # noqa: BLE001 - keep collecting; log and go on
                log.warning("conntrack GC failed", error=str(e))

    def _stop_gc(self) -> None:
        self._gc_stop.set()
        thread, self._gc_thread = self._gc_thread, None
        if thread is not None:
            thread.join(timeout=5)

    # --- health -----------------------------------------------------------------------------

    def needs_full_sync(self) -> bool:
        """True when the datapath is not (fully) in the kernel: maps unpinned, a cgroup
        link or a tc filter gone."""
        with self._lock:
            if not self.datapath.loaded or self._view is None:
                return True
            if not self.datapath.maps_intact():
                return True
            if self.cgroup and not self.datapath.cgroup_links_intact():
                return True
            return not self.datapath.tc_intact()

    def _reattach(self) -> None:
        repinned = self.datapath.repin()
        if repinned:
            log.warning("re-pinned maps someone unpinned", maps=repinned)
        if self.cgroup:
            self.datapath.attach_cgroup(self.cgroup)
        if self.devices or self.pod_devices:
            self.datapath.attach_tc(self.devices, self.pod_devices)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> list[FrontendStatus]:
        with self._lock:
            view = _on_datapath(self.datapath, Datapath.read_view, MapView())
        out = []
        for fe, slots in sorted(view.frontends.items()):
            head = slots[0]
            if head is None or fe.scope != SCOPE_EXT:
                continue
            name = view.svc_names.get(head.svc_id, f"svc-{head.svc_id}")
            service = name.split("#", 1)[0].rsplit("/", 2)[0]
            endpoints = tuple(map(str, view.live_backends(fe)))
            out.append(FrontendStatus(service, _kind(head.flags), str(fe), endpoints))
        return out

    # --- cleanup ----------------------------------------------------------------------------

    def take_over(self) -> None:
        """Before the first sync: another mode's datapath served this node until now, and
        the connections it balanced are to keep their backend (TAKEOVER_SECONDS)."""
        with self._lock:
            self._taking_over = True
            self._options = None

    def hand_over(self) -> bool:
        """Before another mode's first sync: its datapath may drop the replies this one
        translates (see LBD_CFG_HANDOVER in bpf_lb/lb.h), so they bypass the stack from
        now on. False when nothing is pinned."""
        with self._lock:
            self._view = None  # the config changed under the plan's feet
            self._synced = None
            return _on_datapath(self.datapath, Datapath.mark_handover, False)

    def withdraw(self) -> int:
        """Stop taking new flows, the first half of handing a node to another mode: every
        frontend leaves the maps, so new connections reach the next mode's datapath,
        while the programs, conntrack and reverse NAT stay for the flows this datapath
        balanced already (replies to a NodePort client need them). `cleanup` afterwards
        removes the rest. Returns the number of frontends withdrawn (0: nothing pinned)."""
        with self._lock:
            self._view = None  # the next sync reads the maps again
            self._synced = None
            return _on_datapath(self.datapath, Datapath.withdraw_frontends, 0)

    def cleanup(self) -> None:
        """Detach every program this instance (or a previous one with the same bpffs
        directory and netns) attached, and unpin its maps. The cgroup is the caller's."""
        self._stop_gc()
        with self._lock:
            errors = []
            steps = [self.datapath.detach_cgroup]
            # tc filters only where this configuration put them: a configuration without
            # devices never looks at (let alone changes) any interface
            if self.devices or self.pod_devices:
                steps.append(self.datapath.detach_tc)
            for step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - do every step, report at the end
                    errors.append(f"{step.__name__}: {e}")
            self.datapath.close()
            self.datapath.unpin()
            self._view = None
            self._synced = None
        if errors:
            raise LoaderError("eBPF cleanup incomplete: " + "; ".join(errors))

    def close(self) -> None:
        """Stop the GC and drop handles, leaving everything attached (a daemon exiting for
        a restart: the datapath keeps serving until the next instance takes over)."""
        self._stop_gc()
        with self._lock:
            self.datapath.close()
            self._view = None
            self._synced = None


def _ms_since(t: float) -> int:
    return int((time.monotonic() - t) * 1000)


T = TypeVar("T")


def _on_datapath(dp: Datapath, fn: Callable[[Datapath], T], default: T) -> T:
    """`fn(dp)` on the loaded datapath, or else on its pinned maps without loading
    anything (status, withdrawal by another mode's daemon); `default` when nothing is
    pinned."""
    if dp.loaded:
        return fn(dp)
    if not dp.open_pins():
        return default
    try:
        return fn(dp)
    finally:
        dp.close()
