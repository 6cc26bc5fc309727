"""Read lbd's rules back from `iptables-save` output (pure parsing).

Owns two read-backs: the frontends lbd programmed, with the endpoints each one reaches
(for `lbd status`; from the kernel's own dump, never from lbd's memory), and the payload
that removes a set of chains and every rule jumping to them (cleanup).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from backends.base import FrontendStatus
from backends.iptables import render as r
from backends.iptables.apply import IptablesError, Tools

_KIND_BY_SUFFIX = (
    (" cluster IP", "ClusterIP"),
    (" external IP", "ExternalIP"),
    (" loadbalancer IP", "LoadBalancer"),
)


class Rule:
    """One `-A` line: its chain and target at once, its options (last value wins) on demand."""

    __slots__ = ("chain", "line", "target", "_opts")

    def __init__(self, chain: str, line: str, target: str) -> None:
        self.chain = chain
        self.line = line  # the rule as saved, without the leading "-A CHAIN "
        self.target = target
        self._opts: dict[str, str] | None = None

    @property
    def opts(self) -> dict[str, str]:
        if self._opts is None:
            self._opts = _options(_tokens(self.line))
        return self._opts


@dataclass(slots=True)
class Table:
    """One table of a dump: its chains (with policies) and rules, in dump order."""

    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user)
    rules: list[Rule] = field(default_factory=list)

    def rules_of(self, chain: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.chain == chain]


def _tokens(line: str) -> list[str]:
    # iptables-save quotes only comments; shlex is ~20x slower, so it only handles the
    # rare line with escaped quotes inside a comment.
    if '"' not in line:
        return line.split()
    if '\\"' in line:
        return shlex.split(line)
    out: list[str] = []
    for i, part in enumerate(line.split('"')):
        if i % 2:
            out.append(part)
        else:
            out.extend(part.split())
    return out


def _options(tokens: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    negate = False
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        if tok == "!":
            negate = True
        elif tok[:1] == "-":
            value = ""
            if i + 1 < n and tokens[i + 1][:1] != "-":
                i += 1
                value = tokens[i]
            opts["!" + tok if negate else tok] = value
            negate = False
        i += 1
    return opts


def parse_rule(line: str) -> Rule:
    """Parse `-A CHAIN ...` (iptables-save syntax; quoting as the tools write it)."""
    _, chain, rest = (line.split(" ", 2) + ["", ""])[:3]
    target = ""
    j = rest.rfind(" -j ")
    if j >= 0 or rest.startswith("-j "):
        target = rest[j + 4 if j >= 0 else 3 :].split(" ", 1)[0]
    return Rule(chain, rest, target)


def parse_save(text: str, chains: tuple[str, ...] | None = None) -> dict[str, Table]:
    """Tables of an `iptables-save` dump: chain declarations and `-A` rules in order
    (only the rules of chains starting with one of `chains`, when given)."""
    tables: dict[str, Table] = {}
    current: Table | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), Table())
        elif current is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            current.chains[name] = rest.split(" ", 1)[0]
        elif line.startswith("-A ") and (chains is None or line.startswith(chains, 3)):
            current.rules.append(parse_rule(line))
    return tables


def _bare_ip(cidr: str) -> str:
    ip, _, length = cidr.partition("/")
    return ip if length in ("", "32", "128") else cidr


def _frontend(ip: str, port: str, proto: str) -> str:
    ip = _bare_ip(ip)
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}/{proto.upper()}"


class _Resolver:
    """Follows lbd's nat chains from a frontend's target down to DNAT destinations."""

    def __init__(self, nat: Table) -> None:
        self._by_chain: dict[str, list[Rule]] = {}
        for rule in nat.rules:
            self._by_chain.setdefault(rule.chain, []).append(rule)
        self._memo: dict[str, tuple[str, ...]] = {}

    def endpoints(self, chain: str) -> tuple[str, ...]:
        hit = self._memo.get(chain)
        if hit is None:
            self._memo[chain] = ()  # guards against loops in a hand-edited table
            hit = self._memo[chain] = self._resolve(chain)
        return hit

    def _resolve(self, chain: str) -> tuple[str, ...]:
        rules = self._by_chain.get(chain, [])
        if chain.startswith(r.SEP_PREFIX):
            return tuple(
                rule.opts["--to-destination"] for rule in rules if "--to-destination" in rule.opts
            )
        if chain.startswith((r.SVC_PREFIX, r.SVL_PREFIX)):
            out: dict[str, None] = {}
            for rule in rules:
                if rule.target.startswith(r.SEP_PREFIX):
                    out.update(dict.fromkeys(self.endpoints(rule.target)))
                elif "--to-destination" in rule.opts:  # DNAT straight from the chain
                    out[rule.opts["--to-destination"]] = None
            return tuple(out)
        if chain.startswith(r.EXT_PREFIX):
            # Where traffic from outside the cluster goes: the final unconditional jump to
            # a policy chain (absent under ETP Local without local endpoints).
            for rule in reversed(rules):
                if rule.target.startswith((r.SVC_PREFIX, r.SVL_PREFIX)) and not (
                    {"-s", "!-s", "--src-type"} & rule.opts.keys()
                ):
                    return self.endpoints(rule.target)
            return ()
        if chain.startswith(r.FW_PREFIX):
            for rule in rules:
                if rule.target.startswith(r.EXT_PREFIX):
                    return self.endpoints(rule.target)
            return ()
        return ()


def _service_and_kind(comment: str) -> tuple[str, str] | None:
    for suffix, kind in _KIND_BY_SUFFIX:
        if comment.endswith(suffix):
            return comment[: -len(suffix)], kind
    return None


def frontends(nat_save: str, filter_save: str = "") -> list[FrontendStatus]:
    """Every frontend lbd programmed, with the endpoints its new connections can reach.

    Frontends without endpoints exist only as REJECT/DROP rules in the filter table; they
    are reported with no endpoints.
    """
    nat = parse_save(nat_save, (r.PREFIX,)).get("nat", Table())
    resolver = _Resolver(nat)
    found: dict[tuple[str, str, str], FrontendStatus] = {}

    def add(service: str, kind: str, frontend: str, endpoints: tuple[str, ...]) -> None:
        key = (service, kind, frontend)
        if key not in found:
            found[key] = FrontendStatus(service, kind, frontend, endpoints)

    for rule in nat.rules_of(r.SERVICES):
        named = _service_and_kind(rule.opts.get("--comment", ""))
        if named is None or "-d" not in rule.opts or "--dport" not in rule.opts:
            continue
        service, kind = named
        front = _frontend(rule.opts["-d"], rule.opts["--dport"], rule.opts.get("-p", ""))
        add(service, kind, front, resolver.endpoints(rule.target))
    for rule in nat.rules_of(r.NODEPORTS):
        if "--dport" not in rule.opts:
            continue
        front = _frontend("*", rule.opts["--dport"], rule.opts.get("-p", ""))
        add(rule.opts.get("--comment", ""), "NodePort", front, resolver.endpoints(rule.target))

    filt = parse_save(filter_save, (r.PREFIX,)).get("filter", Table()) if filter_save else Table()
    for chain in (r.SERVICES, r.EXTERNAL_SERVICES):
        for rule in filt.rules_of(chain):
            comment = rule.opts.get("--comment", "")
            head, sep, _ = comment.partition(" has no ")
            if not sep or "--dport" not in rule.opts:
                continue
            proto = rule.opts.get("-p", "")
            if head.endswith(" nodeport"):
                service = head[: -len(" nodeport")]
                add(service, "NodePort", _frontend("*", rule.opts["--dport"], proto), ())
                continue
            named = _service_and_kind(head)
            if named is None or "-d" not in rule.opts:
                continue
            add(named[0], named[1], _frontend(rule.opts["-d"], rule.opts["--dport"], proto), ())
    return sorted(found.values(), key=lambda f: (f.service, f.kind, f.frontend))


def remove_chains(
    tools: Iterable[Tools], owned: Callable[[str], bool], skipped_event: str
) -> list[str]:
    """Delete every chain `owned` accepts, and each rule jumping to one, through each of
    `tools` (see removal_payload). A table that cannot be read is logged as
    `skipped_event` and left; the errors of the restores that failed."""
    errors: list[str] = []
    for t in tools:
        try:
            saved = t.save()
        except IptablesError as e:
            structlog.get_logger().info(skipped_event, tool=t.binary(), error=str(e))
            continue
        payload = removal_payload(saved, owned)
        if payload is None:
            continue
        try:
            t.restore(payload)
        except IptablesError as e:
            errors.append(str(e))
    return errors


def removal_payload(saved: str, owned: Callable[[str], bool]) -> str | None:
    """An iptables-restore payload deleting every chain `owned` accepts, in every table of
    `saved`, and each rule elsewhere that jumps to one of them. None: nothing to remove."""
    out: list[str] = []
    for name, table in parse_save(saved).items():
        doomed = [c for c, policy in table.chains.items() if policy == "-" and owned(c)]
        if not doomed:
            continue
        doomed_set = set(doomed)
        refs = [
            rule
            for rule in table.rules
            if rule.target in doomed_set and rule.chain not in doomed_set
        ]
        out.append(f"*{name}")
        # Declaring a chain under --noflush flushes it, so -X finds it empty.
        out.extend(f":{c} - [0:0]" for c in doomed)
        out.extend(f"-D {rule.chain} {rule.line}" for rule in refs)
        out.extend(f"-X {c}" for c in doomed)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else None
