"""Property-inference probes: feature norms, type-level embeddings, mappers, controls, metrics.

A probe maps each concept's embedding to its human feature-norm vector. Its score means
something only next to its controls (shuffled, random, structured-nonsense targets, an
upper bound), so every evaluation here computes them together.

The names below are imported lazily: the CLI reads :data:`CONDITIONS` from here without
loading numpy, scipy or pandas.
"""

from __future__ import annotations

from typing import Literal, get_args

from residual_trace._lazy import lazy_exports

#: A condition a probe score is read against (see :mod:`residual_trace.probes.controls`).
Condition = Literal[
    "system",
    "upper",
    "shuffled",
    "shuffled-upper",
    "random",
    "taxonomic",
    "nonsense",
    "random-init",
]

#: Every condition, in table order.
CONDITIONS: tuple[str, ...] = get_args(Condition)

#: How a concept's word becomes one vector (see :mod:`residual_trace.probes.embeddings`).
Embedding = Literal["static", "isolated", "contextual"]
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)

#: A mapper from embeddings to norm vectors (see :mod:`residual_trace.probes.mappers`).
Mapper = Literal["plsr", "ffnn", "ridge"]
MAPPERS: tuple[str, ...] = get_args(Mapper)

_EXPORTS = {
    "Norms": "residual_trace.probes.norms",
    "load_norms": "residual_trace.probes.norms",
    "f1_at_k": "residual_trace.probes.metrics",
    "neighbourhood_accuracy": "residual_trace.probes.metrics",
    "spearman_per_concept": "residual_trace.probes.metrics",
    "spearman_per_feature": "residual_trace.probes.metrics",
}

__all__ = sorted(
    [*_EXPORTS, "CONDITIONS", "Condition", "EMBEDDINGS", "Embedding", "MAPPERS", "Mapper"]
)
__getattr__ = lazy_exports(__name__, _EXPORTS)
