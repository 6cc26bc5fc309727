"""The deployment manifests against Kubernetes' schemas, lbd's own CLI and each other.

Nothing here needs a cluster, root or the network. The checks that keep the manifests
honest over time: the rendered single files are what manifests/render.py makes of the
kustomizations (and what `kubectl kustomize` makes of them, where kubectl is installed);
every object is valid for each Kubernetes version that the manifests claim to support;
the DaemonSet's command lines parse with lbd's parser and load the ConfigMap's
config.conf; probes, RBAC, capabilities and mounts are what docs/deployment.md says.
"""

from __future__ import annotations

import configparser
import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbd.cli import load_run_config, parser
from lbd.config import MODES

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
# The oldest Kubernetes the manifests support: appArmorProfile (ebpf mode, and the
# cleanup-ebpf init container) is a securityContext field since 1.30.
MIN_KUBERNETES = (1, 30)


def _load_render() -> Any:
    spec = importlib.util.spec_from_file_location("lbd_manifest_render", MANIFESTS / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


def rendered(mode: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(render.output_path(mode).read_text()))


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "DaemonSet")["spec"]["template"]["spec"]


def main_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "lbd"]
    return container


def all_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = pod_spec(objects)
    return spec.get("initContainers", []) + spec["containers"]


def config_text(objects: list[dict[str, Any]]) -> str:
    return only(objects, "ConfigMap")["data"]["config.conf"]


def expand_argv(container: dict[str, Any], node: str) -> list[str]:
    """command + args as the kubelet expands them: $(VAR) from the container's env."""
    values = {}
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = env["value"]
        elif env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            values[env["name"]] = node
    argv = [*container.get("command", []), *container.get("args", [])]
    out = [re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), a) for a in argv]
    assert not any("$(" in a for a in out), f"unexpanded variable in {out}"
    return out


def run_config(objects: list[dict[str, Any]], tmp_path: Path, node: str = "node-a") -> Any:
    """The ProxyConfig `lbd run` would start with, from the DaemonSet and the ConfigMap."""
    container = main_container(objects)
    argv = expand_argv(container, node)
    assert argv[0] == "lbd"
    args = parser().parse_args(argv[1:])
    assert args.command == "run"
    # The --config path must be inside the ConfigMap's volume, under the key config.conf.
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mount = next(
        m
        for m in container["volumeMounts"]
        if Path(args.config).parent == Path(m["mountPath"]) and "configMap" in volumes[m["name"]]
    )
    cm = volumes[mount["name"]]["configMap"]["name"]
    assert cm == only(objects, "ConfigMap")["metadata"]["name"]
    assert Path(args.config).name in only(objects, "ConfigMap")["data"]
    local = tmp_path / "config.conf"
    local.write_text(config_text(objects))
    args.config = str(local)
    return load_run_config(args)


# ---- rendering ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_rendered_file_is_up_to_date(mode: str) -> None:
    assert render.output_path(mode).read_text() == render.render(mode), (
        f"manifests/lbd-{mode}.yaml is stale: run `venv/bin/python manifests/render.py`"
    )


@pytest.mark.parametrize("mode", MODES)
def test_render_agrees_with_kubectl_kustomize(mode: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    res = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / "overlays" / mode)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert list(yaml.safe_load_all(res.stdout)) == rendered(mode)


def test_render_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nimages: [{name: lbd}]\n")
    with pytest.raises(render.RenderError, match="images"):
        render.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator: [{name: x, literals: [a=b]}]\n"
    )
    with pytest.raises(render.RenderError, match="disableNameSuffixHash"):
        render.build(tmp_path)


def test_render_json6902_patch_paths_must_exist(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n"
    )
    (tmp_path / "patch.yaml").write_text("- {op: replace, path: /data/missing, value: c}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches: [{path: patch.yaml, target: {kind: ConfigMap, name: x}}]\n"
    )
    with pytest.raises(render.RenderError, match="does not exist"):
        render.build(tmp_path)
    (tmp_path / "patch.yaml").write_text(
        "- {op: add, path: /data/c, value: d}\n- {op: remove, path: /data/a}\n"
    )
    assert only(render.build(tmp_path), "ConfigMap")["data"] == {"c": "d"}


# ---- schemas --------------------------------------------------------------------------


def _schema_versions() -> list[str]:
    kv = pytest.importorskip("kubernetes_validate")
    shipped = sorted(
        {tuple(int(x) for x in v.split(".")[:2]) for v in kv.utils.all_versions()}, reverse=True
    )
    supported = [v for v in shipped if v >= MIN_KUBERNETES]
    # The oldest supported, the newest shipped, and one in between.
    picks = sorted({supported[-1], supported[len(supported) // 2], supported[0]})
    assert len(picks) >= 2, f"kubernetes-validate ships too few versions: {shipped}"
    return [f"{major}.{minor}.0" for major, minor in picks]


def _all_sources() -> dict[str, list[dict[str, Any]]]:
    sources = {"base": render.build(MANIFESTS / "base")}
    sources.update({f"lbd-{m}.yaml": rendered(m) for m in MODES})
    return sources


def test_objects_match_kubernetes_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    # validate() re-reads a version's large definitions file on every call: read it once.
    monkeypatch.setattr(kv.utils, "schema_contents", functools.cache(kv.utils.schema_contents))
    unique: dict[str, tuple[str, dict[str, Any]]] = {}
    for source, objects in _all_sources().items():
        for obj in objects:
            unique.setdefault(json.dumps(obj, sort_keys=True), (source, obj))
    failures = []
    versions = _schema_versions()
    for source, obj in unique.values():
        for version in versions:
            try:
                # strict: unknown fields are errors, as with kubectl's --validate=strict
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                failures.append(f"{source} {obj['kind']} @ {version}: {err.message}")
    assert not failures, "\n".join(failures)
    assert versions[0] == "{}.{}.0".format(*MIN_KUBERNETES)


def test_schema_validation_catches_a_typo() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    ds = copy.deepcopy(only(rendered("ebpf"), "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, _schema_versions()[-1], strict=True)


# ---- the DaemonSet and lbd's CLI ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_daemonset_command_parses_and_loads_the_configmap(mode: str, tmp_path: Path) -> None:
    cfg = run_config(rendered(mode), tmp_path, node="Node-A")
    assert cfg.mode == mode
    assert cfg.node_name == "node-a"
    assert cfg.kubeconfig is None  # in-cluster: the pod's service account
    assert cfg.cluster_cidrs  # masquerading needs the pod network


@pytest.mark.parametrize("mode", MODES)
def test_init_containers_run_known_commands(mode: str) -> None:
    for container in pod_spec(rendered(mode)).get("initContainers", []):
        argv = expand_argv(container, "node-a")
        if argv[0] == "lbd":
            args = parser().parse_args(argv[1:])
            assert (args.command, args.mode) == ("cleanup", "ebpf")
        else:
            assert argv[0] == "modprobe" and "ip_vs" in argv, argv


@pytest.mark.parametrize("mode", MODES)
def test_configmap_mode_is_the_overlays(mode: str) -> None:
    assert yaml.safe_load(config_text(rendered(mode)))["mode"] == mode


@pytest.mark.parametrize("mode", MODES)
def test_overlay_config_differs_from_base_only_in_mode(mode: str) -> None:
    base = (MANIFESTS / "base" / "config.conf").read_text()
    assert config_text(rendered(mode)) == base.replace("\nmode: iptables\n", f"\nmode: {mode}\n")


@pytest.mark.parametrize("mode", MODES)
def test_probes_use_the_configured_healthz_port(mode: str, tmp_path: Path) -> None:
    objects = rendered(mode)
    cfg = run_config(objects, tmp_path)
    port = int(cfg.healthz_bind_address.rpartition(":")[2])
    container = main_container(objects)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert named.get(get["port"], get["port"]) == port, probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "readinessProbe": "/healthz",
        "livenessProbe": "/livez",
    }


@pytest.mark.parametrize("mode", MODES)
def test_daemonset_runs_everywhere_and_rolls_one_node_at_a_time(mode: str) -> None:
    ds = only(rendered(mode), "DaemonSet")
    assert ds["metadata"]["namespace"] == "kube-system"
    strategy = ds["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["serviceAccountName"] == only(rendered(mode), "ServiceAccount")["metadata"]["name"]
    env = {e["name"]: e for e in main_container(rendered(mode))["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_applying_another_mode_rolls_the_pods() -> None:
    # A DaemonSet replaces its pods only when the pod template changes; a switch between
    # any two modes' files must change it, or the new ConfigMap would wait for a restart.
    templates = {m: only(rendered(m), "DaemonSet")["spec"]["template"] for m in MODES}
    for a in MODES:
        for b in MODES:
            if a < b:
                assert templates[a] != templates[b], (a, b)


def test_images_are_the_package_version() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    want = f"lbd:{cfg['metadata']['version']}"
    for mode in MODES:
        for container in all_containers(rendered(mode)):
            assert container["image"] == want, (mode, container["name"])


# ---- least privilege ------------------------------------------------------------------


def test_rbac_is_least_privilege() -> None:
    objects = render.build(MANIFESTS / "base")
    role = only(objects, "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    assert granted == (
        {("", "services", v) for v in read}
        | {("", "nodes", v) for v in read}
        | {("discovery.k8s.io", "endpointslices", v) for v in read}
        | {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    )
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in role["rules"])
    binding = only(objects, "ClusterRoleBinding")
    sa = only(objects, "ServiceAccount")["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    ]
    for mode in MODES:
        assert [o for o in rendered(mode) if o["kind"].endswith(("Role", "RoleBinding"))] == [
            o for o in objects if o["kind"].endswith(("Role", "RoleBinding"))
        ]


# Capabilities per container, the whole of docs/deployment.md's table.
CAPABILITIES = {
    "iptables": {"lbd": {"NET_ADMIN", "NET_RAW"}, "cleanup-ebpf": {"BPF", "NET_ADMIN"}},
    "ipvs": {
        "lbd": {"NET_ADMIN", "NET_RAW"},
        "cleanup-ebpf": {"BPF", "NET_ADMIN"},
        "load-ipvs-modules": {"SYS_MODULE"},
    },
    "ebpf": {"lbd": {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"}},
}


@pytest.mark.parametrize("mode", MODES)
def test_capabilities_per_mode(mode: str) -> None:
    got = {}
    for container in all_containers(rendered(mode)):
        sc = container["securityContext"]
        assert not sc.get("privileged", False), container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        caps = set(sc["capabilities"]["add"])
        # The API server's rule (it spells the capability with the CAP_ prefix only).
        if caps & {"SYS_ADMIN", "CAP_SYS_ADMIN"}:
            assert sc["allowPrivilegeEscalation"] is True, container["name"]
        else:
            assert sc["allowPrivilegeEscalation"] is False, container["name"]
        got[container["name"]] = caps
    assert got == CAPABILITIES[mode]


# Host paths each container sees: mount path -> (host path, read-only).
MOUNTS = {
    "iptables": {
        "lbd": {"/run/xtables.lock": ("/run/xtables.lock", False)},
        "cleanup-ebpf": {"/sys/fs/bpf": ("/sys/fs/bpf", False)},
    },
    "ipvs": {
        "lbd": {"/run/xtables.lock": ("/run/xtables.lock", False)},
        "cleanup-ebpf": {"/sys/fs/bpf": ("/sys/fs/bpf", False)},
        "load-ipvs-modules": {"/lib/modules": ("/lib/modules", True)},
    },
    "ebpf": {
        "lbd": {
            "/run/xtables.lock": ("/run/xtables.lock", False),
            "/sys/fs/bpf": ("/sys/fs/bpf", False),
            "/run/lbd/cgroupv2": ("/sys/fs/cgroup", True),
            "/lib/modules": ("/lib/modules", True),
            "/usr/src": ("/usr/src", True),
        }
    },
}


@pytest.mark.parametrize("mode", MODES)
def test_host_mounts_per_mode(mode: str) -> None:
    spec = pod_spec(rendered(mode))
    volumes = {v["name"]: v for v in spec["volumes"]}
    got = {}
    for container in all_containers(rendered(mode)):
        host = {}
        for m in container.get("volumeMounts", []):
            volume = volumes[m["name"]]  # KeyError: a mount of a volume that is not there
            # Bidirectional propagation would need a privileged container.
            assert m.get("mountPropagation", "None") in ("None", "HostToContainer")
            if "hostPath" in volume:
                host[m["mountPath"]] = (volume["hostPath"]["path"], m.get("readOnly", False))
        got[container["name"]] = host
    assert got == MOUNTS[mode]
    used = {m["name"] for c in all_containers(rendered(mode)) for m in c.get("volumeMounts", [])}
    assert used == set(volumes), "unused volumes"


def test_ebpf_mounts_are_where_the_loader_looks() -> None:
    loader = pytest.importorskip("backends.ebpf.loader")
    mounts = {m["mountPath"] for m in main_container(rendered("ebpf"))["volumeMounts"]}
    assert str(loader.BPFFS_ROOT) in mounts
    assert str(loader.CGROUP2_DEFAULT) in mounts


# ---- the image ------------------------------------------------------------------------


def test_image_recipe_checks() -> None:
    # Static checks only (packages against scripts/setup, COPY sources, entrypoint, what
    # the manifests run); the debootstrap build is scripts/build-image --rootfs.
    res = subprocess.run(
        [str(ROOT / "scripts" / "build-image"), "--check", "--no-apt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
