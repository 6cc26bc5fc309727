#!/usr/bin/env python3
"""Render each overlay (manifests/overlays/<mode>) into one file, manifests/lbd-<mode>.yaml.

The overlays are ordinary kustomizations (`kubectl apply -k` works on them); this script
exists so that the single-file manifests can be produced and checked where no kustomize
binary is at hand. It implements only what lbd's kustomizations use — `resources`,
`configMapGenerator` (with `generatorOptions.disableNameSuffixHash`) and JSON 6902
`patches` with a `target` — and refuses anything else instead of ignoring it, because a
silently skipped field would produce a manifest that differs from `kubectl kustomize`.

    python manifests/render.py            # rewrite manifests/lbd-<mode>.yaml
    python manifests/render.py --check    # exit 1 if any of them is out of date

Needs only PyYAML.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
MODES = ("iptables", "ipvs", "ebpf")
KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
# kustomize's default ("legacy") output order for the kinds it knows; an object must exist
# before what refers to it when `kubectl apply -f` walks the file top to bottom.
KIND_ORDER = (
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
)

Obj = dict[str, Any]


class RenderError(Exception):
    """A kustomization uses something this renderer does not implement, or is wrong."""


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RenderError(f"{path}: {err}") from None


def _load_objects(path: Path) -> list[Obj]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as err:
        raise RenderError(f"{path}: {err}") from None
    out = [d for d in docs if d is not None]
    for d in out:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return out


def _identity(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace", ""), meta["name"]


# ---- configMapGenerator ---------------------------------------------------------------


def _generator_data(gen: Obj, directory: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, sep, rel = str(entry).partition("=")
        if not sep:
            key, rel = Path(entry).name, entry
        data[key] = (directory / rel).read_text()
    for entry in gen.get("literals", []):
        key, sep, value = str(entry).partition("=")
        if not sep:
            raise RenderError(f"literal {entry!r} is not key=value")
        data[key] = value
    return data


def _apply_generator(objects: list[Obj], gen: Obj, directory: Path) -> None:
    unknown = set(gen) - {"name", "namespace", "behavior", "files", "literals"}
    if unknown:
        raise RenderError(f"configMapGenerator fields not supported: {sorted(unknown)}")
    meta: Obj = {"name": gen["name"]}
    if gen.get("namespace"):
        meta["namespace"] = gen["namespace"]
    wanted = ("ConfigMap", meta.get("namespace", ""), meta["name"])
    data = _generator_data(gen, directory)
    behavior = gen.get("behavior", "create")
    existing = [o for o in objects if _identity(o) == wanted]
    if behavior == "create":
        if existing:
            raise RenderError(f"ConfigMap {meta['name']} exists already (use behavior: merge)")
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
        return
    if behavior not in ("merge", "replace"):
        raise RenderError(f"configMapGenerator behavior {behavior!r} is unknown")
    if not existing:
        raise RenderError(f"ConfigMap {meta['name']} to {behavior} does not exist")
    target = existing[0]
    if behavior == "replace":
        target["data"] = data
    else:
        target.setdefault("data", {}).update(data)


# ---- JSON 6902 patches ----------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        try:
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise RenderError(f"patch path {path} does not exist") from None
    return doc


def _apply_op(doc: Obj, op: Obj) -> None:
    kind, path = op.get("op"), op.get("path", "")
    *parents, last = _pointer(path)
    parent = _walk(doc, parents, path)
    if kind == "add":
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            else:
                index = int(last)
                if not 0 <= index <= len(parent):
                    raise RenderError(f"patch path {path}: index out of range")
                parent.insert(index, value)
        elif isinstance(parent, dict):
            parent[last] = value
        else:
            raise RenderError(f"patch path {path}: parent is not a list or an object")
    elif kind in ("replace", "remove"):
        _walk(parent, [last], path)  # must exist, as RFC 6902 requires for both
        if kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(op["value"])
    else:
        raise RenderError(f"patch op {kind!r} is not supported (add, replace, remove)")


def _apply_patch(objects: list[Obj], patch: Obj, directory: Path) -> None:
    if set(patch) != {"path", "target"}:
        raise RenderError("only patches with `path` and `target` (JSON 6902) are supported")
    target = patch["target"]
    unknown = set(target) - {"kind", "name", "namespace"}
    if unknown:
        raise RenderError(f"patch target fields not supported: {sorted(unknown)}")
    ops = _load_yaml(directory / patch["path"])
    if not isinstance(ops, list):
        raise RenderError(f"{patch['path']}: only JSON 6902 patches (a list of ops) are supported")
    matched = [
        o
        for o in objects
        if all((o["kind"] if k == "kind" else o["metadata"].get(k)) == v for k, v in target.items())
    ]
    if not matched:
        raise RenderError(f"patch {patch['path']} matches no object ({target})")
    for obj in matched:
        for op in ops:
            _apply_op(obj, op)


# ---- kustomizations -------------------------------------------------------------------


def build(directory: Path) -> list[Obj]:
    """The objects a kustomization directory describes, in kustomize's output order."""
    directory = Path(directory)
    kust = _load_yaml(directory / KUSTOMIZATION)
    if not isinstance(kust, dict):
        raise RenderError(f"{directory / KUSTOMIZATION} is not a kustomization")
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{directory}: kustomization fields not supported: {sorted(unknown)}")
    objects: list[Obj] = []
    for res in kust.get("resources", []):
        path = directory / res
        objects.extend(build(path) if path.is_dir() else _load_objects(path))
    generators = kust.get("configMapGenerator", [])
    if generators and not (kust.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        # kustomize would append a content hash to the name; that is not implemented here.
        raise RenderError(f"{directory}: configMapGenerator needs disableNameSuffixHash: true")
    for gen in generators:
        _apply_generator(objects, gen, directory)
    for patch in kust.get("patches", []):
        _apply_patch(objects, patch, directory)
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        if _identity(obj) in seen:
            raise RenderError(f"{directory}: {_identity(obj)} is defined twice")
        seen.add(_identity(obj))
    return sorted(
        objects,
        key=lambda o: KIND_ORDER.index(o["kind"]) if o["kind"] in KIND_ORDER else len(KIND_ORDER),
    )


class _Dumper(yaml.SafeDumper):
    """Strings styled as kustomize writes them (multi-line ones, like the embedded
    config.conf, as literal blocks; the empty string double-quoted), so that a rendered
    file and `kubectl kustomize`'s output can be compared as text."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else ('"' if value == "" else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(mode: str) -> str:
    objects = build(HERE / "overlays" / mode)
    header = (
        f"# lbd, proxy mode {mode}: `kubectl apply -f` this file.\n"
        f"# Rendered by manifests/render.py from manifests/overlays/{mode} and manifests/base;\n"
        "# edit those and re-run `python manifests/render.py`, never this file.\n"
    )
    body = yaml.dump_all(
        objects, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=4096
    )
    return header + body


def output_path(mode: str) -> Path:
    return HERE / f"lbd-{mode}.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = ap.parse_args(argv)
    stale = []
    for mode in MODES:
        text, path = render(mode), output_path(mode)
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    for path in stale:
        verb = "out of date" if args.check else "written"
        print(f"{path.relative_to(HERE.parent)}: {verb}", file=sys.stderr)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RenderError as err:
        print(f"render.py: {err}", file=sys.stderr)
        sys.exit(2)
