"""The progress bar every long run shows: on stderr, gone when done, off when asked.

Examples:
    >>> list(progress_bar([1, 2], total=2, desc="demo", unit="item", enabled=False))
    [1, 2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T] | None = None, *, total: int, desc: str, unit: str, enabled: bool
) -> tqdm[Any]:
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand), cleared when it ends.

    It has ``total`` steps of ``unit``; ``enabled`` is the options' ``progress`` (off with
    ``--quiet`` and when stderr is not a terminal).
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
