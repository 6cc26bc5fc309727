"""ProxyConfig: lbd's settings from flags and from kube-proxy's KubeProxyConfiguration file.

A kube-proxy ConfigMap (kubeproxy.config.k8s.io/v1alpha1) can be reused as it is; flags
given on the command line override the file, as with kube-proxy.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

MODES = ("iptables", "ipvs", "ebpf")


class ConfigError(ValueError):
    """A setting is invalid: the message is one sentence for the operator."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    mode: str = "iptables"
    kubeconfig: str | None = None  # None: in-cluster
    master: str | None = None
    hostname_override: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    masquerade_all: bool = False
    iptables_variant: str = "auto"  # auto | legacy | nft
    ipvs_scheduler: str = "rr"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def node_name(self) -> str:
        name = self.hostname_override or os.environ.get("NODE_NAME") or socket.gethostname()
        return name.strip().lower()


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(h|ms|m|s))")


def parse_duration(text: str | float | int) -> float:
    """Go-style durations ("1s", "500ms", "1m30s") or plain seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not a duration")
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    pos, total = 0, 0.0
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * scale[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ConfigError(f"{text!r} is not a duration like 1s, 500ms or 1m30s")
    return total


def parse_cidrs(value: str | list[str] | tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item == "primary":
            # kube-proxy's special value: the node's primary IPs; lbd treats it as unset
            # (all local addresses) until Node addresses are wired through.
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{what}: {item!r} is not a CIDR") from None
    return tuple(out)


def parse_bind_address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{what}: {value!r} must be host:port")
    try:
        if host.strip("[]"):
            ipaddress.ip_address(host.strip("[]"))
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{what}: {value!r} must be an IP address and a port") from None
    return value


def from_kube_proxy_configuration(text: str) -> dict[str, Any]:
    """Map a KubeProxyConfiguration (v1alpha1) document to ProxyConfig field values."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"the config file is not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise ConfigError("the config file does not hold a KubeProxyConfiguration object")
    kind = doc.get("kind")
    if kind not in (None, "KubeProxyConfiguration"):
        raise ConfigError(f"the config file holds a {kind!r}, not a KubeProxyConfiguration")
    out: dict[str, Any] = {}
    mode = doc.get("mode")
    if mode:
        out["mode"] = mode
    conn = doc.get("clientConnection") or {}
    if conn.get("kubeconfig"):
        out["kubeconfig"] = conn["kubeconfig"]
    if doc.get("hostnameOverride"):
        out["hostname_override"] = doc["hostnameOverride"]
    if doc.get("clusterCIDR"):
        out["cluster_cidrs"] = parse_cidrs(doc["clusterCIDR"], "clusterCIDR")
    if doc.get("nodePortAddresses"):
        out["nodeport_addresses"] = parse_cidrs(doc["nodePortAddresses"], "nodePortAddresses")
    if doc.get("healthzBindAddress"):
        out["healthz_bind_address"] = doc["healthzBindAddress"]
    if doc.get("metricsBindAddress"):
        out["metrics_bind_address"] = doc["metricsBindAddress"]
    # The sync periods live per mode in kube-proxy's file; take the selected mode's.
    section = doc.get({"ipvs": "ipvs"}.get(str(mode), "iptables")) or {}
    if section.get("syncPeriod"):
        out["sync_period"] = parse_duration(section["syncPeriod"])
    if section.get("minSyncPeriod") is not None:
        out["min_sync_period"] = parse_duration(section["minSyncPeriod"])
    iptables = doc.get("iptables") or {}
    if iptables.get("masqueradeAll") is not None:
        out["masquerade_all"] = bool(iptables["masqueradeAll"])
    ipvs = doc.get("ipvs") or {}
    if ipvs.get("scheduler"):
        out["ipvs_scheduler"] = ipvs["scheduler"]
    return out


def build_config(file_text: str | None, overrides: dict[str, Any]) -> ProxyConfig:
    """File values, then flag values on top; validated."""
    values: dict[str, Any] = {}
    if file_text is not None:
        values.update(from_kube_proxy_configuration(file_text))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ProxyConfig)}
    cfg = ProxyConfig(**{k: v for k, v in values.items() if k in known})
    if cfg.mode not in MODES:
        raise ConfigError(
            f"proxy mode {cfg.mode!r} is not supported by lbd (choose iptables, ipvs or ebpf)"
        )
    if cfg.iptables_variant not in ("auto", "legacy", "nft"):
        raise ConfigError(f"iptables variant {cfg.iptables_variant!r} is not auto, legacy or nft")
    from backends.ipvs.plan import SCHEDULERS

    if cfg.ipvs_scheduler not in SCHEDULERS:
        known = ", ".join(sorted(SCHEDULERS))
        raise ConfigError(f"IPVS scheduler {cfg.ipvs_scheduler!r} is unknown (one of {known})")
    if cfg.min_sync_period < 0 or cfg.sync_period <= 0:
        raise ConfigError("sync periods must be positive durations")
    parse_bind_address(cfg.healthz_bind_address, "healthz bind address")
    parse_bind_address(cfg.metrics_bind_address, "metrics bind address")
    return replace(
        cfg,
        cluster_cidrs=parse_cidrs(cfg.cluster_cidrs, "cluster CIDR"),
        nodeport_addresses=parse_cidrs(cfg.nodeport_addresses, "nodeport addresses"),
    )
