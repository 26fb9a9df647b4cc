"""Which waiter goes next: stride scheduling between priority classes, FIFO inside a class.

Every distinct priority value is a class with weight `w(p)` (default: `2 ** p`, p clamped to
0..10). Each class keeps a *pass* number; serving one of its waiters adds `1 / w(p)` to it.
The next waiter comes from the non-empty class with the smallest pass (equal passes: the higher
priority first), oldest first inside it. A class that was empty (re)joins at the current virtual
time (the pass of the last admission) unless its own pass is already later, so it can neither
bank credit while idle nor be pushed behind the backlog of others.

The result: while several classes wait, they are admitted in proportion to their weights (with
priorities 1 and 0: two of the first, one of the second, repeating). A waiting class always has
a finite pass, so every class keeps progressing however heavy the load above it. When nobody
waits, all passes are forgotten.

This module is pure bookkeeping (no asyncio, no clock) so it can be tested exhaustively.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
Weight = Callable[[int], float]

MAX_WEIGHT_EXPONENT = 10  # weights stay within 1..1024: a 1024:1 share is as strict as useful


def default_weight(priority: int) -> float:
    """Each priority step doubles a class's share; below 0 counts as 0, above 10 as 10."""
    return float(2 ** min(max(priority, 0), MAX_WEIGHT_EXPONENT))


class FairQueue(Generic[T]):
    """Items keyed by a hashable handle, grouped by priority, served by weighted fairness."""

    def __init__(self, weight: Weight = default_weight) -> None:
        self._weight = weight
        self._classes: dict[int, OrderedDict[Hashable, T]] = {}
        self._passes: dict[int, float] = {}
        self._vtime = 0.0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for members in self._classes.values():
            yield from members.values()

    def push(self, priority: int, key: Hashable, item: T) -> None:
        members = self._classes.get(priority)
        if members is None:
            members = self._classes[priority] = OrderedDict()
            self._passes[priority] = max(self._passes.get(priority, self._vtime), self._vtime)
        members[key] = item
        self._size += 1

    def remove(self, priority: int, key: Hashable) -> T | None:
        members = self._classes.get(priority)
        if members is None or key not in members:
            return None
        item = members.pop(key)
        self._after_removal(priority, members)
        return item

    def counts(self) -> dict[int, int]:
        """Waiters per priority class."""
        return {p: len(members) for p, members in self._classes.items()}

    def waiting_at_least(self, priority: int) -> int:
        """Waiters of this priority or higher."""
        return sum(len(m) for p, m in self._classes.items() if p >= priority)

    def pop(self, min_priority: int | None = None) -> T:
        """Take the next item by the fairness rule, among classes of at least `min_priority`
        when given; IndexError when there is none."""
        classes = [p for p in self._classes if min_priority is None or p >= min_priority]
        if not classes:
            raise IndexError("pop from an empty FairQueue")
        priority = min(classes, key=lambda p: (self._passes[p], -p))
        members = self._classes[priority]
        _, item = members.popitem(last=False)
        self._vtime = self._passes[priority]
        self._passes[priority] += self._stride(priority)
        self._after_removal(priority, members)
        return item

    def position(self, priority: int, key: Hashable) -> int:
        """1-based place in the service order if nobody else arrived or left; 0 if absent.

        The item is served when its class's pass reaches `start`; every other class serves
        the waiters whose pass comes before that (or equals it, for a higher priority).
        """
        members = self._classes.get(priority)
        if members is None or key not in members:
            return 0
        index = _index_of(members, key)
        start = self._passes[priority] + index * self._stride(priority)
        ahead = index
        for other, others in self._classes.items():
            if other != priority:
                ahead += self._served_before(other, len(others), start, other > priority)
        return ahead + 1

    def _served_before(self, priority: int, size: int, start: float, wins_ties: bool) -> int:
        gap = start - self._passes[priority]
        if gap < 0 or (gap == 0 and not wins_ties):
            return 0
        steps = gap / self._stride(priority)
        count = math.floor(steps) + 1 if wins_ties else math.ceil(steps)
        return min(size, count)

    def _stride(self, priority: int) -> float:
        return 1.0 / self._weight(priority)

    def _after_removal(self, priority: int, members: OrderedDict[Hashable, T]) -> None:
        self._size -= 1
        if not members:
            del self._classes[priority]  # its pass is kept: rejoining cannot reset it
        if not self._size:
            self._passes.clear()
            self._vtime = 0.0


def _index_of(members: OrderedDict[Hashable, T], key: Hashable) -> int:
    for index, candidate in enumerate(members):
        if candidate == key:
            return index
    raise KeyError(key)
