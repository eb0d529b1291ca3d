"""Jobs that glue model, tracer and figures together; each returns tidy tables."""

from residual_trace.experiments.layers import (
    LayersConfig,
    LayersResult,
    bundled_sentences,
    read_texts,
    run_layers,
)
from residual_trace.experiments.perturb import PerturbConfig, PerturbResult, run_perturb

__all__ = [
    "LayersConfig",
    "LayersResult",
    "PerturbConfig",
    "PerturbResult",
    "bundled_sentences",
    "read_texts",
    "run_layers",
    "run_perturb",
]
