"""Turn a benchmark run's results into files: results.json, results.md and PNG plots.

The JSON keeps every raw sample (so a later reader can compute what we did not think
of); the Markdown and the plots are views of it and can be regenerated from the JSON
alone (`python -m benchmarks.report DIR`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import report_data

JSON = dict[str, Any]

# The targets, all at 10,000 services x 10 endpoints.
TARGET_SERVICES = 10_000
TARGET_BUILD_CPU_S = 2.0
# The issues' targets at 10k services, per mode: (full sync wall, one change p99).
TARGETS_S = {"iptables": (1.5, 0.150), "ebpf": (1.0, 0.020)}
TARGET_FULL_SYNC_S, TARGET_CHANGE_P99_S = TARGETS_S["iptables"]  # the plots' lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("full_sync.png", "change_p99.png", "build_cpu.png")  # the control plane's


def _rounded(value: Any) -> Any:
    """Floats to the microsecond: the clocks promise no more, and the file is committed."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def write_json(results: JSON, out: Path) -> Path:
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    # Written after every cluster size, so keep the previous file whole until the new
    # one is complete: an interrupted run still leaves valid JSON behind.
    tmp.write_text(json.dumps(_rounded(results), indent=1) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------
# Markdown


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f} s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _build_by_size(results: JSON) -> dict[int, JSON]:
    return {b["services"]: b for b in results.get("build", [])}


def summary_table(results: JSON) -> list[str]:
    """One row per mode/variant/size: the numbers the issue asks about."""
    builds = _build_by_size(results)
    rows = []
    for s in results.get("sync", []):
        build = builds.get(s["services"])
        partial = s.get("changes_partial", {}).get("total")
        full = s.get("changes_full", {}).get("total")
        rows.append(
            [
                s["mode"],
                s.get("kernel", {}).get("variant") or s.get("variant") or "–",
                f"{s['services']:,}",
                str(s["endpoints_per_service"]),
                _ms(s["full_sync"]["median"]["wall_s"]),
                _ms(partial["p50"]) if partial else "–",
                _ms(partial["p99"]) if partial else "–",
                _ms(partial["max"]) if partial else "–",
                f"{_ms(full['p50'])} / {_ms(full['p99'])} (n={full['n']})" if full else "–",
                _s(build["median"]["total"]["cpu_s"]) if build else "–",
            ]
        )
    header = [
        "mode",
        "variant",
        "services",
        "endpoints/svc",
        "full sync (wall, median)",
        "change p50",
        "change p99",
        "change max",
        "change with full sync p50 / p99",
        "list + build CPU",
    ]
    return _table(header, rows)


def build_table(results: JSON) -> list[str]:
    rows = []
    for b in results.get("build", []):
        m = b["median"]
        rows.append(
            [
                f"{b['services']:,}",
                f"{b['services'] * b['endpoints_per_service']:,}",
                _s(m["list"]["wall_s"]),
                _s(m["list"]["cpu_s"]),
                _s(m["build"]["cpu_s"]),
                _s(m["total"]["cpu_s"]),
                _s(m["total"]["wall_s"]),
                _ms(b["rebuild_one_change"]["median"]["cpu_s"]),
            ]
        )
    header = [
        "services",
        "endpoints",
        "list wall",
        "list CPU",
        "build_state CPU",
        "list + build CPU",
        "list + build wall",
        "rebuild after 1 change (CPU)",
    ]
    return _table(header, rows)


def _split_tools(tools: dict[str, JSON]) -> tuple[float, float]:
    """(wall in *-restore, wall in every other tool)."""
    restore = sum(t["wall_s"] for name, t in tools.items() if "-restore" in name)
    return restore, sum(t["wall_s"] for t in tools.values()) - restore


def breakdown_table(results: JSON) -> list[str]:
    """Where a sync's time goes: the restore itself, other tool calls (saves, listings)
    and lbd's own Python (render, diff, state build)."""
    rows = []
    for s in results.get("sync", []):
        runs = s["full_sync"]["runs"]
        median_run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        f_restore, f_other = _split_tools(median_run.get("tools", {}))
        part = s.get("changes_partial", {})
        kernel = s.get("kernel", {})
        row = [
            s["target"],
            f"{s['services']:,}",
            f"{kernel['nat_rules']:,}" if kernel.get("nat_rules") else "–",
            f"{median_run.get('detail', {}).get('restore_bytes', 0) / 1e6:.2f} MB",
            _ms(median_run["wall_s"]),
            _ms(median_run["cpu_s"] + median_run["children_cpu_s"]),
            _ms(f_restore),
            _ms(f_other),
            _ms(median_run["wall_s"] - f_restore - f_other),
        ]
        if part.get("samples"):
            c_restore, c_other = _split_tools(part.get("tools_median", {}))
            row += [
                _ms(part["total"]["p50"]),
                _ms(part["build"]["p50"]),
                _ms(c_restore),
                _ms(part["children_sys"]["p50"]) if "children_sys" in part else "–",
                _ms(c_other),
                _ms(part["sync_python"]["p50"]),
            ]
        else:
            row += ["–"] * 6
        rows.append(row)
    header = [
        "target",
        "services",
        "nat rules",
        "full restore payload",
        "full sync",
        "its CPU (lbd + tools)",
        "restore",
        "other tools",
        "lbd Python",
        "change p50",
        "build_state",
        "restore",
        "tools' kernel CPU",
        "other tools",
        "lbd Python in sync",
    ]
    return _table(header, rows)


def tool_lines(results: JSON) -> list[str]:
    """Per target and size: which tools one change runs (median calls and wall)."""
    lines = []
    for s in results.get("sync", []):
        tools = s.get("changes_partial", {}).get("tools_median")
        if not tools:
            continue
        parts = [
            f"`{name}` {t['calls']:g}x {_ms(t['wall_s'])}"
            for name, t in sorted(tools.items(), key=lambda kv: -kv[1]["wall_s"])
        ]
        lines.append(f"- {s['target']} at {s['services']:,}: " + ", ".join(parts))
    return lines


def target_checks(results: JSON) -> list[JSON]:
    """The issue's targets at 10k services, each with the measured value and a verdict."""
    checks: list[JSON] = []
    build = _build_by_size(results).get(TARGET_SERVICES)
    if build:
        cpu = build["median"]["total"]["cpu_s"]
        checks.append(
            {
                "target": "list + build 10k Services + 10k EndpointSlices < 2 s CPU",
                "measured": _s(cpu),
                "met": cpu < TARGET_BUILD_CPU_S,
            }
        )
    for s in results.get("sync", []):
        if s["services"] != TARGET_SERVICES:
            continue
        targets = TARGETS_S.get(s.get("mode", ""))
        if targets is None:
            continue  # ipvs: its issue asks for ratios to iptables (benchmarks.compare)
        full_s, change_s = targets
        wall = s["full_sync"]["median"]["wall_s"]
        checks.append(
            {
                "target": f"{s['target']}: full sync at 10k <= {_s(full_s)}",
                "measured": _s(wall),
                "met": wall <= full_s,
            }
        )
        total = s.get("changes_partial", {}).get("total")
        if total:
            checks.append(
                {
                    "target": f"{s['target']}: one change at 10k <= {_ms(change_s)} p99",
                    "measured": _ms(total["p99"]),
                    "met": total["p99"] <= change_s,
                }
            )
    return checks


def has_control(results: JSON) -> bool:
    """Whether the run measured the control plane (runs before --part existed did)."""
    return "control" in results.get("config", {}).get("parts", ["control"])


def markdown(results: JSON) -> str:
    machine = results.get("machine", {})
    lines = [
        "# lbd benchmarks",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"Machine: {machine.get('cpu_count')} x {machine.get('cpu_model')}, "
        f"{machine.get('mem_total_gib')} GiB, kernel {machine.get('kernel')}, "
        f"{machine.get('python')}; {machine.get('iptables_legacy')}, "
        f"{machine.get('iptables_nft')}; lbd {machine.get('lbd_commit')}"
        f" (sources {machine.get('lbd_code_sha256')})"
        + (" (uncommitted changes)" if machine.get("lbd_worktree_dirty") else "")
        + f"; {machine.get('date')}; load average at start "
        f"{machine.get('load_average_start')}, at end {machine.get('load_average_end')}.",
        "",
    ]
    if has_control(results):
        lines += control_markdown(results)
    if "data_plane" in results:
        lines += report_data.markdown(results["data_plane"])
    return "\n".join(lines)


def control_markdown(results: JSON) -> list[str]:
    cfg = results.get("config", {})
    lines = [
        "## Control plane",
        "",
        f"Workload: {cfg.get('endpoints_per_service')} endpoints per service, "
        f"{cfg.get('changes')} single-service changes per size, full syncs: median of "
        f"{cfg.get('repeats')} fresh namespaces.",
        "",
        "### Summary",
        "",
        *summary_table(results),
        "",
        "### State build (list over HTTP + build_state; client CPU only)",
        "",
        *build_table(results),
        "",
        "### Where the time goes",
        "",
        "Full sync: the median run; change: medians over the partial-sync changes. "
        "Tool times are wall times of the external programs (each through "
        "`ip netns exec`); lbd Python is the rest. CPU (this process plus the tools it ran) "
        "is less sensitive than wall time to other load on the machine. The tools' kernel "
        "CPU is the system time of the programs one change ran: with iptables-legacy, "
        "mostly the kernel replacing the whole nat table on each commit, a floor no "
        "partial sync can go below.",
        "",
        *breakdown_table(results),
        "",
        "Tools run per change (median calls and wall time):",
        "",
        *tool_lines(results),
        "",
    ]
    checks = target_checks(results)
    if checks:
        lines += [
            "### Targets",
            "",
            *_table(
                ["target", "measured", "met"],
                [[c["target"], c["measured"], "yes" if c["met"] else "**no**"] for c in checks],
            ),
            "",
        ]
    failed = results.get("failed", [])
    if failed:
        lines += ["### Failed", ""]
        lines += [f"- {f['target']} at {f['services']:,} services: {f['error']}" for f in failed]
        lines.append("")
    skipped = results.get("skipped", [])
    not_run = results.get("not_run", [])
    if skipped or not_run:
        lines += ["### Skipped", ""]
        lines += [f"- {s['target']}: {s['reason']}" for s in skipped]
        lines += [f"- {s['target']} at {s['services']:,} services: {s['reason']}" for s in not_run]
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# Plots


def _series(results: JSON, pick: Any) -> dict[str, tuple[list[int], list[float]]]:
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for s in sorted(results.get("sync", []), key=lambda s: s["services"]):
        value = pick(s)
        if value is None:
            continue
        xs, ys = lines.setdefault(s["target"], ([], []))
        xs.append(s["services"])
        ys.append(value)
    return lines


def _plot(
    path: Path,
    lines: dict[str, tuple[list[int], list[float]]],
    *,
    title: str,
    ylabel: str,
    target: float | None = None,
    target_label: str = "",
    xlabel: str = "services",
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never look for a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, (xs, ys) in sorted(lines.items()):
        ax.plot(xs, ys, marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=target_label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({x for xs, _ in lines.values() for x in xs})
    if sizes:
        # Label the measured sizes themselves ("10,000"), not powers of ten.
        ax.set_xticks(sizes, [f"{x:,}" for x in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    # Seconds as plain numbers at 1-2-5 steps: "0.2", not "2x10^-1".
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if lines or target is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_plots(results: JSON, out: Path) -> list[Path]:
    full = _series(results, lambda s: s["full_sync"]["median"]["wall_s"])
    p99 = _series(
        results,
        lambda s: (s.get("changes_partial", {}).get("total") or {}).get("p99"),
    )
    builds = sorted(results.get("build", []), key=lambda b: b["services"])
    build_lines = {
        "list + build_state": (
            [b["services"] for b in builds],
            [b["median"]["total"]["cpu_s"] for b in builds],
        ),
        "build_state only": (
            [b["services"] for b in builds],
            [b["median"]["build"]["cpu_s"] for b in builds],
        ),
    }
    paths = [out / name for name in PLOTS]
    per = results.get("config", {}).get("endpoints_per_service")
    xlabel = f"services ({per} endpoints each)" if per else "services"
    _plot(
        paths[0],
        full,
        title="Full sync: whole state into a fresh namespace",
        ylabel="wall time (s, median)",
        target=TARGET_FULL_SYNC_S,
        target_label="iptables target at 10k: 1.5 s",
        xlabel=xlabel,
    )
    _plot(
        paths[1],
        p99,
        title="One-service change: build + partial sync",
        ylabel="p99 latency (s)",
        target=TARGET_CHANGE_P99_S,
        target_label="iptables target at 10k: 150 ms",
        xlabel=xlabel,
    )
    _plot(
        paths[2],
        build_lines if builds else {},
        title="State build: client CPU",
        ylabel="CPU time (s, median)",
        target=TARGET_BUILD_CPU_S,
        target_label="target at 10k: 2 s",
        xlabel=xlabel,
    )
    return paths


def write_all(results: JSON, out: Path) -> str:
    """results.json, results.md and the plots; returns the Markdown."""
    write_json(results, out)
    text = markdown(results)
    (out / "results.md").write_text(text)
    if has_control(results):
        write_plots(results, out)
    if "data_plane" in results:
        report_data.write_plots(results["data_plane"], out)
    return text


def main(argv: list[str] | None = None) -> None:
    """Regenerate results.md and the plots of a finished run from its results.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.report DIR")
    out = Path(args[0])
    results = json.loads((out / "results.json").read_text())
    print(write_all(results, out))


if __name__ == "__main__":
    main()
