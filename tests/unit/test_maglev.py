"""Maglev lookup tables: even spread, minimal disruption, determinism, size validation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bpf_lb.maglev import (
    DEFAULT_TABLE_SIZE,
    MaglevError,
    is_prime,
    lookup_table,
    permutation_params,
    table_indices,
    validate_table_size,
)

M = DEFAULT_TABLE_SIZE


def backends(n: int, port: int = 8080) -> list[str]:
    return [f"10.{1 + i // 250}.{i % 250}.{7 + i % 3}:{port}" for i in range(n)]


def test_default_size_is_prime() -> None:
    assert is_prime(M)
    assert validate_table_size(M) == M


@pytest.mark.parametrize("n", range(3, 101))
def test_even_spread(n: int) -> None:
    table = lookup_table(backends(n))
    assert len(table) == M
    shares = Counter(table)
    assert set(shares) == set(backends(n))
    # Round-robin filling gives every backend floor(M/N) or ceil(M/N) slots: far inside
    # "a few percent of M/N".
    for share in shares.values():
        assert abs(share - M / n) <= 1
        assert abs(share - M / n) / (M / n) < 0.03


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 16, 25, 33, 50, 64, 100])
def test_minimal_disruption_on_removal(n: int) -> None:
    names = backends(n)
    before = lookup_table(names)
    for k in sorted({0, n // 2, n - 1}):
        removed = names[k]
        after = lookup_table(names[:k] + names[k + 1 :])
        assert removed not in after
        # Slots the removed backend owned must move; any other slot that moves is
        # disruption. Maglev keeps it near M/N (measured <= 1.51 M/N for N <= 100).
        moved_others = sum(1 for b, a in zip(before, after, strict=True) if b != a and b != removed)
        assert moved_others <= 2 * M / n, (n, k, moved_others, M / n)


def test_minimal_disruption_on_addition() -> None:
    names = backends(20)
    before = lookup_table(names)
    after = lookup_table([*names, "10.9.9.9:8080"])
    gained = sum(1 for a in after if a == "10.9.9.9:8080")
    changed = sum(1 for b, a in zip(before, after, strict=True) if b != a)
    assert abs(gained - M / 21) <= 1
    # The newcomer takes its share, plus a little churn among the others.
    assert changed <= gained + 2 * M / 21


def test_deterministic_in_any_order() -> None:
    names = backends(37)
    reference = lookup_table(names)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = list(names)
        rng.shuffle(shuffled)
        assert lookup_table(shuffled) == reference
    # And across calls/processes: the hashes are not Python's randomised hash().
    assert permutation_params("10.0.0.1:80", M) == permutation_params("10.0.0.1:80", M)


def test_small_table_and_single_backend() -> None:
    assert lookup_table(["a"], 7) == ["a"] * 7
    assert lookup_table([], 7) == []
    table = table_indices(["a", "b", "c"], 7)
    assert sorted(Counter(table).values()) == [2, 2, 3]


def test_every_slot_is_filled_with_many_backends() -> None:
    table = lookup_table(backends(251), 251)
    assert sorted(table) == sorted(backends(251))


@pytest.mark.parametrize("size", [0, 1, 4, 16380, 16383, 65536, 131073, 262147])
def test_rejects_non_prime_or_out_of_range_sizes(size: int) -> None:
    with pytest.raises(MaglevError):
        validate_table_size(size)
    with pytest.raises(MaglevError):
        lookup_table(["a", "b"], size)


@pytest.mark.parametrize("size", [7, 251, 1021, 4099, 16381, 65521, 131071])
def test_accepts_primes(size: int) -> None:
    assert validate_table_size(size) == size


def test_rejects_bad_backend_sets() -> None:
    with pytest.raises(MaglevError):
        validate_table_size(True)  # type: ignore[arg-type]
    with pytest.raises(MaglevError):
        table_indices(["a", "a"], 7)
    with pytest.raises(MaglevError):
        lookup_table([str(i) for i in range(8)], 7)
