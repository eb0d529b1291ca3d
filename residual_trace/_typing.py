"""Tensor shape aliases, defined once, with TransformerLens's dimension names."""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

TokenIds = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
ValidMask = Bool[Tensor, "batch pos"]
ResidStack = Float[Tensor, "layer batch pos d_model"]
PatternStack = Float[Tensor, "block batch head_index query_pos key_pos"]
EmbeddingMatrix = Float[Tensor, "d_vocab d_model"]

__all__ = [
    "AttentionMask",
    "Bool",
    "EmbeddingMatrix",
    "Float",
    "Int",
    "PatternStack",
    "ResidStack",
    "Tensor",
    "TokenIds",
    "ValidMask",
]
