"""The Python API: one call per experiment, each returning a result.

Each result has ``tables``, ``figures()`` and ``save()``.

Every call takes a model (a loaded :class:`~residual_trace.TracedModel`, or a name for
:func:`~residual_trace.load_model`), texts where the experiment reads texts (a list, one
text, a ``Path`` to a file with one text per line, or ``None`` for the bundled sentences),
and the experiment's options as keyword arguments: their names, types, defaults and
checks are those of the options dataclass (:class:`LayersOptions`, ...), which is also
what the ``trace`` command line is built from. Nothing is written to disk until
``result.save(directory)``. The verbs' functions come from the registry
(:mod:`residual_trace.experiments.registry`); ``report`` runs them all.

Examples:
    >>> import inspect
    >>> list(inspect.signature(layers).parameters)[:4]
    ['model', 'texts', 'batch_size', 'seed']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec

from residual_trace.experiments.contract import signature_of
from residual_trace.experiments.registry import *  # noqa: F403  (every verb's function)
from residual_trace.experiments.registry import VERB_NAMES
from residual_trace.experiments.report.config import ReportOptions

if TYPE_CHECKING:
    from residual_trace.experiments.report.result import ReportResult

__all__ = [*VERB_NAMES, "report"]

P = ParamSpec("P")


def _on_options(options_type: Callable[P, ReportOptions], doc: str) -> Callable[P, ReportResult]:
    def call(*args: P.args, **kwargs: P.kwargs) -> ReportResult:
        from residual_trace.experiments.report.result import run_report

        return run_report(options_type(*args, **kwargs))

    call.__name__ = call.__qualname__ = "report"
    call.__doc__ = doc
    vars(call).update(__signature__=signature_of(options_type))
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
