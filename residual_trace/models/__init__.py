"""Model resolution and the hooked TransformerBridge: the only package touching TransformerLens."""

from residual_trace.models.architectures import ARCHITECTURES, ArchSpec
from residual_trace.models.resolve import ALIASES, HUB_RENAMES, ResolvedModel, cache_dir
from residual_trace.models.traced import Capture, TracedModel, load_model, random_init_copy

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "HUB_RENAMES",
    "ArchSpec",
    "Capture",
    "ResolvedModel",
    "TracedModel",
    "cache_dir",
    "load_model",
    "random_init_copy",
]
