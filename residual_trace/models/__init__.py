"""Model resolution and the hooked TransformerBridge: the only package touching TransformerLens."""

from residual_trace.models.architectures import NORM_PLACEMENTS, ArchSpec, derive_spec
from residual_trace.models.resolve import ALIASES, HUB_RENAMES, ResolvedModel, cache_dir
from residual_trace.models.traced import (
    DEVICE_MAPS,
    DTYPES,
    Capture,
    NormAffine,
    TracedModel,
    load_model,
    random_init_copy,
)

__all__ = [
    "ALIASES",
    "DEVICE_MAPS",
    "DTYPES",
    "HUB_RENAMES",
    "NORM_PLACEMENTS",
    "ArchSpec",
    "Capture",
    "NormAffine",
    "ResolvedModel",
    "TracedModel",
    "cache_dir",
    "derive_spec",
    "load_model",
    "random_init_copy",
]
