"""The Python API: one call per experiment, each returning a result with ``tables``,
``figures()`` and ``save()``.

Every call takes a model (a loaded :class:`~residual_trace.TracedModel`, or a name for
:func:`~residual_trace.load_model`), texts where the experiment reads texts (a list, one
text, a ``Path`` to a file with one text per line, or ``None`` for the bundled sentences),
and the experiment's options as keyword arguments: their names, types, defaults and
checks are those of the options dataclass (:class:`LayersOptions`, ...), which is also
what the ``trace`` command line is built from. Nothing is written to disk until
``result.save(directory)``.

Examples:
    >>> import inspect
    >>> list(inspect.signature(layers).parameters)[:4]
    ['model', 'texts', 'batch_size', 'seed']
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Concatenate, Generic, ParamSpec, Protocol, TypeVar

from residual_trace.experiments.options import (
    DecomposeOptions,
    LayersOptions,
    ModelArg,
    PerturbOptions,
    ProbeOptions,
    Texts,
)
from residual_trace.experiments.report.config import ReportOptions
from residual_trace.experiments.report.result import ReportResult, run_report

__all__ = ["decompose", "layers", "perturb", "probe", "report"]

P = ParamSpec("P")
R = TypeVar("R", covariant=True)
R2 = TypeVar("R2")


class _RunsOnTexts(Protocol, Generic[R]):
    def run(self, model: ModelArg, texts: Texts = ...) -> R: ...


class _RunsOnModel(Protocol, Generic[R]):
    def run(self, model: ModelArg) -> R: ...


def _signature(
    options_type: Callable[..., object], leading: list[inspect.Parameter]
) -> inspect.Signature:
    options = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(options_type).parameters.values()
    ]
    return inspect.Signature([*leading, *options])


_MODEL = inspect.Parameter("model", inspect.Parameter.POSITIONAL_ONLY)
_TEXTS = inspect.Parameter("texts", inspect.Parameter.POSITIONAL_ONLY, default=None)


def _on_texts(
    options_type: Callable[P, _RunsOnTexts[R2]], doc: str
) -> Callable[Concatenate[ModelArg, Texts, P], R2]:
    def call(model: ModelArg, texts: Texts = None, /, *args: P.args, **kwargs: P.kwargs) -> R2:
        return options_type(*args, **kwargs).run(model, texts)

    functools.update_wrapper(call, options_type, assigned=("__module__",), updated=())
    call.__doc__ = doc
    call.__signature__ = _signature(options_type, [_MODEL, _TEXTS])  # type: ignore[attr-defined]
    return call


def _on_model(
    options_type: Callable[P, _RunsOnModel[R2]], doc: str
) -> Callable[Concatenate[ModelArg, P], R2]:
    def call(model: ModelArg, /, *args: P.args, **kwargs: P.kwargs) -> R2:
        return options_type(*args, **kwargs).run(model)

    call.__doc__ = doc
    call.__signature__ = _signature(options_type, [_MODEL])  # type: ignore[attr-defined]
    return call


layers = _on_texts(
    LayersOptions,
    """Token drift of every token at every layer (``trace layers``).

    ``layers(model, texts=None, **options)`` with the options of :class:`LayersOptions`.
    Returns a :class:`LayersResult`: ``tables["drift"]`` (one row per text x position x
    layer: ``cos_input``, ``baseline``, ``vocab_rank``, ...), ``tables["summary"]`` (one row
    per layer, with 95% intervals), ``tables["texts"]``; ``figures()``; ``save(out)``.
    """,
)
decompose = _on_texts(
    DecomposeOptions,
    """The exact attention / MLP / residual / bias split of every block, and context mixing
    (``trace decompose``).

    ``decompose(model, texts=None, **options)`` with the options of
    :class:`DecomposeOptions`. Returns a :class:`DecomposeResult` (tables ``decompose``,
    ``mixing``, ``summary``, ``cumulative``, ``mixing_pairs``; ``heads`` and
    ``head_summary`` with ``per_head=True``).
    """,
)
perturb = _on_texts(
    PerturbOptions,
    """Does attention follow tokens or positions? (``trace perturb``).

    ``perturb(model, texts=None, mode="swap", swap=("dog", "cat"), **options)`` with the
    options of :class:`PerturbOptions`. Returns a :class:`PerturbResult` (tables
    ``perturbations``, ``resid``, ``heads``, ``summary``, ``resid_summary``).
    """,
)
probe = _on_model(
    ProbeOptions,
    """Feature-norm probes with every control beside the score (``trace probe``).

    ``probe(model, norms=("lancaster",), **options)`` with the options of
    :class:`ProbeOptions` (``norms`` may also be one string). Returns a :class:`ProbeResult`
    (tables ``scores``, ``summary``, ``verdicts``, ``concepts``).
    """,
)


def _on_options(options_type: Callable[P, ReportOptions], doc: str) -> Callable[P, ReportResult]:
    def call(*args: P.args, **kwargs: P.kwargs) -> ReportResult:
        return run_report(options_type(*args, **kwargs))

    call.__doc__ = doc
    call.__signature__ = _signature(options_type, [])  # type: ignore[attr-defined]
    return call


report = _on_options(
    ReportOptions,
    """Every experiment on several models, side by side (``trace report``).

    ``report(models=("minilm", "smollm2"), **options)`` with the options of
    :class:`ReportOptions`. Runs in memory (``trace report`` also saves each part as it
    finishes, so that a killed run resumes). Returns a :class:`ReportResult` (tables
    ``depth``, ``heads``, ``probe``; ``verdicts``; ``figures()``; ``save(out)``).
    """,
)
