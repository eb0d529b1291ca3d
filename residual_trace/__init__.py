"""residual-trace: mechanistic residual-stream tracing on TransformerLens.

Test, on your own encoders and decoders, whether the hidden state at layer L still
corresponds to its input token, before reading an attention map or a probe as evidence.

Examples:
    A notebook session (not run here: it loads a model)::

        import residual_trace as rt
        m = rt.load_model("minilm")
        r = rt.layers(m, ["The dog chased the cat."])
        r.tables["drift"]          # one row per text x position x layer
        r.figures()                # the figures `trace layers` writes
        r.save("runs/x")           # exactly the files `trace layers` writes

    Every experiment: :func:`layers`, :func:`decompose`, :func:`perturb`, :func:`probe`,
    :func:`report`. Layer k is the output of block k-1 (layer 0: the input of block 0);
    heads are named ``L{block}H{head}`` as in TransformerLens.

    >>> import residual_trace
    >>> {"load_model", "layers", "decompose", "perturb", "probe", "report"} <= set(
    ...     residual_trace.__all__)
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from residual_trace._lazy import lazy_exports

__version__ = "0.2.0"

if TYPE_CHECKING:  # the names below are imported on first use: `import residual_trace` is cheap
    from residual_trace.api import report
    from residual_trace.errors import UserError
    from residual_trace.experiments.common import bundled_sentences, read_texts
    from residual_trace.experiments.decompose import DecomposeOptions, DecomposeResult
    from residual_trace.experiments.layers import LayersOptions, LayersResult
    from residual_trace.experiments.lens import LensOptions, LensResult
    from residual_trace.experiments.patch import PatchOptions, PatchResult
    from residual_trace.experiments.perturb import PerturbOptions, PerturbResult
    from residual_trace.experiments.probe import ProbeOptions, ProbeResult
    from residual_trace.experiments.registry import *  # noqa: F403  (every verb's function)
    from residual_trace.experiments.report.config import ReportOptions
    from residual_trace.experiments.report.result import ReportResult
    from residual_trace.experiments.train_lens import TrainLensOptions, TrainLensResult
    from residual_trace.models import ALIASES, TracedModel, load_model
    from residual_trace.tracer import drift_table, iter_drift, layer_summary

_EXPORTS = {
    "report": "residual_trace.api",
    "LayersOptions": "residual_trace.experiments.layers",
    "LayersResult": "residual_trace.experiments.layers",
    "DecomposeOptions": "residual_trace.experiments.decompose",
    "DecomposeResult": "residual_trace.experiments.decompose",
    "LensOptions": "residual_trace.experiments.lens",
    "LensResult": "residual_trace.experiments.lens",
    "PatchOptions": "residual_trace.experiments.patch",
    "PatchResult": "residual_trace.experiments.patch",
    "PerturbOptions": "residual_trace.experiments.perturb",
    "PerturbResult": "residual_trace.experiments.perturb",
    "ProbeOptions": "residual_trace.experiments.probe",
    "ProbeResult": "residual_trace.experiments.probe",
    "TrainLensOptions": "residual_trace.experiments.train_lens",
    "TrainLensResult": "residual_trace.experiments.train_lens",
    "ReportOptions": "residual_trace.experiments.report.config",
    "ReportResult": "residual_trace.experiments.report.result",
    "bundled_sentences": "residual_trace.experiments.common",
    "read_texts": "residual_trace.experiments.common",
    "TracedModel": "residual_trace.models",
    "load_model": "residual_trace.models",
    "ALIASES": "residual_trace.models",
    "drift_table": "residual_trace.tracer",
    "iter_drift": "residual_trace.tracer",
    "layer_summary": "residual_trace.tracer",
    "UserError": "residual_trace.errors",
}


_exported = lazy_exports(__name__, _EXPORTS)


def _verbs() -> tuple[str, ...]:
    """The verbs' names (``layers``, ...).

    Read from the registry, which imports nothing heavy.
    """
    from residual_trace.experiments.registry import VERB_NAMES

    return VERB_NAMES


def __getattr__(name: str) -> Any:
    if name == "__all__":  # `from residual_trace import *`, and readers of __all__
        return sorted([*_EXPORTS, *_verbs()])
    if name in _verbs():
        return getattr(importlib.import_module("residual_trace.api"), name)
    return _exported(name)


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, *_verbs(), "__version__"])
