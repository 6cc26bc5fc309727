"""The local copy of one kind's objects, as a Reflector keeps it.

Objects stay raw dicts, keyed "namespace/name" (or "name" for cluster-scoped kinds). The
store also keeps the last resourceVersion it saw per key, including for deleted keys, so
that a duplicate or stale event replayed by a resumed watch can never move an object
back in time or resurrect a deleted one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

JSON = dict[str, Any]

# Deleted keys remembered for stale-event protection; a relist clears them anyway.
_MAX_TOMBSTONES = 50000


def _rv_int(rv: Any) -> int | None:
    # resourceVersions are opaque strings by contract but integers in practice (etcd
    # revisions). When one is not, ordering is unknown and every event is taken as new.
    try:
        return int(rv)
    except (TypeError, ValueError):
        return None


def object_key(obj: JSON, namespaced: bool = True) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if namespaced:
        return f"{meta.get('namespace') or ''}/{name}"
    return name


class Store:
    """Objects of one kind, mutated only by `replace` (after a list) and `apply` (a
    watch event). `generation` grows on every mutation, so a consumer can tell cheaply
    whether anything changed since it last looked."""

    def __init__(self, kind: str = "", *, namespaced: bool = True) -> None:
        self.kind = kind
        self.namespaced = namespaced
        self.resource_version: str = ""
        # Newest resourceVersion carried by an object event or list (not by a bookmark):
        # "the datapath reflects rv N" must mean the objects, not merely the clock.
        self.last_event_rv = 0
        self.generation = 0
        self._objects: dict[str, JSON] = {}
        self._rvs: dict[str, int] = {}
        self._tombstones: OrderedDict[str, int] = OrderedDict()

    def key(self, obj: JSON) -> str:
        return object_key(obj, self.namespaced)

    # ---- reads -----------------------------------------------------------------------

    def get(self, key: str) -> JSON | None:
        return self._objects.get(key)

    def items(self) -> list[tuple[str, JSON]]:
        return list(self._objects.items())

    def values(self) -> list[JSON]:
        return list(self._objects.values())

    def keys(self) -> list[str]:
        return list(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._objects))

    # ---- writes ----------------------------------------------------------------------

    def replace(self, objs: Iterable[JSON], resource_version: str) -> set[str]:
        """Make the store exactly `objs` (the result of a full list at
        `resource_version`). Returns the keys that were added, changed or removed."""
        new: dict[str, JSON] = {}
        rvs: dict[str, int] = {}
        for obj in objs:
            key = self.key(obj)
            new[key] = obj
            rv = _rv_int((obj.get("metadata") or {}).get("resourceVersion"))
            if rv is not None:
                rvs[key] = rv
        changed = {k for k in self._objects if k not in new}
        for key in new:
            if key not in self._objects or key not in rvs or self._rvs.get(key) != rvs[key]:
                changed.add(key)
        self._objects = new
        self._rvs = rvs
        self._tombstones.clear()
        self.resource_version = resource_version
        self.last_event_rv = max(self.last_event_rv, _rv_int(resource_version) or 0)
        self.generation += 1
        return changed

    def apply(self, event_type: str, obj: JSON) -> bool:
        """Apply one ADDED/MODIFIED/DELETED event. Returns False (and changes nothing)
        for an event that is not newer than what the store already knows for that key."""
        key = self.key(obj)
        rv_text = (obj.get("metadata") or {}).get("resourceVersion")
        rv = _rv_int(rv_text)
        if rv is not None:
            last = self._rvs.get(key)
            if last is None:
                last = self._tombstones.get(key)
            if last is not None and rv <= last:
                return False
        if event_type in ("ADDED", "MODIFIED"):
            self._objects[key] = obj
            if rv is not None:
                self._rvs[key] = rv
            else:
                self._rvs.pop(key, None)
            self._tombstones.pop(key, None)
        elif event_type == "DELETED":
            existed = self._objects.pop(key, None) is not None
            self._rvs.pop(key, None)
            if rv is not None:
                self._tombstones[key] = rv
                self._tombstones.move_to_end(key)
                while len(self._tombstones) > _MAX_TOMBSTONES:
                    self._tombstones.popitem(last=False)
            if not existed:
                self.advance(rv_text)
                return False
        else:
            raise ValueError(f"cannot apply a {event_type} event")
        self.advance(rv_text)
        self.last_event_rv = max(self.last_event_rv, rv or 0)
        self.generation += 1
        return True

    def advance(self, resource_version: str | None) -> None:
        """Move the store's resourceVersion forward (a bookmark or an applied event);
        never backward."""
        if not resource_version:
            return
        new = _rv_int(resource_version)
        cur = _rv_int(self.resource_version)
        if new is None or cur is None or new > cur:
            self.resource_version = resource_version
