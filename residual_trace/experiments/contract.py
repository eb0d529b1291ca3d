"""What an experiment declares so that the engines can run it: the contract's first part.

An experiment is one object (an :class:`Experiment`), defined in its own module next to the
functions it names, and handed to the engine as it is: the engine never finds an experiment
by a name built at run time. For now the object declares what the engines need:

* ``name``: the verb (``layers``), for progress bars and messages;
* ``shard_rows(model, encoded, options) -> ShardPart``: the per-text rows of some encoded
  texts (one shard; the whole input when the engine is local), computed by the measures of
  :mod:`residual_trace.tracer`;
* ``merge_extras(extras) -> extra``: how the shards' small per-shard facts (``ShardPart.extra``)
  merge, in shard order (tables are concatenated by the engine itself).

Both callables must be module-level functions, so that the object pickles by reference to a
Ray worker. This module imports nothing heavy.

Examples:
    >>> def rows(model, encoded, options): ...
    >>> Experiment("demo", rows).merge_extras([None, None]) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from residual_trace.experiments.engine import ShardPart
    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = ["Experiment", "ShardRows", "no_extras"]

#: ``shard_rows(model, encoded, options)``: one shard's rows.
ShardRows = Callable[["TracedModel", "Sequence[EncodedText]", Any], "ShardPart"]


def no_extras(extras: list[Any]) -> None:
    """The ``merge_extras`` of an experiment whose shards carry no extra facts."""
    return None


@dataclass(frozen=True)
class Experiment:
    """One verb, as the engines see it (see the module docstring)."""

    name: str
    shard_rows: ShardRows
    merge_extras: Callable[[list[Any]], Any] = no_extras
