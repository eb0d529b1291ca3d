"""The decomposition and context mixing of a corpus, batch by batch.

:func:`iter_decompose_encoded` runs each batch once, with the hooks of
:func:`~residual_trace.tracer.decompose.decompose_hooks`, reduces context mixing block by
block inside that forward pass (:class:`~residual_trace.tracer.mixing.MixingStream`: one
block's attention patterns are all that is ever held) and splits every block's update
(:func:`~residual_trace.tracer.decompose.decompose_batch`); it yields one
:class:`DecomposeRows` per batch, reduced before the next batch runs.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from residual_trace.defaults import DEFAULT_BATCH_SIZE
from residual_trace.models import TracedModel
from residual_trace.progress import progress_bar
from residual_trace.tracer.batching import EncodedText, iter_batches
from residual_trace.tracer.decompose import decompose_batch, decompose_hooks
from residual_trace.tracer.mixing import VZ_MAX_TOKENS, MixingStream

__all__ = ["DecomposeRows", "iter_decompose_encoded"]


@dataclass(frozen=True)
class DecomposeRows:
    """One batch's rows.

    Attributes:
        local: the per-token split (``decompose.csv``'s rows).
        cumulative: the per-batch sums that
            :func:`~residual_trace.tracer.decompose.pool_cumulative` pools.
        mixing: the per-token mixing rows (``mixing.csv``'s rows).
        pairs: the per-pair maps of the kept texts this batch holds.
        heads: the per-head split, with ``per_head``.
        attention_heads: with ``per_head``, the kept texts' attention weights head by head.
    """

    local: pd.DataFrame
    cumulative: pd.DataFrame
    mixing: pd.DataFrame
    pairs: pd.DataFrame | None
    heads: pd.DataFrame | None
    attention_heads: pd.DataFrame | None = None


def iter_decompose_encoded(
    model: TracedModel,
    encoded: Sequence[EncodedText],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    per_head: bool = False,
    pair_text: int | Mapping[int, Collection[int] | None] | None = None,
    pair_blocks: Collection[int] | None = None,
    vz_max_tokens: int = VZ_MAX_TOKENS,
    progress: bool = False,
) -> Iterator[DecomposeRows]:
    """Yield the rows of ``encoded`` batch by batch (``text_id`` as encoded).

    Args:
        model: the model to split.
        encoded: texts as :func:`~residual_trace.tracer.prepare_texts` encodes them.
        batch_size: texts per forward pass (the rows do not depend on it).
        per_head: also split the attention part by head.
        pair_text: the ``text_id`` whose target x source mixing map is kept, or a mapping
            from several ``text_id`` to their blocks (``None``: every block).
        pair_blocks: with one ``pair_text``, the blocks at which its map is kept
            (``None``: every block).
        vz_max_tokens: Value Zeroing runs on texts of at most this many tokens (NaN beyond).
        progress: show a progress bar on stderr.
    """
    names = decompose_hooks(model, per_head)
    batches = progress_bar(
        iter_batches(encoded, batch_size, model.pad_id),
        total=math.ceil(len(encoded) / batch_size),
        desc=f"decomposing {model.name}",
        unit="batch",
        enabled=progress,
    )
    with torch.inference_mode():
        for batch in batches:
            stream = MixingStream(
                model, batch, pair_text, pair_blocks, vz_max_tokens, head_pairs=per_head
            )
            store = model.run_hooks(batch.ids, batch.mask, names, stream=stream)
            split = decompose_batch(model, batch, store, per_head=per_head)
            mixing, pairs = stream.frames()
            yield DecomposeRows(
                split.local, split.cumulative, mixing, pairs, split.heads, stream.head_frame()
            )
