"""Maglev consistent-hashing lookup tables (pure; no kernel access).

Owns the table generation of the Maglev paper (Eisenbud et al., NSDI 2016, section 3.4):
every backend gets a permutation of the table's slots from two hashes of its *name*
(offset and skip), and the backends take turns claiming their next preferred free slot
until the table is full. The eBPF datapath hashes a flow onto a slot and sends it to the
backend that owns it; because every backend's preferences depend only on its own name,
adding or removing one backend moves few flows that belonged to the others.

Names, not kernel ids, feed the hashes (lbd uses "ip:port"), so a table does not change
when the backend map's id allocation does, e.g. after a restart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

# Cilium's default; the paper wants M prime and comfortably above 100x the backend count.
DEFAULT_TABLE_SIZE = 16381
# A table is one map value of M u32s (64 KiB at the default); Cilium caps M here too.
MAX_TABLE_SIZE = 131071
MIN_TABLE_SIZE = 7


class MaglevError(ValueError):
    """A table cannot be built as asked (non-prime size, too many or duplicate backends)."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def validate_table_size(size: int) -> int:
    """Return `size` if it is a usable table size, else raise MaglevError (one sentence)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise MaglevError(f"the Maglev table size must be an integer, not {size!r}")
    if not MIN_TABLE_SIZE <= size <= MAX_TABLE_SIZE:
        raise MaglevError(
            f"the Maglev table size must be between {MIN_TABLE_SIZE} and {MAX_TABLE_SIZE}, "
            f"not {size}"
        )
    if not is_prime(size):
        raise MaglevError(f"the Maglev table size must be a prime number, and {size} is not")
    return size


def _hash(name: str, salt: bytes) -> int:
    # blake2b rather than Python's hash(): stable across processes and versions, so every
    # node and every restart computes the same table for the same backends.
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=salt).digest())


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's slot permutation: slot j = (offset + j*skip) mod size."""
    offset = _hash(name, b"lbd-maglev-off") % size
    skip = _hash(name, b"lbd-maglev-skip") % (size - 1) + 1
    return offset, skip


def table_indices(names: Sequence[str], size: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """The lookup table as indices into `names`, filled in the order `names` are given.

    Callers that want order independence use `lookup_table`, which sorts first.
    """
    validate_table_size(size)
    n = len(names)
    if n == 0:
        return []
    if len(set(names)) != n:
        raise MaglevError("Maglev backend names must be unique")
    if n > size:
        raise MaglevError(f"{n} backends do not fit a Maglev table of {size} slots")
    params = [permutation_params(name, size) for name in names]
    pos = [offset for offset, _ in params]  # each backend's next preferred slot
    skips = [skip for _, skip in params]
    entry = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            c = pos[i]
            skip = skips[i]
            # skip is coprime with the prime size, so the walk visits every slot: a free
            # one is always found while the table is not full.
            while entry[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            entry[c] = i
            c += skip
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return entry


def lookup_table(names: Iterable[str], size: int = DEFAULT_TABLE_SIZE) -> list[str]:
    """The Maglev lookup table (one backend name per slot) for a set of backends.

    The result depends on the set only: the same backends in any order give the same table.
    An empty set gives an empty table (the datapath treats the service as having none).
    """
    ordered = sorted(names)
    return [ordered[i] for i in table_indices(ordered, size)]
