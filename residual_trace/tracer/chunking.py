"""Chunk sizes from a memory budget, not fixed constants.

What grows with the input (attention patterns are quadratic in the length, vocabulary
rankings scale with the vocabulary) is processed in chunks whose size follows from a budget
for the temporaries of one step: :func:`memory_budget` bytes, 512 MiB unless the environment
variable ``RESIDUAL_TRACE_MEMORY_MB`` says otherwise (read and checked in
:mod:`residual_trace.settings`, which every experiment consults before its model loads).
Chunks only split independent items (heads, query rows, tokens), so results are identical
to unchunked ones.

Examples:
    >>> items_per_chunk(bytes_per_item=1 << 20, temporaries=4, budget=64 << 20)
    16
    >>> [(s.start, s.stop) for s in chunks(10, 4)]
    [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from residual_trace.settings import DEFAULT_MEMORY_MB, memory_mb

__all__ = ["DEFAULT_MEMORY_MB", "budget_override", "chunks", "items_per_chunk", "memory_budget"]


_override: int | None = None


@contextmanager
def budget_override(budget: int) -> Iterator[None]:
    """Use ``budget`` bytes inside the block (tests force many small chunks with it)."""
    global _override
    previous, _override = _override, budget
    try:
        yield
    finally:
        _override = previous


def memory_budget() -> int:
    """Bytes one chunked step may allocate (``RESIDUAL_TRACE_MEMORY_MB``, default 512).

    Read and checked by :func:`residual_trace.settings.memory_mb`.
    """
    if _override is not None:
        return _override
    return memory_mb() << 20


def items_per_chunk(bytes_per_item: int, temporaries: int = 1, budget: int | None = None) -> int:
    """How many items fit the budget (at least 1).

    Each item needs ``bytes_per_item`` bytes for each of ``temporaries`` live temporaries.
    """
    budget = memory_budget() if budget is None else budget
    return max(1, budget // max(1, bytes_per_item * temporaries))


def chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + size))
