"""Capture every layer's residual stream and measure token drift (see :mod:`.drift`)."""

from residual_trace.tracer.batching import (
    Batch,
    EncodedText,
    encode_texts,
    iter_batches,
    prepare_texts,
)
from residual_trace.tracer.drift import DRIFT_COLUMNS, DriftConfig, drift_table, iter_drift
from residual_trace.tracer.summary import SUMMARY_COLUMNS, format_summary, layer_summary

__all__ = [
    "DRIFT_COLUMNS",
    "SUMMARY_COLUMNS",
    "Batch",
    "DriftConfig",
    "EncodedText",
    "drift_table",
    "encode_texts",
    "format_summary",
    "iter_batches",
    "iter_drift",
    "layer_summary",
    "prepare_texts",
]
