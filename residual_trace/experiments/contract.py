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
Ray worker. Every experiment on texts opens with :func:`open_run` (the inputs read and
checked, the notes collected, the model resolved and checked, the seed set, the texts
encoded), so that opening is written once. This module imports nothing heavy at import time.

Examples:
    >>> def rows(model, encoded, options): ...
    >>> Experiment("demo", rows).merge_extras([None, None]) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from residual_trace.experiments.common import load_inputs, resolve_model
from residual_trace.experiments.options import CorpusOptions, ModelArg, Texts, Warn

if TYPE_CHECKING:
    from residual_trace.experiments.engine import ShardPart
    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = ["Experiment", "Opening", "ShardRows", "no_extras", "open_run"]

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


class Opening(NamedTuple):
    """What an experiment on texts starts from (see :func:`open_run`)."""

    #: the texts, normalised, in order (text ``i`` has ``text_id`` ``i``)
    texts: list[str]
    #: where they came from, for ``run.json``
    source: str
    #: the model the run measures
    model: TracedModel
    #: the texts tokenised and truncated as the model reads them
    encoded: list[EncodedText]
    #: every note and warning of the run so far (``run.json``'s ``notes``); it grows
    notes: list[str]
    #: records a note in ``notes`` and passes it to the run's ``warn``
    note: Callable[[str], None]


def open_run(
    model: ModelArg,
    texts: Texts,
    options: CorpusOptions,
    warn: Warn,
    check_model: Callable[[TracedModel], None] | None = None,
) -> Opening:
    """The opening every experiment on texts shares, in this order: read and check the
    texts (a bad text fails before the model loads), resolve the model (its notes are
    collected), let ``check_model`` refuse options the model cannot meet (a block it does
    not have), seed torch, and encode the texts (truncation warnings collected as
    ``warning: ...`` notes)."""
    from residual_trace.tracer import prepare_texts  # torch: only once a run starts

    texts_list, source = load_inputs(texts)
    options.check_texts(texts_list)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    traced = resolve_model(model, note)
    if check_model is not None:
        check_model(traced)
    options.seed_torch()
    encoded = prepare_texts(
        traced, texts_list, options.max_length, warn=lambda m: note(f"warning: {m}")
    )
    return Opening(texts_list, source, traced, list(encoded), notes, note)
