"""The thin kernel layer of the iptables mode: run the iptables tools, nothing else.

Owns which binary runs (variant legacy/nft × family v4/v6), running it inside a named
network namespace when asked (`ip netns exec`), feeding restore payloads on stdin, and
turning failures into exceptions that carry the offending payload lines. Commands are
argv lists; no shell is ever involved.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lbd.model.state import IPFamily

VARIANTS = ("legacy", "nft")
# How long iptables-legacy may wait for the xtables lock. The lock (/run/xtables.lock) is
# one per host, shared by every network namespace and writer (kubelet, firewalls, other
# lbd instances on a test host), and a legacy restore of a big table holds it for seconds.
LOCK_WAIT_SECONDS = 60
TIMEOUT_SECONDS = 300

_HINT_CHAINS = {
    "lbd": (":LBD-PROXY-CANARY ",),
    "kube": (":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY ", ":KUBE-PROXY-CANARY "),
}
_FAILED_LINE = re.compile(r"(?:line:? )(\d+)")


class IptablesError(RuntimeError):
    """An iptables tool failed; the message holds its stderr (and payload context)."""


@dataclass(frozen=True, slots=True)
class Tools:
    """The iptables tools of one variant and family, optionally inside a named netns."""

    variant: str  # "legacy" | "nft"
    family: IPFamily
    netns: str | None = None

    def binary(self, suffix: str = "") -> str:
        base = "iptables" if self.family == IPFamily.V4 else "ip6tables"
        return f"{base}-{self.variant}{suffix}"

    def available(self) -> bool:
        return shutil.which(self.binary("-restore")) is not None

    def _argv(self, suffix: str, *args: str) -> list[str]:
        cmd = [self.binary(suffix), *args]
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *cmd]
        return cmd

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise IptablesError(f"{argv[0]}: {e}") from e

    def restore(self, payload: str) -> None:
        """One atomic `iptables-restore --noflush` of `payload` (all tables or nothing)."""
        argv = self._argv("-restore", "--noflush", f"--wait={LOCK_WAIT_SECONDS}")
        proc = self._run(argv, payload)
        if proc.returncode != 0:
            raise IptablesError(_describe_failure(self.binary("-restore"), proc.stderr, payload))

    def legacy_tables(self) -> set[str]:
        """The legacy tables the kernel has instantiated in the namespace.

        Reading a legacy table instantiates it (and makes iptables-nft warn about legacy
        tables from then on), so probes look here first and leave unused tables alone.
        """
        ip = "ip" if self.family == IPFamily.V4 else "ip6"
        path = f"/proc/net/{ip}_tables_names"
        if self.netns:
            proc = self._run(["ip", "netns", "exec", self.netns, "cat", path])
            text = proc.stdout if proc.returncode == 0 else ""
        else:
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                text = ""
        return set(text.split())

    def save(self, table: str | None = None) -> str:
        args = ("-t", table) if table else ()
        proc = self._run(self._argv("-save", *args))
        if proc.returncode != 0:
            raise IptablesError(f"{self.binary('-save')}: {proc.stderr.strip()}")
        return proc.stdout

    def list_chain(self, table: str, chain: str) -> list[str] | None:
        """`-S chain` lines (rules as iptables-save prints them); None: no such chain."""
        proc = self._run(self._argv("", "-w", str(LOCK_WAIT_SECONDS), "-t", table, "-S", chain))
        if proc.returncode == 1:
            # Both variants exit 1 for a missing chain (legacy: "No chain/target/match by
            # that name", nft: "... is incompatible"); lock and usage problems exit 2-4.
            return None
        if proc.returncode != 0:
            raise IptablesError(f"{self.binary()} -t {table} -S {chain}: {proc.stderr.strip()}")
        return [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]

    def read_chains(self, table: str, chains: list[str]) -> dict[str, list[str] | None]:
        """The `-A` lines of each of `chains` (None: no such chain), one table read.

        Any read of a legacy table copies the whole table out of the kernel (~1 s for
        300,000 rules), so legacy dumps the table once; nft fetches just those chains.
        """
        if self.variant == "legacy":
            out: dict[str, list[str] | None] = dict.fromkeys(chains)
            for line in self.save(table).splitlines():
                if line.startswith(":"):
                    name = line[1:].split(" ", 1)[0]
                    if name in out and out[name] is None:
                        out[name] = []
                elif line.startswith("-A "):
                    rules = out.get(line[3:].split(" ", 1)[0])
                    if rules is not None:
                        rules.append(line)
            return out
        result: dict[str, list[str] | None] = {}
        for chain in chains:
            lines = self.list_chain(table, chain)
            result[chain] = None if lines is None else [x for x in lines if x.startswith("-A ")]
        return result

    def version(self) -> str:
        """`iptables -V` of the system's default iptables (the alternatives' choice)."""
        base = "iptables" if self.family == IPFamily.V4 else "ip6tables"
        argv = [base, "-V"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = self._run(argv)
        return proc.stdout.strip() or proc.stderr.strip()


def _describe_failure(tool: str, stderr: str, payload: str) -> str:
    msg = f"{tool} failed: {stderr.strip()}"
    m = _FAILED_LINE.search(stderr)
    if m:
        n = int(m.group(1))
        lines = payload.splitlines()
        lo, hi = max(0, n - 3), min(len(lines), n + 2)
        context = "\n".join(f"{i + 1:>7}  {lines[i]}" for i in range(lo, hi))
        msg += f"\npayload around line {n}:\n{context}"
    return msg


def _hints(tools: Tools) -> set[str]:
    """Which owners ("lbd", "kube") left their marker chains in this variant's mangle table."""
    if not tools.available():
        return set()
    if tools.variant == "legacy" and "mangle" not in tools.legacy_tables():
        return set()
    try:
        saved = tools.save("mangle")
    except IptablesError:
        return set()
    found = set()
    for owner, markers in _HINT_CHAINS.items():
        if any(line.startswith(markers) for line in saved.splitlines()):
            found.add(owner)
    return found


def detect_variant(netns: str | None = None) -> str:
    """Pick legacy or nft the way kube-proxy's iptables-wrapper does.

    Rules already programmed win (lbd's own first, then kube-proxy's/kubelet's marker
    chains), because two variants' rules would both apply to every packet. Otherwise use
    the variant the system's `iptables` alternative points to.
    """
    found = {
        v: _hints(Tools(v, IPFamily.V4, netns)) | _hints(Tools(v, IPFamily.V6, netns))
        for v in VARIANTS
    }
    for owner in ("lbd", "kube"):
        having = [v for v in VARIANTS if owner in found[v]]
        if len(having) == 1:
            return having[0]
    installed = [v for v in VARIANTS if Tools(v, IPFamily.V4, netns).available()]
    if len(installed) == 1:
        return installed[0]
    version = Tools("nft", IPFamily.V4, netns).version()
    if "legacy" in version:
        return "legacy"
    return "nft"


def tools_in_use(make: Callable[[IPFamily, str], Tools]) -> Iterator[Tools]:
    """The tools (`make(family, variant)`) of both families and both variants that may
    hold lbd's rules: installed, and for legacy, with tables already in use."""
    for variant in VARIANTS:
        for family in (IPFamily.V4, IPFamily.V6):
            tools = make(family, variant)
            if not tools.available():
                continue
            if variant == "legacy" and not tools.legacy_tables():
                continue  # never used here; reading would instantiate its tables
            yield tools
