"""The experiment contract: what one verb declares, and what is derived from it.

A verb (``trace layers``, ``rt.layers``) is one :class:`Experiment` object, defined in its own
module of :mod:`residual_trace.experiments` next to its options class, its result class and
the functions it names. From that one object:

* the ``trace`` command line builds the command (:mod:`residual_trace.cli`): its options
  from the options class, its help and examples from ``help`` and ``epilog``;
* the Python API builds the function (:func:`on_texts`, :func:`on_model`): the same typed
  keywords as the options class, the docstring ``doc``;
* the engines (:mod:`residual_trace.experiments.engine`) run ``shard_rows`` on a shard of
  encoded texts, locally or on a Ray worker, and ``merge_extras`` joins the shards;
* the report (:mod:`residual_trace.experiments.report`) runs ``run`` and reads
  ``report_tables`` from the result.

The verbs are listed once, in :mod:`residual_trace.experiments.registry`; adding a verb is
its experiment module, its measures in :mod:`residual_trace.tracer`, its figures, its tests,
its docs page and one import line there (see ``docs/contributing.md``).

Inputs. ``inputs`` says what the second positional argument of the API function is:
``"texts"`` (a list of texts, one text, a ``Path``, or ``None`` for the bundled sentences;
the command line's ``--text``/``--file``) or ``"model"`` (none: the verb reads only the
model and its options; with ``texts_option`` set, ``--text``/``--file`` fill that option,
as the probe's corpus; without, the command has no ``--text``/``--file``). A verb on pairs
of texts declares them as options (``--clean``/``--corrupt``, ``--pairs FILE``: checked
with the other options, before the model loads) on ``inputs="model"``; a verb that trains
an artefact is a ``run`` on texts whose result's ``save()`` writes the artefact beside its
tables.

Every callable of an experiment is a module-level function, so that the object pickles by
reference to a Ray worker, and every experiment module imports nothing heavy at import time
(torch, pandas and matplotlib on first use), so that ``trace --help`` stays fast. Every run
on texts opens with :func:`open_run`.

Examples:
    >>> from residual_trace.experiments.options import CorpusOptions
    >>> def run(model, texts, options, warn): ...
    >>> from residual_trace.experiments.result import Result
    >>> demo = Experiment("demo", CorpusOptions, run, Result, help="Demo.", doc="Demo.")
    >>> demo.merge_extras([None, None]) is None, demo.inputs
    (True, 'texts')
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, NamedTuple, ParamSpec, TypeVar

from residual_trace.experiments.common import load_inputs, resolve_model
from residual_trace.experiments.options import (
    CorpusOptions,
    ModelArg,
    Texts,
    Warn,
    python_warning,
    texts_argument,
)
from residual_trace.experiments.result import Result
from residual_trace.options import Options

if TYPE_CHECKING:
    import pandas as pd

    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = [
    "Experiment",
    "Inputs",
    "Opening",
    "ShardPart",
    "ShardRows",
    "no_extras",
    "on_model",
    "on_texts",
    "open_run",
    "signature_of",
]

P = ParamSpec("P")
R = TypeVar("R")

#: What the API function's second positional argument is (see the module docstring).
Inputs = Literal["texts", "model"]


@dataclass
class ShardPart:
    """What one shard (or the merge of several) produced.

    Attributes:
        tables: row tables keyed like the experiment's tables (``drift``, ``heads`` ...);
            a key may be missing from a shard that has no rows for it.
        extra: the experiment's other per-shard facts (a small picklable value).
        engine: how the rows were computed, for ``run.json`` (engine, workers, shards).
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: Any = None
    engine: dict[str, Any] = field(default_factory=dict)


#: ``shard_rows(model, encoded, options)``: one shard's rows (of encoded texts, or of a verb's
#: own items, such as ``patch``'s pairs).
ShardRows = Callable[["TracedModel", Any, Any], ShardPart]

#: ``run(model, inputs, options, warn)``: the whole experiment, in memory.
Run = Callable[[ModelArg, Any, Any, Warn], R]


def no_extras(extras: list[Any]) -> None:
    """The ``merge_extras`` of an experiment whose shards carry no extra facts."""
    return None


@dataclass(frozen=True)
class Experiment(Generic[P, R]):
    """One verb (see the module docstring).

    Attributes:
        name: the verb as the user types it (``layers``); also the ``command`` in
            ``run.json`` and the folder of the report's part.
        options: the options class (an :class:`~residual_trace.options.Options` dataclass):
            the command line's options and the API's keywords.
        run: ``run(model, inputs, options, warn) -> result``: the experiment in memory.
        result: the result class ``run`` returns (its tables, ``figures()``, ``describe()``
            and ``save()``).
        help: the command's help (first line: the summary ``trace --help`` lists).
        doc: the API function's docstring.
        epilog: the command's examples (a paragraph click keeps as written).
        inputs: ``"texts"`` or ``"model"``.
        texts_option: for ``inputs="model"``, the option ``--text``/``--file`` fill.
        shard_rows: the per-text work the engines shard (``None``: not sharded).
        merge_extras: how the shards' extra facts merge, in shard order.
        report_tables: the tables of its result the report reads (empty: not in reports).
        skip: ``skip(model, options)``: why the experiment cannot run on a loaded model
            (``None``: it can). The report leaves such a part out and says why, instead of
            failing (a lens on an encoder without trained head weights).
    """

    name: str
    options: Callable[P, Any]
    run: Run[R]
    result: type[Result]
    help: str
    doc: str
    epilog: str = ""
    inputs: Inputs = "texts"
    texts_option: str | None = None
    shard_rows: ShardRows | None = None
    merge_extras: Callable[[list[Any]], Any] = no_extras
    report_tables: tuple[str, ...] = ()
    skip: Callable[[TracedModel, Any], str | None] | None = None

    @property
    def options_class(self) -> type[Options]:
        """``options`` as the class it is.

        ``options`` is typed as its constructor, so that the API function takes its keywords.
        """
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"experiment {self.name}: options must be an Options class")
        return self.options

    def rows(self, model: TracedModel, encoded: Sequence[Any], options: Any) -> ShardPart:
        """``shard_rows`` on one shard (what the engines call)."""
        if self.shard_rows is None:
            raise TypeError(f"experiment {self.name} declares no shard_rows: it is not sharded")
        return self.shard_rows(model, encoded, options)


def signature_of(options: Callable[..., Any], leading: Sequence[str] = ()) -> inspect.Signature:
    """The signature of an API function.

    The positional-only ``leading`` arguments (``texts`` defaulting to ``None``), then the
    fields of ``options`` as keyword-only arguments.
    """
    defaults = {"texts": None}
    params = [
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_ONLY, default=defaults.get(name, inspect._empty)
        )
        for name in leading
    ]
    keywords = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(options).parameters.values()
    ]
    return inspect.Signature([*params, *keywords])


def _dress(call: Callable[..., Any], experiment: Experiment[Any, Any], leading: list[str]) -> None:
    functools.update_wrapper(call, experiment.run, assigned=("__module__",), updated=())
    call.__name__ = call.__qualname__ = experiment.name.replace("-", "_")
    call.__doc__ = experiment.doc
    # inspect.signature (help(), the docs) shows the options' keywords; `experiment` lets
    # the registry and the tests reach the object behind the function
    signature = signature_of(experiment.options, leading)
    vars(call).update(__signature__=signature, experiment=experiment)


def on_texts(experiment: Experiment[P, R]) -> Callable[Concatenate[ModelArg, Texts, P], R]:
    """The API function of a verb on texts: ``f(model, texts=None, /, **options)``."""

    def call(model: ModelArg, texts: Texts = None, /, *args: P.args, **kwargs: P.kwargs) -> R:
        options = experiment.options(*args, **kwargs)
        return experiment.run(model, texts_argument(texts), options, python_warning)

    _dress(call, experiment, ["model", "texts"])
    return call


def on_model(experiment: Experiment[P, R]) -> Callable[Concatenate[ModelArg, P], R]:
    """The API function of a verb that reads only the model: ``f(model, /, **options)``."""

    def call(model: ModelArg, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return experiment.run(model, None, experiment.options(*args, **kwargs), python_warning)

    _dress(call, experiment, ["model"])
    return call


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
    """The opening every experiment on texts shares.

    In this order: read and check the texts (a bad text fails before the model loads),
    resolve the model (its notes are collected), let ``check_model`` refuse options the model
    cannot meet (a block it does not have), seed torch, and encode the texts (truncation
    warnings collected as ``warning: ...`` notes).
    """
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
