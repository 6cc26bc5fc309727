"""Ratios between two targets of one benchmark run: `python -m benchmarks.compare DIR`.

Owns the view issue 4 asks for: IPVS beside iptables measured in the same run (in the
VM, where absolute times mean little because everything is emulated), as ratios of full
sync and one-change latency per cluster size, and whether a target's one-change latency
stays flat as the cluster grows. Reads DIR/results.json (and DIR/vm.json, written by
scripts/vm-bench, when present); prints Markdown, and writes it with --write FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.0f}x"


def _get(entry: JSON | None, *path: str) -> float | None:
    value: Any = entry
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


# What is compared, as (label, path into a results["sync"] entry).
MEASURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("full sync (wall, median)", ("full_sync", "median", "wall_s")),
    ("one change p50 (build_state + sync)", ("changes_partial", "total", "p50")),
    ("one change p99 (build_state + sync)", ("changes_partial", "total", "p99")),
    ("one change p50, sync only", ("changes_partial", "sync", "p50")),
)


def _by_target(results: JSON) -> dict[str, dict[int, JSON]]:
    out: dict[str, dict[int, JSON]] = {}
    for entry in results.get("sync", []):
        out.setdefault(entry["target"], {})[int(entry["services"])] = entry
    return out


def pick_targets(results: JSON, numerator: str, baseline: str | None) -> tuple[str, str]:
    """The two target labels to compare: `numerator` (a mode or label) and `baseline`
    (default: the first measured iptables target)."""
    labels = list(_by_target(results))

    def find(name: str) -> str:
        for label in labels:
            if label == name:
                return label
        for label in labels:
            if label.split("-")[0] == name:
                return label
        raise LookupError(f"no target {name!r} in the results (have: {', '.join(labels)})")

    num = find(numerator)
    base = find(baseline) if baseline else next((t for t in labels if t.startswith("iptables")), "")
    if not base:
        raise LookupError(f"no iptables target in the results (have: {', '.join(labels)})")
    return num, base


def vm_line(results: JSON, vm: JSON | None) -> str:
    m = results.get("machine", {})
    text = (
        f"Measured on kernel {m.get('kernel', '?')}, {m.get('cpu_count', '?')} x "
        f"{m.get('cpu_model', '?')}, {m.get('mem_total_gib', '?')} GiB, {m.get('python', '?')}, "
        f"lbd {m.get('lbd_commit', '?')}, {m.get('date', '?')}"
    )
    if vm:
        text += (
            f"; a QEMU VM ({vm.get('accelerator', '?')}; {vm.get('qemu', '?')}, "
            f"{vm.get('virtme_ng', '?')}) on a host with {vm.get('host_cpus', '?')} x "
            f"{vm.get('host_cpu', '?')}, kernel {vm.get('host_kernel', '?')}"
        )
    return text + "."


def comparison(
    results: JSON,
    vm: JSON | None = None,
    numerator: str = "ipvs",
    baseline: str | None = None,
    level: int = 2,
) -> list[str]:
    """The Markdown lines: the ratio table and the flatness table, under a heading of
    `level` (3 to sit inside another report's section). LookupError: a target is missing."""
    num, base = pick_targets(results, numerator, baseline)
    targets = _by_target(results)
    sizes = sorted(set(targets[num]) & set(targets[base]))
    command = (vm or {}).get("command") or results.get("command", "?")
    lines = [
        f"{'#' * level} {num} beside {base}, same run",
        "",
        f"Command: `{command}`",
        "",
        vm_line(results, vm),
        "",
        "Absolute times under software emulation are many times the host's; compare the "
        "ratios. A ratio below 1 means "
        f"{num} is faster. *Sync only* leaves out build_state, which is the same for every "
        "mode.",
        "",
        f"| measurement | services | {num} | {base} | {num} / {base} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, path in MEASURES:
        for n in sizes:
            a, b = _get(targets[num][n], *path), _get(targets[base][n], *path)
            lines.append(f"| {label} | {n:,} | {_ms(a)} | {_ms(b)} | {_ratio(a, b)} |")
    lines += [
        "",
        f"{'#' * (level + 1)} Does one change stay flat as the cluster grows?",
        "",
    ]
    if len(sizes) < 2:
        lines.append("(needs two cluster sizes)")
        return lines
    small, large = sizes[0], sizes[-1]
    lines += [
        f"Growth from {small:,} to {large:,} services ({large / small:.0f}x the services): "
        "1.0x is flat, "
        f"{large / small:.0f}x is linear.",
        "",
        f"| target | change p50 at {small:,} | at {large:,} | growth | sync only p50 at "
        f"{small:,} | at {large:,} | growth | full sync growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in (num, base):
        row = [label]
        for path in (("changes_partial", "total", "p50"), ("changes_partial", "sync", "p50")):
            a, b = _get(targets[label][small], *path), _get(targets[label][large], *path)
            row += [_ms(a), _ms(b), _ratio(b, a)]
        path = ("full_sync", "median", "wall_s")
        row.append(_ratio(_get(targets[label][large], *path), _get(targets[label][small], *path)))
        lines.append("| " + " | ".join(row) + " |")
    ran_full = [
        f"{label} at {n:,}: {int(_get(targets[label][n], 'changes_partial', 'ran_full') or 0)}"
        for label in (num, base)
        for n in sizes
    ]
    lines += ["", "Partial syncs that fell back to a full sync: " + ", ".join(ran_full) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("dir", type=Path, help="a benchmark output directory (results.json)")
    parser.add_argument("--target", default="ipvs", help="the compared target (default ipvs)")
    parser.add_argument("--baseline", default=None, help="default: the first iptables target")
    parser.add_argument("--write", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    results = json.loads((args.dir / "results.json").read_text())
    vm_path = args.dir / "vm.json"
    vm = json.loads(vm_path.read_text()) if vm_path.exists() else None
    try:
        text = "\n".join(comparison(results, vm, args.target, args.baseline)) + "\n"
    except LookupError as e:
        print(f"benchmarks.compare: {e}", file=sys.stderr)
        return 1
    if args.write is not None:
        args.write.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
