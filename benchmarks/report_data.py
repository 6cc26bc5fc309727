"""The data-plane part of a benchmark report: Markdown tables, target checks and plots.

Views of `results["data_plane"]` (written by benchmarks.data_plane), regenerated with
the rest of the report by `python -m benchmarks.report DIR`. Every number shown is a
median over the run's rounds; every ratio is the median of per-round ratios to the
direct path (same client, same server, same round), see data_plane.summarize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

JSON = dict[str, Any]

PLOTS = ("dp_conn_rate.png", "dp_conn_ratio.png")
TARGET_SERVICES = 10_000
# Issue 5: ClusterIP new-connection rate at 10,000 services, share of direct-to-pod.
TARGET_CONN_RATIO = {"ebpf-socket": 0.95, "ebpf-tc": 0.90}

# (path through the load balancer, its reference, the column titles)
PAIRS = (
    ("clusterip", "pod", "pod → pod IP", "pod → ClusterIP"),
    ("nodeport", "pod-from-external", "external → pod IP", "external → NodePort"),
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _rate(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}/s"


def _gbit(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e9:.1f} Gbit/s"


def _us(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _get(run: JSON, key: str, test: str, path: str, metric: str) -> float | None:
    return run.get(key, {}).get(test, {}).get(path, {}).get(metric)


def _runs(section: JSON) -> list[JSON]:
    order = [t["label"] for t in section.get("config", {}).get("targets", [])]
    rank = {label: i for i, label in enumerate(order)}
    return sorted(section.get("runs", []), key=lambda r: (rank.get(r["target"], 99), r["services"]))


def rate_table(section: JSON, test: str, metric: str, fmt: Any) -> list[str]:
    """Rows target x size; for each pair: direct, through the LB, LB / direct."""
    rows = []
    for run in _runs(section):
        row = [run["target"], f"{run['services']:,}"]
        for path, ref, _, _ in PAIRS:
            row += [
                fmt(_get(run, "summary", test, ref, metric)),
                fmt(_get(run, "summary", test, path, metric)),
                _pct(_get(run, "ratios", test, path, metric)),
            ]
        rows.append(row)
    header = ["target", "other services"]
    for _, _, ref_title, title in PAIRS:
        header += [ref_title, title, "÷ direct"]
    return _table(header, rows)


def tcp_table(section: JSON, test: str = "conn_rate") -> list[str]:
    """SYNs sent again / SYNs refused by the server's TIME_WAIT (PAWS), summed over the
    rounds of `test` on each path: a rate cut by retransmitted SYNs (each costs a
    connection 10 ms to 1 s) says more about port reuse than about the datapath."""
    rows = []
    for run in _runs(section):
        row = [run["target"], f"{run['services']:,}"]
        for path, ref, _, _ in PAIRS:
            for p in (ref, path):
                got = [s["tcp"] for s in run.get("samples", {}).get(test, {}).get(p, []) if s]
                got = [t for t in got if t]
                if not got:
                    row.append("–")
                    continue
                retrans = sum(t.get("syn_retrans", 0) for t in got)
                paws = sum(t.get("paws_rejected", 0) for t in got)
                row.append(f"{retrans:,} / {paws:,}")
        rows.append(row)
    header = ["target", "other services"]
    for _, _, ref_title, title in PAIRS:
        header += [ref_title, title]
    return _table(header, rows)


def latency_table(section: JSON, test: str) -> list[str]:
    """p50 / p99 per path, and the p99 as a multiple of the direct path's."""
    rows = []
    for run in _runs(section):
        row = [run["target"], f"{run['services']:,}"]
        for path, ref, _, _ in PAIRS:
            for p in (ref, path):
                p50 = _get(run, "summary", test, p, "p50_us")
                p99 = _get(run, "summary", test, p, "p99_us")
                row.append("–" if p50 is None else f"{_us(p50)} / {_us(p99)}")
            row.append(_times(_get(run, "ratios", test, path, "p99_us")))
        rows.append(row)
    header = ["target", "other services"]
    for _, _, ref_title, title in PAIRS:
        header += [f"{ref_title} p50 / p99", f"{title} p50 / p99", "p99 ÷ direct"]
    return _table(header, rows)


def target_checks(section: JSON) -> list[JSON]:
    checks = []
    for run in section.get("runs", []):
        want = TARGET_CONN_RATIO.get(run["target"])
        if want is None or run["services"] != TARGET_SERVICES:
            continue
        ratio = _get(run, "ratios", "conn_rate", "clusterip", "requests_per_s")
        checks.append(
            {
                "target": f"{run['target']}: ClusterIP new connections at 10k services "
                f">= {want:.0%} of direct to pod",
                "measured": _pct(ratio),
                "met": ratio is not None and ratio >= want,
            }
        )
    if TARGET_SERVICES not in section.get("config", {}).get("sizes", []):
        return checks
    for label, want in TARGET_CONN_RATIO.items():
        measured = any(
            r["target"] == label and r["services"] == TARGET_SERVICES
            for r in section.get("runs", [])
        )
        if not measured and label in {t["label"] for t in section["config"].get("targets", [])}:
            checks.append(
                {
                    "target": f"{label}: ClusterIP new connections at 10k services "
                    f">= {want:.0%} of direct to pod",
                    "measured": "not measured at 10k (see Failed / Not run)",
                    "met": False,
                }
            )
    return checks


def daemon_table(section: JSON) -> list[str]:
    rows = []
    for run in _runs(section):
        d = run.get("daemon", {})
        cpu = d.get("cpu_s_while_measuring")
        rss = d.get("rss_bytes")
        maps = run.get("bpf_map_entries") or {}
        rows.append(
            [
                run["target"],
                f"{run['services']:,}",
                f"{d.get('start_to_synced_s', 0):.1f} s",
                "–" if cpu is None else f"{cpu:.2f} s of {run.get('measuring_s', 0):.0f} s",
                "–" if rss is None else f"{rss / 2**20:.0f} MiB",
                " / ".join(f"{maps[k]:,}" for k in ("lbd_sockrev", "lbd_ct") if k in maps) or "–",
                f"{run['load_average']['start'][0]} → {run['load_average']['end'][0]}",
            ]
        )
    header = [
        "target",
        "other services",
        "lbd start → synced",
        "lbd CPU while measuring",
        "lbd RSS",
        "ebpf entries sockrev / ct",
        "load average",
    ]
    return _table(header, rows)


def markdown(section: JSON) -> list[str]:
    cfg = section.get("config", {})
    tools = cfg.get("tools", {})
    secs = cfg.get("seconds")
    lines = [
        "## Data plane",
        "",
        f"Topology: {cfg.get('topology')}. HTTP server: {cfg.get('http_server')} "
        f"({tools.get('nginx')}); clients: {tools.get('wrk')}; {tools.get('iperf3')}; "
        f"{tools.get('sockperf')}. Rounds of every test on every path: {cfg.get('rounds')}, "
        f"{secs:g} s per tool run; wrk with {cfg.get('connections')} connections for new "
        f"connections, {cfg.get('latency_connections')} kept-alive ones for latency"
        + ("; clients pinned to CPU 0, servers to CPU 1" if cfg.get("pin_cpus") else "")
        + '. Values are medians over the rounds; "÷ direct" is the median of the per-round '
        "ratios to the direct path from the same client.",
        "",
    ]
    if section.get("runs"):
        lines += [
            "### New connections per second (one HTTP request each: wrk, Connection: close)",
            "",
            *rate_table(section, "conn_rate", "requests_per_s", _rate),
            "",
            "SYN retransmits / SYNs refused by the server's TIME_WAIT (PAWS) during those "
            "runs, summed over the rounds (0 / 0 when no connection had to retry):",
            "",
            *tcp_table(section),
            "",
            "### HTTP request latency on kept-alive connections (wrk --latency)",
            "",
            *latency_table(section, "latency"),
            "",
            "### Bulk TCP throughput (iperf3, one stream)",
            "",
            *rate_table(section, "throughput", "bits_per_s", _gbit),
            "",
            "### UDP request/response round trip (sockperf ping-pong)",
            "",
            *latency_table(section, "udp_rr"),
            "",
            "### lbd during the runs",
            "",
            *daemon_table(section),
            "",
        ]
    checks = target_checks(section)
    if checks:
        lines += [
            "### Targets (issue 5)",
            "",
            *_table(
                ["target", "measured", "met"],
                [[c["target"], c["measured"], "yes" if c["met"] else "**no**"] for c in checks],
            ),
            "",
        ]
    sample_failures = [
        (run["target"], run["services"], f)
        for run in section.get("runs", [])
        for f in run.get("failures", [])
    ]
    if section.get("failed") or sample_failures:
        lines += ["### Failed", ""]
        for f in section.get("failed", []):
            at = "start" if f.get("services") is None else f"{f['services']:,} other services"
            lines.append(f"- {f['target']} at {at}: {f['error']}")
        for target, services, f in sample_failures:
            where = f"round {f['round'] + 1}" if f.get("round") is not None else "check"
            lines.append(
                f"- {target} at {services:,}, {f['test']} {f['path']} ({where}): {f['error']}"
            )
        lines.append("")
    skipped = section.get("skipped", []) + section.get("skipped_tests", [])
    if skipped or section.get("not_run"):
        lines += ["### Skipped", ""]
        lines += [f"- {s['target']}: {s['reason']}" for s in skipped]
        lines += [
            f"- {s['target']} at {s['services']:,} other services: {s['reason']}"
            for s in section.get("not_run", [])
        ]
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------
# Plots


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def write_plots(section: JSON, out: Path) -> list[Path]:
    """dp_conn_rate.png: new connections/s against other services, one line per
    target, the direct-to-pod rate as the reference; dp_conn_ratio.png: the same as a
    share of direct (which cancels the drift between targets measured minutes apart)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never look for a display
    import matplotlib.pyplot as plt

    runs = _runs(section)
    sizes = sorted({r["services"] for r in runs}) or [0]
    # The sizes span 0 to 10,000: equally spaced positions read better than a log axis,
    # which cannot show 0.
    pos = {s: i for i, s in enumerate(sizes)}
    targets = list(dict.fromkeys(r["target"] for r in runs))
    paths = [(p, ref, f"{title} (new connections/s)") for p, ref, _, title in PAIRS]
    per = section.get("config", {}).get("endpoints_per_service")
    xlabel = f"other services ({per} endpoints each)" if per else "other services"

    rate_path = out / PLOTS[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    for ax, (path, ref, title) in zip(axes, paths, strict=True):
        for target in targets:
            pts = [
                (pos[r["services"]], _get(r, "summary", "conn_rate", path, "requests_per_s"))
                for r in runs
                if r["target"] == target
            ]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=target)
        direct: dict[int, list[float]] = {}
        for r in runs:
            v = _get(r, "summary", "conn_rate", ref, "requests_per_s")
            if v is not None:
                direct.setdefault(pos[r["services"]], []).append(v)
        if direct:
            xs = sorted(direct)
            ax.plot(
                xs,
                [_median(direct[x]) for x in xs],
                color="black",
                linestyle="--",
                linewidth=1.2,
                label="direct to pod (median of runs)",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("new connections per second (median)")
    fig.suptitle("Connection rate vs services")
    fig.tight_layout()
    fig.savefig(rate_path, format="png")
    plt.close(fig)

    ratio_path = out / PLOTS[1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    for ax, (path, _, title) in zip(axes, paths, strict=True):
        for target in targets:
            pts = [
                (pos[r["services"]], _get(r, "ratios", "conn_rate", path, "requests_per_s"))
                for r in runs
                if r["target"] == target
            ]
            pts = [(x, 100 * y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=target)
        ax.axhline(100, color="black", linestyle="--", linewidth=1.2, label="direct to pod")
        if path == "clusterip":
            for label, want in TARGET_CONN_RATIO.items():
                if label in targets:
                    ax.axhline(
                        100 * want,
                        color="grey",
                        linestyle=":",
                        linewidth=1,
                        label=f"target {label} at 10k: {want:.0%}",
                    )
        ax.set_title(title.replace("new connections/s", "% of direct"), fontsize=10)
        ax.set_xticks(range(len(sizes)), [f"{s:,}" for s in sizes])
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("new connections/s, % of direct to pod")
    fig.suptitle("Connection rate through the load balancer, relative to direct")
    fig.tight_layout()
    fig.savefig(ratio_path, format="png")
    plt.close(fig)
    return [rate_path, ratio_path]
