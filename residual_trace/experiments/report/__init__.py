"""``report``: every experiment on several models, side by side, as one document.

Four modules, each importing only those before it: :mod:`.config` (what a report runs,
validated whole before any work starts; light, for the command line), :mod:`.parts` (each
experiment of each model, run through its API call or read back from an earlier run),
:mod:`.document` (the tables, figures, verdicts and the HTML and Markdown documents, from
the parts' tables alone) and :mod:`.result` (:class:`ReportResult` and :func:`run_report`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from residual_trace._lazy import lazy_exports

if TYPE_CHECKING:
    from residual_trace.experiments.report.config import EXPERIMENTS, ReportOptions, slug
    from residual_trace.experiments.report.parts import Part
    from residual_trace.experiments.report.result import ReportResult, run_report

_EXPORTS = {
    "EXPERIMENTS": "residual_trace.experiments.report.config",
    "ReportOptions": "residual_trace.experiments.report.config",
    "slug": "residual_trace.experiments.report.config",
    "Part": "residual_trace.experiments.report.parts",
    "ReportResult": "residual_trace.experiments.report.result",
    "run_report": "residual_trace.experiments.report.result",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
