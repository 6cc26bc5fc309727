"""The `lbd` command line: run, cleanup, status, demo.

Flag names follow kube-proxy's where the concept is the same, so that a kube-proxy
command line or ConfigMap carries over. Every operator-facing failure at start-up is one
sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backends.base import HostUnsupported
from lbd.config import MODES, ConfigError, ProxyConfig, build_config, parse_duration

EXIT_USAGE = 2


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proxy-mode", dest="mode", choices=MODES, help="datapath (default iptables)")
    p.add_argument("--config", help="a KubeProxyConfiguration (v1alpha1) YAML file")
    p.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster config)")
    p.add_argument("--master", help="API server URL, overriding the kubeconfig's")
    p.add_argument("--hostname-override", help="this node's name (default: $NODE_NAME, hostname)")
    p.add_argument(
        "--cluster-cidr",
        dest="cluster_cidrs",
        help="pod CIDRs, comma-separated; traffic from outside them is masqueraded",
    )
    p.add_argument("--nodeport-addresses", help="CIDRs whose local addresses accept node ports")
    p.add_argument(
        "--min-sync-period", type=parse_duration, help="least time between syncs (e.g. 1s)"
    )
    p.add_argument("--sync-period", type=parse_duration, help="full resync period (e.g. 30s)")
    p.add_argument("--healthz-bind-address", help="host:port for /healthz (0.0.0.0:10256)")
    p.add_argument("--metrics-bind-address", help="host:port for /metrics (127.0.0.1:10249)")
    p.add_argument(
        "--masquerade-all",
        action="store_true",
        default=None,
        help="SNAT all traffic to service IPs",
    )
    p.add_argument(
        "--iptables-variant",
        choices=("auto", "legacy", "nft"),
        help="iptables backend of the host (auto: detect as kube-proxy does)",
    )
    p.add_argument("--ipvs-scheduler", help="IPVS scheduler (rr, lc, sh, ...; default rr)")
    ebpf = p.add_argument_group("ebpf mode (names follow Cilium's where they exist)")
    _add_ebpf_flags(ebpf)
    p.add_argument("--log-level", default="info")


def _add_ebpf_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--cgroup-root",
        help="cgroup v2 directory whose processes get socket LB "
        "(default /run/lbd/cgroupv2, mounted if needed; '' disables socket LB)",
    )
    p.add_argument(
        "--bpffs-root", help="where maps and links are pinned (default /sys/fs/bpf/lbd/default)"
    )
    p.add_argument(
        "--bpf-lb-sock-hostns-only",
        action="store_true",
        default=None,
        help="socket LB only for the host's namespace; pods use the tc path",
    )
    p.add_argument("--lb-algorithm", choices=("random", "maglev"), help="backend selection")
    p.add_argument("--maglev-table-size", type=int, help="Maglev table size (a prime)")
    p.add_argument(
        "--bpf-lb-map-max",
        type=int,
        help="entries of the service, backend and reverse-NAT maps (default 262144 for "
        "services and backends, 65536 for reverse NAT; a service port's frontend takes 1 + "
        "its endpoints; entries are allocated as used)",
    )
    p.add_argument("--devices", help="uplink devices for tc LB (comma-separated)")
    p.add_argument(
        "--pod-devices", help="pod-facing devices or globs for tc LB (comma-separated, e.g. 'vp*')"
    )


def ebpf_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ebpf flags given on the command line, as backends.ebpf.from_config reads them."""
    names = {
        "cgroup_root": "cgroup",
        "bpffs_root": "bpffs",
        "bpf_lb_sock_hostns_only": "hostns_only",
        "lb_algorithm": "lb_algorithm",
        "maglev_table_size": "maglev_table_size",
        "devices": "devices",
        "pod_devices": "pod_devices",
    }
    out: dict[str, Any] = {}
    for flag, key in names.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if key in ("devices", "pod_devices"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[key] = value
    size = getattr(args, "bpf_lb_map_max", None)
    if size is not None:
        out["map_sizes"] = {"services": size, "backends": size, "rev_nat": size}
    return out


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lbd", description="lbd: a kube-proxy replacement")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node proxy")
    _add_run_flags(run)
    clean = sub.add_parser("cleanup", help="remove everything lbd created on this node")
    clean.add_argument("--proxy-mode", dest="mode", choices=(*MODES, "all"), default="all")
    clean.add_argument(
        "--kube-proxy-leftovers",
        action="store_true",
        help="also remove kube-proxy's KUBE-* chains (migration aid)",
    )
    _add_ebpf_flags(clean)
    status = sub.add_parser("status", help="what the kernel holds now: frontends → endpoints")
    status.add_argument("--proxy-mode", dest="mode", choices=MODES, default="iptables")
    status.add_argument("--iptables-variant", choices=("auto", "legacy", "nft"), default="auto")
    status.add_argument("--json", action="store_true")
    _add_ebpf_flags(status)
    demo = sub.add_parser("demo", help="a 2-node mini-cluster in network namespaces, with traffic")
    demo.add_argument("--proxy-mode", dest="mode", choices=MODES, default="iptables")
    demo.add_argument("--requests", type=int, default=40, help="requests per client and service")
    demo.add_argument("--json", action="store_true")
    return top


def fail(message: str) -> int:
    print(f"lbd: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_run_config(args: argparse.Namespace) -> ProxyConfig:
    file_text = None
    if args.config:
        try:
            file_text = Path(args.config).read_text()
        except OSError as err:
            raise ConfigError(
                f"cannot read the config file {args.config}: {err.strerror}"
            ) from None
    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "mode",
            "kubeconfig",
            "master",
            "hostname_override",
            "cluster_cidrs",
            "nodeport_addresses",
            "min_sync_period",
            "sync_period",
            "healthz_bind_address",
            "metrics_bind_address",
            "masquerade_all",
            "iptables_variant",
            "ipvs_scheduler",
        )
    }
    ebpf = ebpf_options(args)
    if ebpf:
        overrides["extra"] = {"ebpf": ebpf}
    return build_config(file_text, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from backends.registry import check_host

    try:
        cfg = load_run_config(args)
        check_host(cfg.mode, cfg.iptables_variant)
    except (ConfigError, HostUnsupported) as err:
        return fail(str(err))
    from lbd.daemon import main as daemon_main

    return daemon_main(cfg, log_level=args.log_level)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from backends.registry import create_backend

    modes = MODES if args.mode == "all" else (args.mode,)
    for mode in modes:
        try:
            backend = create_backend(ProxyConfig(mode=mode, extra={"ebpf": ebpf_options(args)}))
        except (HostUnsupported, ImportError):
            continue  # a mode this host cannot run has written nothing here
        if mode == "iptables":
            backend.cleanup(remove_kube_leftovers=args.kube_proxy_leftovers)  # type: ignore[call-arg]
        else:
            backend.cleanup()
    return 0


def format_status(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no services programmed"
    head = ("SERVICE", "KIND", "FRONTEND", "ENDPOINTS")
    table = [head] + [
        (r["service"], r["kind"], r["frontend"], ", ".join(r["endpoints"]) or "(none: reject)")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row))
        for row in table
    )


def cmd_status(args: argparse.Namespace) -> int:
    from backends.registry import check_host, create_backend

    try:
        check_host(args.mode, args.iptables_variant)
    except HostUnsupported as err:
        return fail(str(err))
    backend = create_backend(
        ProxyConfig(
            mode=args.mode,
            iptables_variant=args.iptables_variant,
            extra={"ebpf": ebpf_options(args)},
        )
    )
    rows = [
        {
            "service": s.service,
            "kind": s.kind,
            "frontend": s.frontend,
            "endpoints": list(s.endpoints),
        }
        for s in backend.status()
    ]
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from backends.registry import check_host

    try:
        check_host(args.mode)
    except HostUnsupported as err:
        return fail(str(err))
    from lbd.demo import main as demo_main

    return demo_main(mode=args.mode, requests=args.requests, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lbd import log as lbd_log

    # Logs go to stderr so that `lbd status --json` keeps stdout machine-readable.
    lbd_log.configure(getattr(args, "log_level", "warning"))
    handler = {"run": cmd_run, "cleanup": cmd_cleanup, "status": cmd_status, "demo": cmd_demo}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
