"""Lenses: every residual state decoded through an output head, one row per state and lens.

For each text, position ``i`` and residual state (``site`` ``post``: layer ``l`` as in the
drift table, 0 = block 0's input, ``l`` = block ``l-1``'s output; ``site`` ``mid``: the state
between block ``l``'s attention and its MLP, what the MLP reads), a lens turns the state into
a distribution ``q`` over the vocabulary:

- ``logit``: the model's final norm and unembedding (and its logit soft-capping or scale);
- ``mlm``: an encoder's masked-LM head;
- ``tuned``: the logit lens after a tuned lens's affine translator of that layer (layers
  ``0..L-1``; at layer ``L`` the model's output; no translator exists for ``mid`` states, so
  the tuned lens has no ``mid`` rows).

The columns (per row): ``top_token``/``top_token_id``/``top_prob`` (the most probable token
under ``q``); ``input_rank`` (1 + the number of tokens strictly more probable than position
``i``'s own input token; 1 = the state still decodes to its token) and ``input_prob``;
``next_rank``/``next_prob`` for the actual next token (decoders; empty at a text's last
position and for encoders); ``kl_final`` = KL(p || q) in nats, with ``p`` the model's own
output distribution at that position (the lens's reading at the last layer); ``entropy``
of ``q`` in nats.

Everything vocabulary-sized is computed for a chunk of positions at a time (the chunk from
the memory budget): the full distributions of one chunk of positions at one layer are held,
never layers x positions x vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from residual_trace._typing import Float, Int, Tensor
from residual_trace.errors import UserError
from residual_trace.models import TracedModel
from residual_trace.progress import progress_bar
from residual_trace.tracer.batching import Batch, EncodedText, iter_batches
from residual_trace.tracer.chunking import items_per_chunk

#: Columns of the lens table, in order.
LENS_COLUMNS = (
    "model",
    "text_id",
    "position",
    "layer",
    "site",
    "lens",
    "token",
    "token_id",
    "is_special",
    "is_unk",
    "top_token",
    "top_token_id",
    "top_prob",
    "input_rank",
    "input_prob",
    "next_rank",
    "next_prob",
    "kl_final",
    "entropy",
)

#: Columns of the per-position null table (one row per text x position).
NULL_COLUMNS = ("text_id", "position", "next_token_id", "kl_unigram")

#: Columns of the geometry table: ``trace layers``' nearest-neighbour rank of each state.
GEOMETRY_COLUMNS = ("text_id", "position", "layer", "vocab_rank")

#: The sites a state can be read at, in depth order within a layer.
SITES = ("post", "mid")

#: Live vocabulary-sized temporaries of one chunk (logits, log-probs, probs, comparisons).
_TEMPORARIES = 8

#: ``lens(states, layer, site)``: logits ``[n, d_vocab]`` float32, or ``None`` where the lens
#: has no reading of that site.
LensFunction = Callable[[Tensor, int, str], "Tensor | None"]


@dataclass(frozen=True)
class NamedLens:
    """A lens as the table names it (``logit``, ``mlm``, ``tuned``) and its function."""

    name: str
    read: LensFunction


@dataclass(frozen=True)
class _Chunk:
    """What every lens of one chunk of positions is compared against."""

    input_ids: Int[Tensor, " n"]
    next_ids: Int[Tensor, " n"]  # -1 where there is no next token
    final_logp: Float[Tensor, "n d_vocab"]
    final_p: Float[Tensor, "n d_vocab"]


def _stats(logits: Tensor, chunk: _Chunk) -> dict[str, Tensor]:
    """The per-row columns of one lens reading (see the module docstring)."""
    logp = torch.log_softmax(logits, dim=-1)
    top_logp, top_id = logp.max(dim=-1)
    own = logits.gather(1, chunk.input_ids[:, None])
    has_next = chunk.next_ids >= 0
    nxt = logits.gather(1, chunk.next_ids.clamp_min(0)[:, None])
    p = logp.exp()
    terms = torch.where(chunk.final_p > 0, chunk.final_p * (chunk.final_logp - logp), 0.0)
    return {
        "top_token_id": top_id,
        "top_prob": top_logp.exp(),
        "input_rank": (logits > own).sum(-1) + 1,
        "input_prob": logp.gather(1, chunk.input_ids[:, None]).squeeze(1).exp(),
        "next_rank": torch.where(has_next, (logits > nxt).sum(-1) + 1, -1),
        "next_prob": torch.where(
            has_next,
            logp.gather(1, chunk.next_ids.clamp_min(0)[:, None]).squeeze(1).exp(),
            math.nan,
        ),
        "kl_final": terms.sum(-1),
        "entropy": -torch.where(p > 0, p * logp, 0.0).sum(-1),
    }


@dataclass(frozen=True)
class StateSites:
    """The states one batch is read at: ``(site, layer, states [n, d_model])`` in order."""

    items: tuple[tuple[str, int, Tensor], ...]

    @classmethod
    def capture(cls, model: TracedModel, batch: Batch, mid: bool) -> StateSites:
        """Run the batch once and keep every ``post`` state (and ``mid`` with ``mid``)."""
        L = model.n_blocks
        post = [model.spec.resid_hook(k) for k in range(L + 1)]
        mids = [model.spec.mid_sources(b) for b in range(L)] if mid else []
        names = list(dict.fromkeys([*post, *(n for group in mids for n in group)]))
        store = model.run_hooks(batch.ids, batch.mask, names)
        valid = batch.mask.bool().to(model.device)
        items: list[tuple[str, int, Tensor]] = []
        for layer in range(L + 1):
            items.append(("post", layer, store[post[layer]][valid]))
            if mid and layer < L:
                state = sum(store[n] for n in mids[layer])
                assert isinstance(state, Tensor)
                items.append(("mid", layer, state[valid]))
        return cls(tuple(items))

    @property
    def final(self) -> Tensor:
        """The last layer's states (what the model's output is read from)."""
        return next(s for site, layer, s in reversed(self.items) if site == "post")


def _next_ids(batch: Batch, device: torch.device, decoder: bool) -> Tensor:
    """Each valid position's next token id (-1 at a text's last position, and for encoders)."""
    ids = batch.ids.to(device)
    valid = batch.mask.bool().to(device)
    nxt = torch.full_like(ids, -1)
    if decoder:
        follows = valid[:, 1:] & valid[:, :-1]
        nxt[:, :-1] = torch.where(follows, ids[:, 1:], -1)
    return nxt[valid]


def unigram_log_probs(
    counts: dict[int, int], d_vocab: int, smoothing: float = 0.5
) -> Float[Tensor, " d_vocab"]:
    """Log of the texts' smoothed unigram distribution, ``(c_v + s) / (N + s V)``.

    The additive smoothing ``s`` (0.5 by default) keeps tokens the texts lack possible, so
    that the KL of the model's output to it is finite. A lens that reads nothing can do no
    better than a fixed distribution; this one is the field's usual choice.
    """
    c = torch.full((d_vocab,), smoothing, dtype=torch.float64)
    for token, n in counts.items():
        c[token] += n
    return (c / c.sum()).log().float()


def _frame(
    model: TracedModel,
    batch: Batch,
    site: str,
    layer: int,
    lens: str,
    token_ids: np.ndarray,
    values: dict[str, np.ndarray],
    text_rows: np.ndarray,
    positions: np.ndarray,
) -> pd.DataFrame:
    text_ids = np.array([t.text_id for t in batch.texts], dtype=np.int64)[text_rows]
    n = len(token_ids)
    return pd.DataFrame(
        {
            "text_id": text_ids,
            "position": positions,
            "layer": np.full(n, layer, dtype=np.int64),
            "site": site,
            "lens": lens,
            "token_id": token_ids,
            **values,
        }
    )


def _read_chunks(
    model: TracedModel,
    chunks_of: Callable[[slice], tuple[Tensor, Tensor]],
    n: int,
    lenses: Sequence[NamedLens],
    own: LensFunction,
    states: StateSites,
    log_unigram: Tensor | None,
) -> tuple[dict[tuple[str, int, str], dict[str, list[np.ndarray]]], list[np.ndarray]]:
    """Every lens on every state, a chunk of positions at a time; and the null's KL."""
    size = items_per_chunk(4 * model.d_vocab, temporaries=_TEMPORARIES)
    columns: dict[tuple[str, int, str], dict[str, list[np.ndarray]]] = {}
    null_kl: list[np.ndarray] = []
    L = model.n_blocks
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        input_ids, next_ids = chunks_of(rows)
        final = own(states.final[rows], L, "post")
        assert final is not None
        chunk = _Chunk(input_ids, next_ids, *_log_and_p(final))
        if log_unigram is not None:
            u = log_unigram.to(final.device)
            terms = chunk.final_p * (chunk.final_logp - u)
            null_kl.append(torch.where(chunk.final_p > 0, terms, 0.0).sum(-1).cpu().numpy())
        for site, layer, state in states.items:
            for lens in lenses:
                is_final = site == "post" and layer == L
                logits = final if is_final else lens.read(state[rows], layer, site)
                if logits is None:
                    continue
                target = columns.setdefault((site, layer, lens.name), {})
                for name, tensor in _stats(logits, chunk).items():
                    target.setdefault(name, []).append(tensor.cpu().numpy())
    return columns, null_kl


def _log_and_p(logits: Tensor) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(logits, dim=-1)
    return logp, logp.exp()


def _batch_frames(
    model: TracedModel,
    batch: Batch,
    lenses: Sequence[NamedLens],
    own: LensFunction,
    states: StateSites,
    log_unigram: Tensor | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    device = model.device
    valid = batch.mask.bool().to(device)
    input_ids = batch.ids.to(device)[valid]
    next_ids = _next_ids(batch, device, model.spec.family == "decoder")
    text_rows = torch.arange(valid.shape[0], device=device)[:, None].expand_as(valid)[valid]
    positions = torch.arange(valid.shape[1], device=device)[None, :].expand_as(valid)[valid]
    n = int(input_ids.shape[0])

    def chunks_of(rows: slice) -> tuple[Tensor, Tensor]:
        return input_ids[rows], next_ids[rows]

    columns, null_kl = _read_chunks(model, chunks_of, n, lenses, own, states, log_unigram)
    ids_np, rows_np = input_ids.cpu().numpy(), text_rows.cpu().numpy()
    pos_np = positions.cpu().numpy()
    frames = [
        _frame(
            model,
            batch,
            site,
            layer,
            lens,
            ids_np,
            {k: np.concatenate(v) for k, v in parts.items()},
            rows_np,
            pos_np,
        )
        for (site, layer, lens), parts in columns.items()
    ]
    text_ids = np.array([t.text_id for t in batch.texts], dtype=np.int64)[rows_np]
    nulls = pd.DataFrame(
        {
            "text_id": text_ids,
            "position": pos_np,
            "next_token_id": next_ids.cpu().numpy(),
            "kl_unigram": np.concatenate(null_kl) if null_kl else np.full(n, np.nan),
        }
    )
    return _finish(model, pd.concat(frames, ignore_index=True)), nulls


def geometry_frame(model: TracedModel, batch: Batch, states: StateSites) -> pd.DataFrame:
    """``vocab_rank`` of every ``post`` state, as ``trace layers`` measures it.

    1 + the number of input-embedding rows more cosine-similar to the state than its own
    token's row (1: the state's nearest embedding row is its token).
    """
    from residual_trace.tracer.drift import _Scorer

    scorer = _Scorer.build(model.W_E, gain=None, centre=False)
    device = model.device
    valid = batch.mask.bool().to(device)
    ids = batch.ids.to(device)[valid]
    rows = torch.arange(valid.shape[0], device=device)[:, None].expand_as(valid)[valid]
    positions = torch.arange(valid.shape[1], device=device)[None, :].expand_as(valid)[valid]
    others = torch.zeros(len(ids), len(ids), dtype=torch.bool, device=device)
    text_ids = np.array([t.text_id for t in batch.texts], dtype=np.int64)[rows.cpu().numpy()]
    frames = []
    for site, layer, state in states.items:
        if site != "post":
            continue
        _, _, rank = scorer.stats(state, ids, others)
        frames.append(
            pd.DataFrame(
                {
                    "text_id": text_ids,
                    "position": positions.cpu().numpy(),
                    "layer": np.int64(layer),
                    "vocab_rank": rank.cpu().numpy().astype(np.int64),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _finish(model: TracedModel, frame: pd.DataFrame) -> pd.DataFrame:
    """Token strings and flags, types, row order and column order of the lens table."""
    ids = frame["token_id"].to_numpy()
    frame["model"] = model.name
    frame["token"] = np.array(model.token_strings(ids.tolist()), dtype=object)
    frame["is_special"] = np.isin(ids, np.fromiter(model.special_ids, dtype=np.int64))
    frame["is_unk"] = np.array(model.is_unk(ids.tolist()), dtype=bool)
    frame["top_token"] = np.array(model.token_strings(frame["top_token_id"].tolist()), dtype=object)
    for name in ("top_token_id", "input_rank", "token_id"):
        frame[name] = frame[name].astype(np.int64)
    frame["next_rank"] = frame["next_rank"].astype("Int64").mask(frame["next_rank"] < 0)
    frame["site_order"] = frame["site"].map({s: i for i, s in enumerate(SITES)})
    frame = frame.sort_values(
        ["text_id", "position", "layer", "site_order", "lens"], kind="stable"
    ).reset_index(drop=True)
    return frame[list(LENS_COLUMNS)]


def iter_lens_encoded(
    model: TracedModel,
    encoded: Sequence[EncodedText],
    lenses: Sequence[NamedLens],
    own: LensFunction,
    *,
    batch_size: int,
    mid: bool = False,
    log_unigram: Tensor | None = None,
    geometry: bool = False,
    progress: bool = False,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]]:
    """Yield ``(lens rows, null rows, geometry rows)`` batch by batch, each batch reduced.

    Args:
        model: the traced model.
        encoded: the texts, tokenised.
        lenses: the lenses to read every state through.
        own: the model's own output head (the final distribution ``p`` of ``kl_final``).
        batch_size: texts per forward pass (results do not depend on it).
        mid: also read the state between each block's attention and MLP.
        log_unigram: the null's log-distribution (see :func:`unigram_log_probs`), if any.
        geometry: also rank each state's own embedding row by cosine (:func:`geometry_frame`).
        progress: a progress bar on stderr.
    """
    if batch_size < 1:
        raise UserError(f"batch_size (--batch-size): must be at least 1, got {batch_size}")
    bar = progress_bar(
        iter_batches(encoded, batch_size, model.pad_id),
        total=math.ceil(len(encoded) / batch_size),
        desc=f"lens {model.name}",
        unit="batch",
        enabled=progress,
    )
    with torch.inference_mode():
        for batch in bar:
            states = StateSites.capture(model, batch, mid)
            rows, nulls = _batch_frames(model, batch, lenses, own, states, log_unigram)
            yield rows, nulls, geometry_frame(model, batch, states) if geometry else None
