"""Chunk sizes from a memory budget, not fixed constants.

What grows with the input (attention patterns are quadratic in the length, vocabulary
rankings scale with the vocabulary) is processed in chunks whose size follows from a budget
for the temporaries of one step: :func:`memory_budget` bytes, 512 MiB unless the environment
variable ``RESIDUAL_TRACE_MEMORY_MB`` says otherwise. Chunks only split independent items
(heads, query rows, tokens), so results are identical to unchunked ones.

Examples:
    >>> items_per_chunk(bytes_per_item=1 << 20, temporaries=4, budget=64 << 20)
    16
    >>> [(s.start, s.stop) for s in chunks(10, 4)]
    [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from residual_trace.errors import UserError

#: Default budget for the temporaries of one chunked step, in MiB.
DEFAULT_MEMORY_MB = 512


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
    """Bytes one chunked step may allocate (``RESIDUAL_TRACE_MEMORY_MB``, default 512)."""
    if _override is not None:
        return _override
    raw = os.environ.get("RESIDUAL_TRACE_MEMORY_MB", "").strip()
    if not raw:
        return DEFAULT_MEMORY_MB << 20
    try:
        value = int(raw)
    except ValueError:
        raise UserError(
            f"RESIDUAL_TRACE_MEMORY_MB={raw!r}: expected a whole number of MiB"
        ) from None
    if value < 16:
        raise UserError(f"RESIDUAL_TRACE_MEMORY_MB={value}: expected at least 16 (MiB)")
    return value << 20


def items_per_chunk(bytes_per_item: int, temporaries: int = 1, budget: int | None = None) -> int:
    """How many items fit the budget when each needs ``bytes_per_item`` bytes for each of
    ``temporaries`` live temporaries (at least 1)."""
    budget = memory_budget() if budget is None else budget
    return max(1, budget // max(1, bytes_per_item * temporaries))


def chunks(total: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + size))
