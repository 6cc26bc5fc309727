"""IpvsBackend: the Backend protocol for the IPVS mode.

Owns the sync policy: a full sync reads the whole kernel view back over netlink and compares
everything; a partial sync compares only the service ports that changed since the last
sync (the planner keeps the desired state between syncs) against what lbd last applied,
refreshing only the draining real servers' connection counts, so its cost does not grow
with the number of services. The plan's ops are applied in order, then the constant iptables rules
(one iptables-restore per family, only when they changed or on a full sync), then UDP
conntrack hygiene. Also: noticing that someone removed lbd's state, reading the kernel
back for `lbd status`, and removing everything the mode created.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import structlog

from backends.base import FrontendStatus, SyncResult
from backends.conntrack import delete_stale_udp_flows, stale_udp_flows
from backends.iptables.apply import VARIANTS, IptablesError, Tools, detect_variant, tools_in_use
from backends.iptables.render import Jump
from backends.iptables.status import Table, parse_save, remove_chains
from backends.ipvs import plan as p
from backends.ipvs.apply import Kernel, KernelError
from backends.ipvs.status import frontends
from lbd.model.build import gc_paused
from lbd.model.state import IPFamily, ProxyState

log = structlog.get_logger("lbd.backends.ipvs")

# A sync that plans this many virtual servers and ipset entries leaves what it built to the
# GC's permanent generation (lbd.model.build.gc_paused): otherwise the next small sync can
# trigger a full collection over them (~0.1-1 s at 10k services).
FREEZE_AFTER = 20000
# While real servers drain (weight 0), a sync comes at least this often to delete the
# ones whose connections are gone (kube-proxy checks once a minute): a removed endpoint
# leaves IPVS within seconds of its last connection, not at the next unrelated change.
DRAIN_CHECK_SECONDS = 5.0


def _owned_chain(chain: str) -> bool:
    return chain.startswith(p.CHAIN_PREFIX)


def _missing_jumps(tables: dict[str, Table]) -> list[Jump]:
    """The jumps from built-in chains that an `iptables-save` dump lacks."""
    missing = []
    for jump in p.JUMPS:
        table = tables.get(jump.table)
        lines = [rule.line for rule in table.rules_of(jump.chain)] if table else []
        if not p.has_jump(lines, jump):
            missing.append(jump)
    return missing


class IpvsBackend:
    """kube-proxy's IPVS mode: virtual servers over netlink, ipsets, constant iptables rules."""

    mode = "ipvs"

    def __init__(
        self,
        *,
        scheduler: str = "rr",
        netns: str | None = None,
        variant: str = "auto",
        grace_period: float = p.DEFAULT_GRACE_PERIOD,
    ) -> None:
        """`scheduler`: the IPVS scheduler of every virtual server (rr, lc, sh, ...).
        `netns`: program this named network namespace instead of the one lbd runs in.
        `variant`: the iptables variant for the few iptables rules (auto | legacy | nft).
        `grace_period`: seconds a removed TCP real server may keep its connections."""
        if scheduler not in p.SCHEDULERS:
            raise ValueError(
                f"IPVS scheduler {scheduler!r} is unknown (choose one of "
                f"{', '.join(sorted(p.SCHEDULERS))})"
            )
        if variant not in ("auto", *VARIANTS):
            raise ValueError(f"variant must be auto, legacy or nft, not {variant!r}")
        self.scheduler = scheduler
        self.netns = netns
        self.grace_period = grace_period
        self._variant = None if variant == "auto" else variant
        self._planner = p.Planner()
        self._view: p.KernelView | None = None  # what the kernel holds after the last sync
        self._draining: dict[tuple[p.VSKey, p.Dest], float] = {}
        self._rules: dict[IPFamily, str] = {}  # iptables payload (without jumps) applied
        self._owned_services = 0
        self._conflicts: list[str] = []
        self._synced_state: ProxyState | None = None

    @property
    def variant(self) -> str:
        if self._variant is None:
            self._variant = detect_variant(self.netns)
            log.info("ipvs.iptables_variant_selected", variant=self._variant, netns=self.netns)
        return self._variant

    def _tools(self, family: IPFamily, variant: str | None = None) -> Tools:
        return Tools(variant or self.variant, family, self.netns)

    # --- sync -------------------------------------------------------------------------

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        started = time.monotonic()
        read_kernel = full or self._view is None
        try:
            with gc_paused() as pause, Kernel(self.netns) as kernel:
                if read_kernel:
                    view = kernel.read_view()
                else:
                    assert self._view is not None
                    view = self._refresh_draining(kernel, self._view)
                result = p.plan(
                    state,
                    view,
                    scheduler=self.scheduler,
                    now=time.monotonic(),
                    draining=self._draining,
                    grace_period=self.grace_period,
                    planner=self._planner,
                    changes_only=not read_kernel,
                )
                kernel.apply(result.ops)
                big = len(view.services) + len(result.ops) >= FREEZE_AFTER
                pause.freeze = read_kernel and big
                if read_kernel:
                    # After the first IPVS request: the vs sysctls exist once IPVS is loaded.
                    changed = kernel.set_sysctls()
                    if changed:
                        log.info("ipvs.sysctls_set", **changed)
        except BaseException:
            # The kernel (and the planner's record of what changed) are unknown now: the
            # next sync reads the kernel and compares everything.
            self._view = None
            self._planner = p.Planner()
            raise
        self._view = result.expected
        self._draining = result.draining
        self._owned_services = result.owned_services
        if result.conflicts != self._conflicts:
            for conflict in result.conflicts:
                log.warning("ipvs.frontend_conflict", detail=conflict)
            self._conflicts = result.conflicts

        restores = self._sync_rules(state, list(result.families), read_kernel)
        detail: dict[str, int] = {f"ops_{k}": v for k, v in result.count().items()}
        detail["iptables_restores"] = restores
        detail["draining_real_servers"] = len(result.draining)
        detail["conntrack_deleted"] = self._clean_conntrack(state)
        self._synced_state = state
        detail["elapsed_ms"] = int((time.monotonic() - started) * 1000)
        return SyncResult(
            full=read_kernel,
            changed_service_ports=result.changed_service_ports,
            detail=detail,
            # Draining real servers are deleted by a later sync once their connections
            # are gone: make sure one comes even when nothing else changes.
            resync_after=DRAIN_CHECK_SECONDS if result.draining else None,
        )

    def _refresh_draining(self, kernel: Kernel, view: p.KernelView) -> p.KernelView:
        """`view` with fresh connection counts for the virtual servers that drain."""
        keys = {key for key, _ in self._draining if key in view.services}
        if not keys:
            return view
        services = dict(view.services)
        for key, dests in kernel.read_dests(keys).items():
            services[key] = p.ServiceView(services[key].vs, dests)
        return replace(view, services=services)

    def _sync_rules(self, state: ProxyState, families: list[IPFamily], full: bool) -> int:
        """Restore the constant iptables rules where they changed (or all, on a full sync,
        re-inserting any missing jump from the built-in chains); how many restores ran."""
        restores = 0
        for family in families:
            tools = self._tools(family)
            if family == IPFamily.V6 and not tools.available():
                continue
            base = p.iptables_payload(state, family, jumps=())
            if not full and self._rules.get(family) == base:
                continue
            jumps = self._missing_jumps(tools)
            payload = base if not jumps else p.iptables_payload(state, family, jumps)
            try:
                tools.restore(payload)
            except IptablesError:
                self._rules.pop(family, None)
                raise
            self._rules[family] = base
            restores += 1
        return restores

    @staticmethod
    def _missing_jumps(tools: Tools) -> list[Jump]:
        return _missing_jumps(parse_save(tools.save()))

    def _clean_conntrack(self, state: ProxyState) -> int:
        flows = stale_udp_flows(self._synced_state, state)
        if not flows:
            return 0
        try:
            return delete_stale_udp_flows(flows, netns=self.netns)
        except Exception as e:  # noqa: BLE001 - the datapath is in; a later sync retries
            log.warning("conntrack.cleanup_failed", error=str(e))
            return 0

    # --- canary -----------------------------------------------------------------------

    def needs_full_sync(self) -> bool:
        """True when lbd's kernel state is not all there any more: the dummy interface, the
        virtual servers (an `ipvsadm -C`), ipset entries (an `ipset flush`, which empties
        the sets the rules match), or the iptables rules (a flush, or a jump gone)."""
        if self._view is None:
            return True
        try:
            with Kernel(self.netns) as kernel:
                if not kernel.dummy_exists():
                    return True
                if kernel.count_services() < self._owned_services:
                    return True
                # Headers only: one small dump, whatever the number of entries.
                sizes = kernel.set_sizes()
                for name, members in self._view.sets.items():
                    if name not in sizes:
                        return True
                    size = sizes[name]
                    if size is not None and size < len(members):
                        return True
            for family in self._rules:
                tables = parse_save(self._tools(family).save())
                for name in p.CANARY_TABLES:
                    table = tables.get(name)
                    if table is None or not table.rules_of(p.CANARY):
                        return True
                if _missing_jumps(tables):
                    return True
        except (KernelError, IptablesError, OSError) as e:
            log.warning("ipvs.check_failed", action="full sync", error=str(e))
            return True
        return False

    # --- status -----------------------------------------------------------------------

    def status(self) -> list[FrontendStatus]:
        with Kernel(self.netns) as kernel:
            view = kernel.read_view()
        return frontends(view)

    # --- cleanup ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove lbd's IPVS chains (every variant and family), its virtual servers, its
        ipsets and lbd-ipvs0 — and nothing else. Safe on hosts without IPVS or ipset."""
        errors = remove_chains(tools_in_use(self._tools), _owned_chain, "ipvs.cleanup_skipped")
        # Rules referencing the ipsets are gone now, so the sets can be destroyed.
        with Kernel(self.netns) as kernel:
            errors.extend(kernel.remove_all_owned(ipset=Path("/sys/module/ip_set").exists()))
        self._view = None
        self._draining.clear()
        self._rules.clear()
        self._synced_state = None
        if errors:
            raise KernelError("cleanup incomplete:\n" + "\n".join(errors))
