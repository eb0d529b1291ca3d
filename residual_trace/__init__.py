"""residual-trace: mechanistic residual-stream tracing on TransformerLens.

Test, on your own encoders and decoders, whether the hidden state at layer L still
corresponds to its input token, before reading an attention map or a probe as evidence.

The entry points, imported lazily so that ``import residual_trace`` stays cheap:

- :func:`load_model`: resolve ``minilm``, ``smollm2``, a Hugging Face name or a local
  checkpoint directory to a :class:`TracedModel` (a hooked TransformerBridge).
- :func:`drift_table` / :func:`iter_drift`: per-token, per-layer token drift.
- :func:`layer_summary`: the per-layer summary the CLI prints.

Examples:
    >>> import residual_trace
    >>> {"load_model", "drift_table", "layer_summary"} <= set(residual_trace.__all__)
    True
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TracedModel": "residual_trace.models",
    "load_model": "residual_trace.models",
    "ALIASES": "residual_trace.models",
    "DriftConfig": "residual_trace.tracer",
    "drift_table": "residual_trace.tracer",
    "iter_drift": "residual_trace.tracer",
    "layer_summary": "residual_trace.tracer",
    "UserError": "residual_trace.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'residual_trace' has no attribute {name!r}")
