"""Model resolution and the hooked TransformerBridge: the only package touching TransformerLens.

Names are imported on first use, so that resolving a ``--model`` name (:mod:`.resolve`)
needs neither torch nor TransformerLens and a wrong name fails at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from residual_trace._lazy import lazy_exports

if TYPE_CHECKING:
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

_EXPORTS = {
    **dict.fromkeys(("NORM_PLACEMENTS", "ArchSpec", "derive_spec"), "architectures"),
    **dict.fromkeys(("ALIASES", "HUB_RENAMES", "ResolvedModel", "cache_dir"), "resolve"),
    **dict.fromkeys(
        ("DEVICE_MAPS", "DTYPES", "Capture", "NormAffine", "TracedModel", "load_model"),
        "traced",
    ),
    "random_init_copy": "traced",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, {k: f"{__name__}.{v}" for k, v in _EXPORTS.items()})
