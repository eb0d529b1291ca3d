"""Experiments: glue from a model and texts to tidy tables, figures and ``save()``.

Each experiment has an options dataclass (:mod:`.options`: defaults, types, checks; the
command line is built from it) with a ``run`` method, and a result class holding its tables
in memory (:mod:`.layers`, :mod:`.decompose`, :mod:`.perturb`, :mod:`.probe`,
:mod:`.report`). Names are imported on first use, so the options load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from residual_trace.experiments.common import bundled_sentences, load_inputs, read_texts
    from residual_trace.experiments.decompose import DecomposeResult
    from residual_trace.experiments.layers import LayersResult
    from residual_trace.experiments.options import (
        DecomposeOptions,
        LayersOptions,
        PerturbOptions,
        ProbeOptions,
    )
    from residual_trace.experiments.perturb import PerturbResult
    from residual_trace.experiments.probe import ProbeResult
    from residual_trace.experiments.result import Result

_EXPORTS = {
    "bundled_sentences": "residual_trace.experiments.common",
    "load_inputs": "residual_trace.experiments.common",
    "read_texts": "residual_trace.experiments.common",
    "DecomposeOptions": "residual_trace.experiments.options",
    "LayersOptions": "residual_trace.experiments.options",
    "PerturbOptions": "residual_trace.experiments.options",
    "ProbeOptions": "residual_trace.experiments.options",
    "DecomposeResult": "residual_trace.experiments.decompose",
    "LayersResult": "residual_trace.experiments.layers",
    "PerturbResult": "residual_trace.experiments.perturb",
    "ProbeResult": "residual_trace.experiments.probe",
    "Result": "residual_trace.experiments.result",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
