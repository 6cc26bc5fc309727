"""Which proxy modes exist, whether this host can run them, and how to build them.

Host checks run before anything else at start-up (before the kubeconfig is even read),
so that an operator's first line of output is the one sentence that matters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from backends.base import Backend, HostUnsupported
from lbd.config import ProxyConfig


def check_host(mode: str, variant: str = "auto") -> None:
    """Raise HostUnsupported with one sentence when this host cannot run `mode`."""
    if mode == "iptables":
        wanted = {
            "auto": ["iptables-restore"],
            "legacy": ["iptables-legacy-restore"],
            "nft": ["iptables-nft-restore"],
        }[variant]
        for binary in [*wanted, *(w.replace("iptables", "ip6tables") for w in wanted)]:
            if shutil.which(binary) is None:
                raise HostUnsupported(
                    f"iptables mode needs the {binary} binary, which is not installed on this host."
                )
        return
    if mode == "ipvs":
        if not Path("/proc/net/ip_vs").exists() and shutil.which("modprobe"):
            # IPVS is usually a module: load it as kube-proxy does (harmless where the
            # kernel has no module support, or no IPVS at all).
            subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, check=False)
        if not Path("/proc/net/ip_vs").exists():
            raise HostUnsupported(
                "ipvs mode needs a kernel with IPVS (CONFIG_IP_VS), and this kernel has none "
                "(/proc/net/ip_vs is missing)."
            )
        for binary in ("iptables-restore", "ip6tables-restore"):
            if shutil.which(binary) is None:
                raise HostUnsupported(
                    f"ipvs mode needs the {binary} binary for its few iptables rules, which "
                    "is not installed on this host."
                )
        return
    if mode == "ebpf":
        build = Path("/lib/modules") / os.uname().release / "build"
        if not (build / "include").exists() and not (build / "Makefile").exists():
            raise HostUnsupported(
                f"ebpf mode needs kernel headers for BCC at {build}, which is missing "
                "(mount the host's /lib/modules and /usr/src, or run scripts/setup)."
            )
        from backends.ebpf import check_host as ebpf_check_host

        ebpf_check_host()
        return
    raise HostUnsupported(f"proxy mode {mode!r} is unknown (choose iptables, ipvs or ebpf).")


def create_backend(cfg: ProxyConfig, netns: str | None = None) -> Backend:
    if cfg.mode == "iptables":
        from backends.iptables.backend import IptablesBackend

        return IptablesBackend(variant=cfg.iptables_variant, netns=netns)
    if cfg.mode == "ebpf":
        from backends.ebpf import from_config

        return from_config(cfg, netns)
    if cfg.mode == "ipvs":
        from backends.ipvs.backend import IpvsBackend

        return IpvsBackend(scheduler=cfg.ipvs_scheduler, variant=cfg.iptables_variant, netns=netns)
    raise HostUnsupported(f"proxy mode {cfg.mode!r} is not implemented in this build of lbd yet.")


def cleanup_other_modes(cfg: ProxyConfig, netns: str | None = None) -> list[str]:
    """Remove what other lbd modes left on this node (a mode switch); the modes cleaned.

    The daemon runs it once this mode's first sync is in, so services stay reachable
    while the datapaths change hands. A mode whose tooling is absent here cannot have
    left anything behind.
    """
    cleaned = []
    for mode in ("iptables", "ipvs", "ebpf"):
        if mode == cfg.mode:
            continue
        if mode == "iptables":
            try:
                check_host(mode)
            except HostUnsupported:
                continue  # no iptables binaries: no iptables rules of ours either
        try:
            backend = create_backend(replace(cfg, mode=mode), netns=netns)
        except (HostUnsupported, ImportError):
            continue  # not available here: it cannot have written anything
        backend.cleanup()
        cleaned.append(mode)
    return cleaned
