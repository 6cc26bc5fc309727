"""Which proxy modes exist, whether this host can run them, and how to build them.

Host checks run before anything else at start-up (before the kubeconfig is even read),
so that an operator's first line of output is the one sentence that matters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import structlog

from backends.base import Backend, HostUnsupported
from lbd.config import ProxyConfig

log = structlog.get_logger("lbd.backends.registry")


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


def other_modes(cfg: ProxyConfig, netns: str | None = None) -> list[tuple[str, Backend]]:
    """A backend for each other lbd mode that may have left a datapath on this node (a
    mode switch), built ahead of the first sync so that retiring them right after it
    costs no imports. A mode whose tooling is absent here cannot have left anything."""
    out: list[tuple[str, Backend]] = []
    for mode in ("ebpf", "iptables", "ipvs"):
        if mode == cfg.mode:
            continue
        if mode == "iptables":
            try:
                check_host(mode)
            except HostUnsupported:
                continue  # no iptables binaries: no iptables rules of ours either
        try:
            out.append((mode, create_backend(replace(cfg, mode=mode), netns=netns)))
        except (HostUnsupported, ImportError):
            continue  # not available here: it cannot have written anything
    return out


def hand_over_modes(
    others: list[tuple[str, Backend]], new_mode: str, new_backend: Backend | None = None
) -> list[str]:
    """Before `new_mode`'s first sync: prepare the other modes' datapaths for it (see
    EbpfBackend.hand_over and IptablesBackend.hand_over), and an eBPF `new_backend` for
    taking over the connections iptables balanced (EbpfBackend.take_over). The modes
    prepared."""
    told = []
    for mode, backend in others:
        if mode == "iptables" and new_mode == "ebpf":
            from backends.ebpf.backend import EbpfBackend  # the new mode's: importable
            from backends.iptables.backend import IptablesBackend  # built, so importable

            assert isinstance(backend, IptablesBackend)
            if backend.hand_over():  # lbd's rules were there
                told.append(mode)
                if isinstance(new_backend, EbpfBackend):
                    new_backend.take_over()
        if mode == "ebpf":
            from backends.ebpf.backend import EbpfBackend  # built, so importable

            assert isinstance(backend, EbpfBackend)
            if backend.hand_over():
                told.append(mode)
    return told


def retire_modes(
    others: list[tuple[str, Backend]],
    drain_seconds: float = 0.0,
    stop: threading.Event | None = None,
) -> list[str]:
    """Remove the datapaths of `others` (from `other_modes`); the modes cleaned.

    With `drain_seconds`, an eBPF datapath is drained before it goes: its frontends are
    withdrawn first (new flows reach this mode), and its programs stay that long for the
    flows it balanced already, whose NAT lives in its own conntrack (iptables and IPVS
    keep theirs in the kernel's, which outlives their rules as long as some nat table
    keeps the kernel's NAT hooks registered). `stop` set ends the wait early (the daemon
    is exiting).
    """
    draining = []
    rest = []
    for mode, backend in others:
        if drain_seconds > 0 and mode == "ebpf":
            from backends.ebpf.backend import EbpfBackend  # built, so importable

            assert isinstance(backend, EbpfBackend)
            withdrawn = backend.withdraw()
            if withdrawn:
                log.info("mode.draining", mode=mode, frontends=withdrawn, seconds=drain_seconds)
                draining.append((mode, backend))
                continue
        rest.append((mode, backend))
    cleaned = []
    for mode, backend in rest:
        backend.cleanup()
        cleaned.append(mode)
    if draining:
        (stop or threading.Event()).wait(drain_seconds)
        for mode, backend in draining:
            backend.cleanup()
            cleaned.append(mode)
    return cleaned
