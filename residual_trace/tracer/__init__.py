"""The measures: capture every layer's residual stream and measure it, batch by batch.

Each verb's measures are iterators over batches of encoded texts: :mod:`.drift`
(``iter_drift_encoded``, ``trace layers``), :mod:`.decompose_batches`
(``iter_decompose_encoded``, over :mod:`.decompose` and :mod:`.mixing`, ``trace
decompose``) and :mod:`.perturb` (``iter_perturb_encoded``, ``trace perturb``); their
summaries are :mod:`.summary`, :mod:`.decompose_summary` and :mod:`.alignment_summary`.
The names below are imported on first use, so that reading a table of measures
(:mod:`.mixing_measures`) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from residual_trace._lazy import lazy_exports

if TYPE_CHECKING:
    from residual_trace.tracer.batching import (
        Batch,
        EncodedText,
        encode_texts,
        iter_batches,
        prepare_texts,
    )
    from residual_trace.tracer.drift import DRIFT_COLUMNS, drift_table, iter_drift
    from residual_trace.tracer.summary import SUMMARY_COLUMNS, format_summary, layer_summary

_EXPORTS = {
    "Batch": "residual_trace.tracer.batching",
    "EncodedText": "residual_trace.tracer.batching",
    "encode_texts": "residual_trace.tracer.batching",
    "iter_batches": "residual_trace.tracer.batching",
    "prepare_texts": "residual_trace.tracer.batching",
    "DRIFT_COLUMNS": "residual_trace.tracer.drift",
    "drift_table": "residual_trace.tracer.drift",
    "iter_drift": "residual_trace.tracer.drift",
    "SUMMARY_COLUMNS": "residual_trace.tracer.summary",
    "format_summary": "residual_trace.tracer.summary",
    "layer_summary": "residual_trace.tracer.summary",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
