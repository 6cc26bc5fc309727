"""Config files, flags and start-up failures as an operator meets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbd.config import ConfigError, build_config, parse_duration

KUBE_PROXY_CONFIG = """
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: "iptables"
clusterCIDR: 10.244.0.0/16,fd00:244::/56
nodePortAddresses: ["192.168.200.0/24"]
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
iptables:
  masqueradeAll: false
  minSyncPeriod: 500ms
  syncPeriod: 1m30s
ipvs:
  scheduler: lc
"""


def test_kube_proxy_configuration_is_read_and_flags_override_it():
    cfg = build_config(KUBE_PROXY_CONFIG, {"sync_period": 10.0, "mode": None})
    assert cfg.mode == "iptables"
    assert cfg.cluster_cidrs == ("10.244.0.0/16", "fd00:244::/56")
    assert cfg.nodeport_addresses == ("192.168.200.0/24",)
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert cfg.min_sync_period == 0.5
    assert cfg.sync_period == 10.0  # the flag wins over the file's 1m30s
    assert cfg.ipvs_scheduler == "lc"


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), (3, 3.0)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("file_text", "overrides", "message"),
    [
        (None, {"mode": "nftables"}, "not supported"),
        (None, {"cluster_cidrs": "10.244.0.0/33"}, "not a CIDR"),
        (None, {"healthz_bind_address": "nowhere"}, "host:port"),
        ("kind: Deployment", {}, "not a KubeProxyConfiguration"),
        ("[1, 2", {}, "not valid YAML"),
    ],
)
def test_invalid_settings_are_one_clear_error(file_text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(file_text, overrides)


def lbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbd", *args], capture_output=True, text=True, timeout=60
    )


def _unrunnable_modes() -> list[str]:
    from backends.base import HostUnsupported
    from backends.registry import check_host

    out = []
    for mode in ("iptables", "ipvs", "ebpf"):
        try:
            check_host(mode)
        except HostUnsupported:
            out.append(mode)
    return out or ["none"]


@pytest.mark.parametrize("mode", _unrunnable_modes())
def test_unrunnable_mode_fails_first_with_one_sentence_and_exit_2(mode, tmp_path: Path):
    if mode == "none":
        pytest.skip("this host can run every mode")
    # A broken kubeconfig must not be what the operator sees first.
    broken = tmp_path / "kubeconfig"
    broken.write_text("{not yaml")
    proc = lbd("run", "--proxy-mode", mode, "--kubeconfig", str(broken))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lbd: {mode} mode"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_file_fails_with_exit_2(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("mode: sideways\n")
    proc = lbd("run", "--config", str(path))
    assert proc.returncode == 2 and "sideways" in proc.stderr and "Traceback" not in proc.stderr
    proc = lbd("run", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_unknown_ipvs_scheduler_is_one_clear_error():
    with pytest.raises(ConfigError, match="IPVS scheduler 'bogus'"):
        build_config(None, {"ipvs_scheduler": "bogus"})
    assert build_config(None, {"ipvs_scheduler": "sh"}).ipvs_scheduler == "sh"
