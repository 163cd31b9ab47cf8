"""Which clients take part in a round, and in which order work is handed out."""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.seeding import numpy_rng


def sample_cohort(seed: int, round: int, num_clients: int, per_round: int) -> list[int]:
    """``per_round`` distinct client ids drawn (seeded by (seed, round)) without replacement, sorted.

    Raises ValueError if ``per_round`` is not in [1, num_clients].
    """
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"clients_per_round must be in [1, {num_clients}], got {per_round}")
    if per_round == num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, "cohort", round)
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def largest_first(client_ids: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """Client ids ordered by descending shard size (ties by id): the longest jobs start first."""
    return sorted(client_ids, key=lambda c: (-int(sizes[c]), c))
