"""Jobs that glue model, tracer and figures together; each returns tidy tables."""

from residual_trace.experiments.layers import (
    LayersConfig,
    LayersResult,
    bundled_sentences,
    read_texts,
    run_layers,
)

__all__ = ["LayersConfig", "LayersResult", "bundled_sentences", "read_texts", "run_layers"]
