"""IptablesBackend: the Backend protocol for the iptables mode.

Owns the sync policy: full or partial restore per family, falling back to a full restore
when a partial one fails; remembering what the kernel holds only after a restore
succeeded; noticing when someone flushed lbd's rules; UDP conntrack cleanup after each
successful sync; reading the kernel back for status; and removing lbd's rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from backends.base import FrontendStatus, SyncResult
from backends.conntrack import delete_stale_udp_flows, stale_udp_flows
from backends.iptables import render as r
from backends.iptables.apply import VARIANTS, IptablesError, Tools, detect_variant, tools_in_use
from backends.iptables.status import frontends, parse_save, remove_chains
from lbd.model.state import IPFamily, ProxyState

log = structlog.get_logger("lbd.backends.iptables")

# The built-in chains lbd jumps from, per table.
_BUILTIN: dict[str, list[str]] = {}
for _jump in r.JUMPS:
    _BUILTIN.setdefault(_jump.table, [])
    if _jump.chain not in _BUILTIN[_jump.table]:
        _BUILTIN[_jump.table].append(_jump.chain)

# Chains kubelet (not kube-proxy) owns: a migration from kube-proxy must leave them.
_KUBELET_CHAINS = frozenset({"KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY", "KUBE-FIREWALL"})


@dataclass(frozen=True, slots=True)
class _Applied:
    """What one family's kernel tables hold after lbd's last successful restore."""

    state: ProxyState
    chains: frozenset[str]  # lbd's per-service nat chains


def _owned_by_lbd(chain: str) -> bool:
    return chain.startswith(r.PREFIX)


def _owned_by_lbd_or_kube_proxy(chain: str) -> bool:
    return chain.startswith(r.PREFIX) or (
        chain.startswith("KUBE-") and chain not in _KUBELET_CHAINS
    )


class IptablesBackend:
    """kube-proxy's iptables mode, under lbd's own chain prefix (LBD-)."""

    mode = "iptables"

    def __init__(self, *, variant: str = "auto", netns: str | None = None) -> None:
        """`variant`: auto | legacy | nft. `netns`: program this named network namespace
        (every command runs via `ip netns exec`) instead of the one lbd runs in."""
        if variant not in ("auto", *VARIANTS):
            raise ValueError(f"variant must be auto, legacy or nft, not {variant!r}")
        self._variant = None if variant == "auto" else variant
        self.netns = netns
        self._renderer = r.Renderer()
        self._applied: dict[IPFamily, _Applied] = {}
        self._synced_state: ProxyState | None = None  # last state every family accepted

    @property
    def variant(self) -> str:
        """The iptables variant in use ("legacy" or "nft"), detected on first use."""
        if self._variant is None:
            self._variant = detect_variant(self.netns)
            log.info("iptables.variant_selected", variant=self._variant, netns=self.netns)
        return self._variant

    def _tools(self, family: IPFamily, variant: str | None = None) -> Tools:
        return Tools(variant or self.variant, family, self.netns)

    def _families(self, state: ProxyState) -> list[IPFamily]:
        # IPv6 is programmed once the state has IPv6 service ports, and kept programmed
        # afterwards so its chains are cleaned up; a node without IPv6 never needs it.
        families = [IPFamily.V4]
        if IPFamily.V6 in self._applied or any(
            key[1] == IPFamily.V6 for key in state.service_ports
        ):
            families.append(IPFamily.V6)
        return families

    # --- sync -------------------------------------------------------------------------

    def sync(self, state: ProxyState, full: bool) -> SyncResult:
        started = time.monotonic()
        families = self._families(state)
        partial_allowed = (
            not full
            and all(f in self._applied for f in families)
            and all(self._canary_intact(self._tools(f)) for f in families)
        )
        ran_full = False
        changed = 0
        detail: dict[str, int] = {"partial_fallbacks": 0, "restore_bytes": 0}
        for family in families:
            tools = self._tools(family)
            payload = None
            applied = self._applied.get(family)
            if partial_allowed and applied is not None:
                payload = self._renderer.partial(applied.state, state, family, applied.chains)
                if payload is not None:
                    try:
                        tools.restore(payload.text)
                    except IptablesError as e:
                        log.warning(
                            "iptables.partial_restore_failed", action="full restore", error=str(e)
                        )
                        detail["partial_fallbacks"] += 1
                        self._applied.pop(family, None)
                        applied = None
                        payload = None
            if payload is None:
                ran_full = True
                payload = self._full_payload(tools, state, applied)
                try:
                    tools.restore(payload.text)
                except IptablesError:
                    self._applied.pop(family, None)
                    raise
            self._applied[family] = _Applied(state, payload.chains)
            changed += payload.changed_service_ports
            detail["restore_bytes"] += len(payload.text)
            detail[f"deleted_chains_v{int(family)}"] = len(payload.deleted_chains)

        detail["conntrack_deleted"] = self._clean_conntrack(state)
        self._synced_state = state
        detail["elapsed_ms"] = int((time.monotonic() - started) * 1000)
        return SyncResult(full=ran_full, changed_service_ports=changed, detail=detail)

    def _full_payload(self, tools: Tools, state: ProxyState, applied: _Applied | None) -> r.Payload:
        if applied is not None:
            existing = applied.chains
            builtin = {
                (table, chain): rules or []
                for table in ("filter", "nat")
                for chain, rules in tools.read_chains(table, _BUILTIN[table]).items()
            }
        else:
            # lbd does not know what this kernel holds (first sync, or a failed restore):
            # read the whole nat table, for both its chains and its built-in chains' jumps.
            saved = parse_save(tools.save("nat"), tuple(_BUILTIN["nat"])).get("nat")
            existing = frozenset(saved.chains) if saved else frozenset()
            builtin = {
                ("filter", chain): rules or []
                for chain, rules in tools.read_chains("filter", _BUILTIN["filter"]).items()
            }
            for chain in _BUILTIN["nat"]:
                rules = saved.rules_of(chain) if saved else []
                builtin[("nat", chain)] = [f"-A {chain} {rule.line}" for rule in rules]
        missing = [j for j in r.JUMPS if not _has_jump(builtin.get((j.table, j.chain), []), j)]
        return self._renderer.full(state, tools.family, existing_chains=existing, jumps=missing)

    def _clean_conntrack(self, state: ProxyState) -> int:
        flows = stale_udp_flows(self._synced_state, state)
        if not flows:
            return 0
        try:
            return delete_stale_udp_flows(flows, netns=self.netns)
        except Exception as e:  # noqa: BLE001 - the rules are in; a later sync retries
            log.warning("conntrack.cleanup_failed", error=str(e))
            return 0

    # --- canary -------------------------------------------------------------------------

    @staticmethod
    def _canary_intact(tools: Tools) -> bool:
        """The canary chain holds its rule in mangle and filter (mangle first: it is the
        smallest, and an admin flushing everything empties it too). nat is not read: every
        partial payload checks its canary itself (see render.Renderer._assemble), because
        reading a legacy nat table means copying all of it."""
        try:
            for table in r.CANARY_TABLES:
                if table == "nat":
                    continue
                if not tools.read_chains(table, [r.CANARY])[r.CANARY]:
                    return False
        except IptablesError:
            return False
        return True

    def needs_full_sync(self) -> bool:
        """True when lbd's rules are not (all) in the kernel any more.

        Checks, table by table, the canary chain (empty after someone flushes the table,
        `-F`; missing after someone deletes its chains, `-X`) and the jumps from the
        built-in chains (which a flush of only those chains removes).
        """
        if not self._applied:
            return True
        try:
            for family in self._applied:
                tools = self._tools(family)
                for table in r.CANARY_TABLES:
                    view = tools.read_chains(table, [r.CANARY, *_BUILTIN.get(table, [])])
                    if not view[r.CANARY]:
                        return True
                    for jump in r.JUMPS:
                        if jump.table == table and not _has_jump(view[jump.chain] or [], jump):
                            return True
        except IptablesError as e:
            log.warning("iptables.check_failed", action="full sync", error=str(e))
            return True
        return False

    # --- status -------------------------------------------------------------------------

    def status(self) -> list[FrontendStatus]:
        out: list[FrontendStatus] = []
        for family in (IPFamily.V4, IPFamily.V6):
            tools = self._tools(family)
            if not tools.available():
                continue
            if tools.variant == "legacy" and "nat" not in tools.legacy_tables():
                continue  # nothing programmed; reading would instantiate the table
            try:
                nat = tools.save("nat")
                filt = tools.save("filter")
            except IptablesError as e:
                if family == IPFamily.V4:
                    raise
                log.info("iptables.no_ipv6_status", error=str(e))
                continue
            out.extend(frontends(nat, filt))
        return out

    # --- cleanup ------------------------------------------------------------------------

    def hand_over(self) -> bool:
        """Before the eBPF mode's first sync: remove the rule dropping forwarded packets
        that conntrack calls INVALID. Every flow tc translates is INVALID to conntrack
        (it sees the backend's address one way and the frontend's the other), so from
        the moment tc balances until this mode is removed, right after that first sync,
        it would drop each new flow's packets (a request lost per switch, typically).
        True when a rule was removed."""
        removed = False
        for tools in tools_in_use(self._tools):
            try:
                table = parse_save(tools.save("filter")).get("filter")
                doomed = [
                    rule
                    for rule in (table.rules_of(r.FORWARD) if table else [])
                    if rule.target == "DROP" and "INVALID" in rule.line
                ]
                if doomed:
                    lines = "".join(f"-D {r.FORWARD} {rule.line}\n" for rule in doomed)
                    tools.restore(f"*filter\n{lines}COMMIT\n")
                    removed = True
            except IptablesError as e:
                log.info("iptables.hand_over_skipped", tool=tools.binary(), error=str(e))
        return removed

    def cleanup(self, remove_kube_leftovers: bool = False) -> None:
        """Remove lbd's chains and jumps, in both families and both variants, and nothing
        else; with `remove_kube_leftovers`, kube-proxy's KUBE-* chains too (not kubelet's)."""
        owned = _owned_by_lbd_or_kube_proxy if remove_kube_leftovers else _owned_by_lbd
        errors = remove_chains(tools_in_use(self._tools), owned, "iptables.cleanup_skipped")
        self._applied.clear()
        self._synced_state = None
        if errors:
            raise IptablesError("cleanup incomplete:\n" + "\n".join(errors))


def _has_jump(rule_lines: list[str], jump: r.Jump) -> bool:
    """Whether a built-in chain's rules (as iptables -S/-save prints them) hold `jump`."""
    want = f"-j {jump.target}"
    return any(line.endswith(want) or f"{want} " in line for line in rule_lines)
