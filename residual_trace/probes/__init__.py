"""Property-inference probes: feature norms, type-level embeddings, mappers, controls, metrics.

A probe maps each concept's embedding to its human feature-norm vector. Its score means
something only next to its controls (shuffled, random, structured-nonsense targets, an
upper bound), so every evaluation here computes them together.
"""

from residual_trace.probes.metrics import (
    f1_at_k,
    neighbourhood_accuracy,
    spearman_per_concept,
    spearman_per_feature,
)
from residual_trace.probes.norms import Norms, load_norms

__all__ = [
    "Norms",
    "f1_at_k",
    "load_norms",
    "neighbourhood_accuracy",
    "spearman_per_concept",
    "spearman_per_feature",
]
