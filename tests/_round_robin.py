"""Round robin's property, whatever its start: a new round-robin counter
starts at an offset drawn for its balance key (verdict.rr_start: from the
seed, else the OS), so tests assert the order, never the first endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rotation(picks: Sequence[T], order: Sequence[T]) -> int:
    """Where *picks* (successive picks of one round robin) start in *order*
    (its endpoints, distinct): each pick is the next of *order* from the
    first, wrapping round, else the test fails. The start's index."""
    assert picks, "no picks"
    assert picks[0] in order, (picks[0], order)
    k = list(order).index(picks[0])
    want = [order[(k + i) % len(order)] for i in range(len(picks))]
    assert list(picks) == want, f"not {list(order)}'s round robin from {picks[0]}: {list(picks)}"
    return k


def rotated(order: Sequence[T], k: int) -> list[T]:
    """*order* from its *k*-th item (modulo its length), wrapping round."""
    k %= len(order)
    return [*order[k:], *order[:k]]
