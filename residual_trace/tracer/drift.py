"""Token drift: how similar position i's hidden state still is to its input token, per layer.

Definitions (MISSION.md), for every non-padding position i with token id t_i and layer l
(0 = block 0's input, k = block k-1's output):

- ``cos_input``: cosine(h_i, W_E[t_i]), W_E the input token-embedding matrix (no position).
- ``cos_layer0``: cosine(h_i, h_i at layer 0).
- ``baseline``: mean cosine(h_i, W_E[t_j]) over positions j of the same text whose token id
  differs from t_i (the anisotropy null: how similar the state is to *other* tokens anyway);
  NaN when the text has no other token id.
- ``vocab_rank``: 1 + the number of vocabulary rows strictly more cosine-similar to h_i than
  W_E[t_i] (1 = the input token is the nearest neighbour: still identifiable).

The ``*_normed`` variants measure the same after the model's own normalisation: the norm
that reads layer l (the next block's first norm; the final norm for the last layer) is
applied to the state *and* to the embedding rows (centring for LayerNorm, the elementwise
gain gamma for both LayerNorm and RMSNorm; the scale and the bias drop out of a cosine).
This is what the next sublayer actually reads, so dimensions the model itself down-weights
(such as Llama's massive-activation dimensions when gamma is small there) stop dominating.
Post-LN models (BERT) hold normalised states already: there the variant equals the raw one.

Three diagnostics explain a collapse of ``cos_input``:

- ``emb_proj``: (h_i . e) / (e . e) with e = W_E[t_i]: the coefficient of the input embedding
  in the state (1 at layer 0 of a decoder; stays near 1 if later layers add orthogonal parts).
- ``norm_ratio``: |h_i| / |e|: how much larger than its embedding the state has grown.
- ``top_dim_share``: the largest single dimension's share of |h_i|^2 (near 1 means one
  massive-activation dimension dominates every cosine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from residual_trace._typing import Bool, EmbeddingMatrix, Float, Int, Tensor
from residual_trace.defaults import DEFAULT_BATCH_SIZE
from residual_trace.errors import UserError
from residual_trace.models import TracedModel
from residual_trace.progress import progress_bar
from residual_trace.tracer.batching import (
    TOKEN_KEYS,
    Batch,
    EncodedText,
    iter_batches,
    prepare_texts,
)
from residual_trace.tracer.chunking import items_per_chunk

#: Columns of the drift table, in order.
DRIFT_COLUMNS = (
    *TOKEN_KEYS,
    "cos_input",
    "cos_layer0",
    "baseline",
    "vocab_rank",
    "cos_input_normed",
    "baseline_normed",
    "vocab_rank_normed",
    "emb_proj",
    "norm_ratio",
    "top_dim_share",
)

#: Live temporaries of a token's vocabulary-sized score row (scores, comparison, mask).
_SCORE_TEMPORARIES = 3

PatternSink = Callable[[int, list[str], np.ndarray], None]


@dataclass(frozen=True)
class _Scorer:
    """Cosine similarity of states to every vocabulary row, in one geometry.

    ``scores(h) = (transform(h) * weight) @ rows.T / row_norms`` with ``transform(h)`` unit
    length, so each score is a cosine between the transformed state and transformed row.
    """

    rows: EmbeddingMatrix
    row_norms: Float[Tensor, " d_vocab"]
    gain: Float[Tensor, " d_model"] | None
    centre: bool

    @classmethod
    def build(
        cls, W_E: EmbeddingMatrix, gain: Float[Tensor, " d_model"] | None, centre: bool
    ) -> _Scorer:
        rows = W_E - W_E.mean(-1, keepdim=True) if centre else W_E
        norms = rows.norm(dim=-1) if gain is None else (rows * rows @ (gain * gain)).sqrt()
        return cls(rows=rows, row_norms=norms.clamp_min(1e-12), gain=gain, centre=centre)

    def queries(self, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        x = h - h.mean(-1, keepdim=True) if self.centre else h
        if self.gain is None:
            return F.normalize(x, dim=-1)
        return F.normalize(x * self.gain, dim=-1) * self.gain

    def stats(
        self,
        h: Float[Tensor, "n d_model"],
        token_ids: Int[Tensor, " n"],
        others: Bool[Tensor, "n n"],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(cos to own token, baseline over other tokens of the text, vocab rank)``."""
        q = self.queries(h)
        chunk = items_per_chunk(4 * self.rows.shape[0], temporaries=_SCORE_TEMPORARIES)
        own, base, rank = [], [], []
        for start in range(0, q.shape[0], chunk):
            stop = start + chunk
            scores = (q[start:stop] @ self.rows.T) / self.row_norms
            own_c = scores.gather(1, token_ids[start:stop, None]).squeeze(1)
            rank.append((scores > own_c[:, None]).sum(1) + 1)
            mask = others[start:stop].to(scores.dtype)
            at_others = scores.index_select(1, token_ids) * mask
            count = mask.sum(1)
            base.append(torch.where(count > 0, at_others.sum(1) / count.clamp_min(1), math.nan))
            own.append(own_c)
        return torch.cat(own), torch.cat(base), torch.cat(rank)


def _batch_frame(
    model: TracedModel,
    batch: Batch,
    resid: Float[Tensor, "layer batch pos d_model"],
    scorers: Sequence[tuple[_Scorer, _Scorer | None]],
) -> pd.DataFrame:
    valid = batch.mask.bool().to(resid.device)
    h = resid[:, valid]  # [layer, n, d_model], rows in (text, position) order
    token_ids = batch.ids.to(resid.device)[valid]
    text_rows = torch.arange(valid.shape[0], device=resid.device)[:, None].expand_as(valid)[valid]
    positions = torch.arange(valid.shape[1], device=resid.device)[None, :].expand_as(valid)[valid]
    others = (text_rows[:, None] == text_rows[None, :]) & (token_ids[:, None] != token_ids[None, :])
    embedding = model.W_E[token_ids]
    emb_sq = (embedding * embedding).sum(-1).clamp_min(1e-12)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in DRIFT_COLUMNS[len(TOKEN_KEYS) :]}
    for layer, (raw, normed) in enumerate(scorers):
        state = h[layer]
        cos, base, rank = raw.stats(state, token_ids, others)
        if normed is None:
            cos_n, base_n, rank_n = cos, base, rank
        else:
            cos_n, base_n, rank_n = normed.stats(state, token_ids, others)
        sq = state * state
        values = {
            "cos_input": cos,
            "cos_layer0": F.cosine_similarity(state, h[0], dim=-1),
            "baseline": base,
            "vocab_rank": rank,
            "cos_input_normed": cos_n,
            "baseline_normed": base_n,
            "vocab_rank_normed": rank_n,
            "emb_proj": (state * embedding).sum(-1) / emb_sq,
            "norm_ratio": sq.sum(-1).sqrt() / emb_sq.sqrt(),
            "top_dim_share": sq.max(-1).values / sq.sum(-1).clamp_min(1e-30),
        }
        for name, tensor in values.items():
            columns[name].append(tensor.cpu().numpy())
    n_layers, n_tokens = len(scorers), int(token_ids.shape[0])
    text_ids = np.array([t.text_id for t in batch.texts], dtype=np.int64)
    ids_np = token_ids.cpu().numpy()
    strings = np.array(model.token_strings(ids_np.tolist()), dtype=object)
    special = np.isin(ids_np, np.fromiter(model.special_ids, dtype=np.int64))
    frame = pd.DataFrame(
        {
            "model": model.name,
            "text_id": np.tile(text_ids[text_rows.cpu().numpy()], n_layers),
            "position": np.tile(positions.cpu().numpy(), n_layers),
            "layer": np.repeat(np.arange(n_layers, dtype=np.int64), n_tokens),
            "token": np.tile(strings, n_layers),
            "token_id": np.tile(ids_np, n_layers),
            "is_special": np.tile(special, n_layers),
            "is_unk": np.tile(np.array(model.is_unk(ids_np.tolist()), dtype=bool), n_layers),
            **{name: np.concatenate(parts) for name, parts in columns.items()},
        }
    )
    for name in ("vocab_rank", "vocab_rank_normed"):
        frame[name] = frame[name].astype(np.int64)
    frame = frame.sort_values(["text_id", "position", "layer"], kind="stable")
    return frame.reset_index(drop=True)[list(DRIFT_COLUMNS)]


def _scorers(model: TracedModel, normed: bool) -> list[tuple[_Scorer, _Scorer | None]]:
    raw = _Scorer.build(model.W_E, gain=None, centre=False)
    out: list[tuple[_Scorer, _Scorer | None]] = []
    for layer in range(model.n_blocks + 1):
        norm = model.reader_norm(layer) if normed else None
        variant = None if norm is None else _Scorer.build(model.W_E, norm.gain, norm.centres)
        out.append((raw, variant))
    return out


def iter_drift(
    model: TracedModel,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    normed: bool = True,
    progress: bool = False,
    patterns: PatternSink | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield the drift table batch by batch (each batch is reduced before the next runs).

    The keywords mean what the options of :class:`~residual_trace.LayersOptions` of the
    same names mean (``trace layers`` passes them on).

    Args:
        model: from :func:`residual_trace.load_model`.
        texts: the inputs, one string each; ``text_id`` is the index in this sequence.
        batch_size: texts per forward pass; results do not depend on it.
        max_length: longest input in tokens, special tokens included; longer texts are
            truncated with a warning (``None``: the model's own limit, at most 512).
        normed: also compute the ``*_normed`` columns (free for post-LN models).
        progress: show a progress bar on stderr.
        patterns: if given, called per text with ``(text_id, tokens, pattern)`` where
            ``pattern`` is ``[n_blocks, head, n_tokens, n_tokens]`` float32 without padding.
        warn: receives a one-line warning when texts are truncated.
    """
    if max_length is not None and max_length < 2:
        raise UserError(f"max_length (--max-length): must be at least 2, got {max_length}")
    encoded = prepare_texts(model, texts, max_length, warn)
    yield from iter_drift_encoded(
        model, encoded, batch_size=batch_size, normed=normed, progress=progress, patterns=patterns
    )


def iter_drift_encoded(
    model: TracedModel,
    encoded: Sequence[EncodedText],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    normed: bool = True,
    progress: bool = False,
    patterns: PatternSink | None = None,
) -> Iterator[pd.DataFrame]:
    """:func:`iter_drift` on texts already tokenised (their ``text_id`` is kept)."""
    if batch_size < 1:
        raise UserError(f"batch_size (--batch-size): must be at least 1, got {batch_size}")
    scorers = _scorers(model, normed)
    n_batches = math.ceil(len(encoded) / batch_size)
    bar = progress_bar(
        iter_batches(encoded, batch_size, model.pad_id),
        total=n_batches,
        desc=f"tracing {model.name}",
        unit="batch",
        enabled=progress,
    )
    with torch.inference_mode():
        for batch in bar:
            capture = model.capture(batch.ids, batch.mask, patterns=patterns is not None)
            if patterns is not None and capture.patterns is not None:
                for row, item in enumerate(batch.texts):
                    n = len(item.ids)
                    pattern = capture.patterns[:, row, :, :n, :n].cpu().numpy()
                    patterns(item.text_id, model.token_strings(item.ids), pattern)
            yield _batch_frame(model, batch, capture.resid, scorers)


def drift_table(
    model: TracedModel,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    normed: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """The whole drift table for ``texts``: one row per text x position x layer.

    The keywords are :func:`iter_drift`'s.

    For a corpus too large to hold, iterate :func:`iter_drift` and write each batch.
    """
    frames = list(
        iter_drift(
            model,
            texts,
            batch_size=batch_size,
            max_length=max_length,
            normed=normed,
            progress=progress,
        )
    )
    return pd.concat(frames, ignore_index=True)
