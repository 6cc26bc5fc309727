"""`python -m benchmarks`: run the benchmarks and write results.json, results.md and plots.

Owns the command line, the order of the runs and the clean-up guarantees: every
netfilter program runs in a scratch namespace deleted afterwards (also on Ctrl-C or
SIGTERM), and the API server subprocess is always stopped. Two parts: the control plane
(benchmarks.control_plane: how fast rules are programmed, the default) and the data
plane (benchmarks.data_plane: traffic through them); `--part control,data` runs both.

Needs root (network namespaces): ``sudo venv/bin/python -m benchmarks --quick``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from backends.base import HostUnsupported
from benchmarks import control_plane, data_plane, report
from benchmarks.machine import load_average, machine_info
from benchmarks.namespaces import install_signal_handlers, scratch_netns, sweep_orphans
from benchmarks.workload import Workload
from lbd import log as lbd_log

DEFAULT_SERVICES = (100, 1000, 10000)
QUICK_SERVICES = (100, 1000)
DEFAULT_CHANGES = 100
QUICK_CHANGES = 20
PARTS = ("control", "data")


def _numbers(text: str, minimum: int) -> list[int]:
    try:
        values = sorted({int(v.replace("_", "")) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or values[0] < minimum:
        raise argparse.ArgumentTypeError(
            "sizes must be positive" if minimum == 1 else f"sizes must be >= {minimum}"
        )
    return values


def _int_list(text: str) -> list[int]:
    return _numbers(text, 1)


def _size_list(text: str) -> list[int]:
    """Like _int_list, but 0 is allowed: "no other services" is the data plane's baseline."""
    return _numbers(text, 0)


def _mode_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _part_list(text: str) -> list[str]:
    parts = _mode_list(text)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Control- and data-plane benchmarks of lbd's proxy modes (needs root).",
    )
    parser.add_argument(
        "--part",
        type=_part_list,
        # Control only by default for now: existing habits (`python -m benchmarks
        # --modes X --services N`) must not silently grow a half-hour data-plane run.
        default=["control"],
        help="control, data or control,data (default control)",
    )
    parser.add_argument("--modes", type=_mode_list, default=["iptables"], help="e.g. iptables,ebpf")
    parser.add_argument(
        "--services",
        type=_int_list,
        default=None,
        help="cluster sizes, comma-separated (default 100,1000,10000; --quick: 100,1000)",
    )
    parser.add_argument("--endpoints-per-service", type=int, default=10)
    parser.add_argument(
        "--changes",
        type=int,
        default=None,
        help="single-service changes timed per size (default 100; --quick: 20)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="state builds and full syncs per size (median)"
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument(
        "--iptables-variant",
        choices=("legacy", "nft", "auto"),
        default=None,
        help="only this variant at every size (default: legacy everywhere, nft up to "
        f"{control_plane.NFT_DEFAULT_MAX_SERVICES} services, with --quick up to "
        f"{control_plane.NFT_QUICK_MAX_SERVICES})",
    )
    data = parser.add_argument_group("data plane")
    data.add_argument(
        "--other-services",
        type=_size_list,
        default=None,
        help="services installed beside the benchmark's own, comma-separated "
        f"(default {','.join(map(str, data_plane.DEFAULT_SIZES))}; "
        f"--quick: {','.join(map(str, data_plane.QUICK_SIZES))})",
    )
    data.add_argument(
        "--rounds", type=int, default=None, help="rounds over every test and path (default 3)"
    )
    data.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="length of one tool run in seconds (default 3; --quick: 1)",
    )
    data.add_argument(
        "--connections",
        type=int,
        default=data_plane.Settings().connections,
        help="wrk's concurrent connections for the new-connection rate",
    )
    data.add_argument(
        "--latency-connections",
        type=int,
        default=data_plane.Settings().latency_connections,
        help="wrk's kept-alive connections for the latency test",
    )
    data.add_argument(
        "--pin-cpus",
        action="store_true",
        help="clients on CPU 0, servers on CPU 1 (taskset); off by default",
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/out/<time>")
    args = parser.parse_args(argv)
    defaults = data_plane.Settings.quick() if args.quick else data_plane.Settings()
    args.data_settings = data_plane.Settings(
        sizes=tuple(args.other_services or defaults.sizes),
        endpoints_per_service=args.endpoints_per_service,
        rounds=args.rounds or defaults.rounds,
        seconds=args.seconds or defaults.seconds,
        connections=args.connections,
        latency_connections=args.latency_connections,
        pin_cpus=args.pin_cpus,
    )
    if min(args.connections, args.latency_connections) < 1 or args.data_settings.seconds < 1:
        parser.error("--connections and --latency-connections must be >= 1, --seconds >= 1")
    if args.services is None:
        args.services = list(QUICK_SERVICES if args.quick else DEFAULT_SERVICES)
    if args.changes is None:
        args.changes = QUICK_CHANGES if args.quick else DEFAULT_CHANGES
    if args.changes < 0 or args.endpoints_per_service < 1 or args.repeats < 1:
        parser.error("--changes must be >= 0, --endpoints-per-service and --repeats >= 1")
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path(__file__).resolve().parent / "out" / stamp
    return args


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every part asked for; results are saved after each step."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with scratch_netns() as ns:
        machine = machine_info(ns)
    results: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "machine": machine,
        "config": {
            "parts": args.part,
            "modes": args.modes,
            "services": args.services,
            "endpoints_per_service": args.endpoints_per_service,
            "changes": args.changes,
            "repeats": args.repeats,
            "quick": args.quick,
            "iptables_variant": args.iptables_variant,
            "targets": [],
        },
        "skipped": [],
        "not_run": [],
        "failed": [],
        "build": [],
        "sync": [],
    }
    if "control" in args.part:
        run_control(args, results)
        if "data" in args.part:
            # The control plane's report is complete now: write it, so that a data-plane
            # run cut short (Ctrl-C, a timeout) still leaves its tables and plots.
            report.write_all(results, out)
    if "data" in args.part:
        _log("data plane")
        data_plane.run(
            args.modes,
            args.iptables_variant,
            args.data_settings,
            quick=args.quick,
            results=results,
            save=lambda: report.write_json(results, out),
            log=_log,
        )
    results["machine"]["load_average_end"] = load_average()
    return results


def run_control(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The control-plane part: every size, every target; saved after each size."""
    out: Path = args.out
    targets, skipped = control_plane.select_targets(
        args.modes, args.iptables_variant, quick=args.quick
    )
    for s in skipped:
        _log(f"skipping {s.target}: {s.reason}")
    results["config"]["targets"] = [
        {"target": t.label, "mode": t.mode, "variant": t.variant, "max_services": t.max_services}
        for t in targets
    ]
    results["skipped"] = [{"target": s.target, "reason": s.reason} for s in skipped]
    dropped: set[control_plane.Target] = set()
    for services in args.services:
        workload = Workload(services, args.endpoints_per_service)

        def log(message: str, n: int = services) -> None:
            _log(f"{n:>6} services: {message}")

        build, snapshot = control_plane.measure_build(workload, args.repeats, log)
        results["build"].append(
            {"services": services, "endpoints_per_service": args.endpoints_per_service, **build}
        )
        for target in targets:
            if target in dropped:
                continue
            if not target.runs_at(services):
                reason = (
                    f"not run above {target.max_services:,} services by default (slow); "
                    "pass --iptables-variant to force"
                )
                log(f"{target.label}: {reason}")
                results["not_run"].append(
                    {"target": target.label, "services": services, "reason": reason}
                )
                continue
            try:
                measured = control_plane.measure_target(
                    target,
                    snapshot,
                    workload,
                    changes=args.changes,
                    repeats=args.repeats,
                    log=log,
                    quick=args.quick,
                )
            except HostUnsupported as e:
                # Found out only once a backend was built: skip the target from now on.
                log(f"skipping {target.label}: {e}")
                results["skipped"].append({"target": target.label, "reason": str(e)})
                dropped.add(target)
                continue
            except Exception as e:
                # One target failing (a sync error, a namespace removed under us by
                # someone else) must not throw away the other targets' numbers.
                error = f"{type(e).__name__}: {e}" + "".join(
                    f" ({note})" for note in getattr(e, "__notes__", ())
                )
                log(f"{target.label} FAILED: {error}")
                traceback.print_exc(file=sys.stderr)
                results["failed"].append(
                    {"target": target.label, "services": services, "error": error}
                )
                report.write_json(results, out)
                continue
            results["sync"].append(
                {
                    "services": services,
                    "endpoints_per_service": args.endpoints_per_service,
                    **measured,
                }
            )
            report.write_json(results, out)
        del snapshot
        report.write_json(results, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("python -m benchmarks needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    # Only warnings from lbd's own loggers: the reflectors' info lines would bury ours.
    lbd_log.configure("warning", json=False)
    install_signal_handlers()
    for name in sweep_orphans():
        _log(f"removed namespace {name} left by a killed run")
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    try:
        results = run(args, command)
    except KeyboardInterrupt:
        _log(f"interrupted; partial results (if any) are in {args.out}")
        return 130
    markdown = report.write_all(results, args.out)
    _log(f"results in {args.out}")
    print(markdown)
    failed = len(results["failed"]) + len(results.get("data_plane", {}).get("failed", []))
    if failed:
        _log(f"{failed} measurement(s) failed; see results.md")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
