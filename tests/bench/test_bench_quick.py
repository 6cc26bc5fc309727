"""The benchmark harness cannot rot: a tiny run succeeds and writes well-formed outputs.

Nothing here looks at how fast anything is (numbers come from benchmark runs, never from
tests); it checks that `python -m benchmarks` still runs end to end against the current
model and backends, both parts (control plane and data plane), that its files have the
shape readers and tooling expect, that every requested mode was measured or skipped with
a reason, and that it leaves no network namespace behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends.base import HostUnsupported
from lbd.testing import netns

REPO = Path(__file__).resolve().parents[2]
# `benchmarks` is not an installed package (setup.cfg ships lbd, backends and bpf_lb), so
# a plain `pytest` would not find it; `python -m pytest` from the checkout would.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import control_plane, data_plane, report, report_data  # noqa: E402
from benchmarks.namespaces import PREFIX  # noqa: E402


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def _leaked_namespaces() -> set[str]:
    """Benchmark namespaces whose run has ended (a live run's are none of our business)."""
    leaked = set()
    for name in netns.list_netns():
        m = re.match(rf"^{PREFIX}-(\d+)-", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            leaked.add(name)
    return leaked


def check_data_plane(results: dict, markdown: str, out: Path, modes: list[str]) -> list[str]:
    """The data-plane section is well formed; returns the labels of the measured targets.

    Every requested mode is either measured (a run per size, every test on every path,
    numbers > 0, a ratio to the direct path for each load-balanced path) or listed as
    skipped with a reason; nothing failed."""
    dp = results["data_plane"]
    cfg = dp["config"]
    assert dp["failed"] == [], dp["failed"]
    assert cfg["tools"] and all(isinstance(v, str) and v for v in cfg["tools"].values())
    assert {s["target"] for s in dp["skipped_tests"]} | set(cfg["tests"]) == set(data_plane.TESTS)
    assert all(s["reason"] for s in dp["skipped"] + dp["skipped_tests"])
    measured = {t["label"] for t in cfg["targets"]}
    skipped = {s["target"] for s in dp["skipped"]}
    for mode in modes:
        assert any(label.startswith(mode) for label in measured | skipped), mode
    for target in cfg["targets"]:
        sizes = {r["services"] for r in dp["runs"] if r["target"] == target["label"]}
        not_run = {n["services"] for n in dp["not_run"] if n["target"] == target["label"]}
        assert sizes | not_run == set(cfg["sizes"]), target
    for run in dp["runs"]:
        assert run["failures"] == [], run["failures"]
        assert run["daemon"]["start_to_synced_s"] > 0
        for test in cfg["tests"]:
            for path in ("pod", "clusterip", "pod-from-external", "nodeport"):
                samples = run["samples"][test][path]
                assert len(samples) == cfg["rounds"] and all(samples), (test, path)
                assert all(_positive(v) for v in run["summary"][test][path].values()), (test, path)
            for path in ("clusterip", "nodeport"):
                assert all(_positive(v) for v in run["ratios"][test][path].values()), (test, path)
        row = rf"^\| {re.escape(run['target'])} \| {run['services']:,} \| [\d,]+/s \| [\d,]+/s \|"
        assert re.search(row, markdown, re.MULTILINE), run["target"]
    assert "## Data plane" in markdown
    for name in report_data.PLOTS:
        assert (out / name).read_bytes().startswith(report.PNG_SIGNATURE), name
    return sorted({r["target"] for r in dp["runs"]})


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_quick_run_writes_wellformed_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--part", "control,data"]
    argv += ["--modes", "iptables", "--services", "100", "--changes", "5", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    for key in ("schema", "command", "machine", "config", "skipped", "build", "sync"):
        assert key in results, key
    machine = results["machine"]
    for key in ("kernel", "cpu_model", "python", "iptables_legacy", "lbd_commit", "date"):
        assert isinstance(machine[key], str) and machine[key], key
    assert _positive(machine["cpu_count"])

    [build] = results["build"]
    assert build["services"] == 100 and build["endpoints_per_service"] == 10
    for part in ("list", "build", "total"):
        assert _positive(build["median"][part]["wall_s"]), part
        assert _positive(build["median"][part]["cpu_s"]), part
    assert _positive(build["rebuild_one_change"]["median"]["wall_s"])
    assert build["runs"][0]["service_ports"] == 100

    assert results["sync"], f"nothing synced; skipped: {results['skipped']}"
    for sync in results["sync"]:
        assert sync["mode"] == "iptables" and sync["services"] == 100
        assert _positive(sync["full_sync"]["median"]["wall_s"])
        assert len(sync["full_sync"]["runs"]) == 3
        assert sync["kernel"]["nat_rules"] > 100 * 10  # one DNAT rule per endpoint at least
        partial = sync["changes_partial"]
        assert partial["count"] == 5 and len(partial["samples"]) == 5
        for stat in ("p50", "p99", "max"):
            assert _positive(partial["total"][stat]), stat
        # 100 services x 10 endpoints sit exactly at kube-proxy's large-cluster threshold
        # (1,000 endpoints): the first change, adding one, switches the rules to large mode,
        # which rewrites every rule once. Every later change must stay partial.
        first, *rest = partial["samples"]
        assert not any(s["ran_full"] for s in rest), "partial syncs fell back to full ones"
        full = sync["changes_full"]
        assert full["count"] == 5 and all(s["ran_full"] for s in full["samples"])

    markdown = (out / "results.md").read_text()
    assert "| mode | variant | services |" in markdown
    assert re.search(r"^\| iptables \| \w+ \| 100 \|", markdown, re.MULTILINE)
    assert "| mode | variant | services |" in proc.stdout  # the table is printed too
    for name in report.PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(report.PNG_SIGNATURE), name

    measured = check_data_plane(results, markdown, out, ["iptables"])
    assert "iptables-legacy" in measured
    assert "## Data plane" in proc.stdout
    assert not _leaked_namespaces()


@pytest.mark.kernel
@pytest.mark.timeout(900)
def test_quick_data_plane_measures_both_ebpf_paths_and_skips_what_the_host_lacks(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--part", "data"]
    argv += ["--modes", "ebpf,ipvs", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["build"] == [] and results["sync"] == []  # --part data only
    markdown = (out / "results.md").read_text()
    measured = check_data_plane(results, markdown, out, ["ebpf", "ipvs"])
    dp = results["data_plane"]
    skipped = {s["target"]: s["reason"] for s in dp["skipped"]}
    # Each mode is measured or skipped with the host's reason (no IPVS on the dev kernel).
    assert ("ipvs" in skipped) != any(t.startswith("ipvs") for t in measured)
    if "ebpf" not in skipped:
        assert {"ebpf-socket", "ebpf-tc"} <= set(measured)
        maps = {r["target"]: r["bpf_map_entries"] for r in dp["runs"]}
        assert maps["ebpf-socket"]["lbd_sockrev"] > 0 and maps["ebpf-tc"]["lbd_sockrev"] == 0
    assert not _leaked_namespaces()


def test_unavailable_modes_are_skipped_with_their_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def check_host(mode: str, variant: str = "auto") -> None:
        if variant == "nft":
            raise HostUnsupported("no nft on this pretend host.")

    monkeypatch.setattr(control_plane, "check_host", check_host)
    targets, skipped = control_plane.select_targets(["iptables", "warp-drive"], None)
    assert [t.label for t in targets] == ["iptables-legacy"]
    reasons = {s.target: s.reason for s in skipped}
    assert reasons["iptables-nft"] == "no nft on this pretend host."
    assert "unknown mode" in reasons["warp-drive"]


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert control_plane.percentile(values, 50) == pytest.approx(50.5)
    assert control_plane.percentile(values, 99) == pytest.approx(99.01)
    assert control_plane.percentile([3.0], 99) == 3.0
