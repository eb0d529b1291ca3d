"""Context mixing: how much of position i's attention-block output comes from *other* tokens.

Measures per layer and position, each a share in [0, 1] (0 = no mixing):

- ``mix_raw`` (Attn-W): 1 - the attention weight on itself, averaged over heads.
- ``mix_attn_n``, ``mix_attnres_n``, ``mix_attnresln_n``: Kobayashi et al.'s norm-based
  mixing ratios Attn-N (2020), AttnRes-N and AttnResLn-N (2021), as the authors' code
  computes them: r_i = |c_i| / (|c_i| + |self_i|) with c_i = sum_{j != i} F_i(x_j) the
  *vector sum* of the other tokens' terms, F_i(x_j) = sum_h alpha^h_ij (x_j W_V^h + b_V^h)
  W_O^h (b_O belongs to no token). Attn-N's self term is F_i(x_i); AttnRes-N adds the
  residual x_i to it; AttnResLn-N carries both through the norm that follows (post-LN's
  LN1: gamma * (v - mean(v)) / s_i with s_i the norm's real divisor; RMSNorm without the
  centring). Where a norm is applied to the attention output only (Gemma 2/3, OLMo 2), the
  terms pass through it and the residual does not. Pre-norm blocks have no norm after the
  sum: AttnResLn-N is NaN there. Parallel blocks (GPT-NeoX, GPT-J, Phi) add the attention
  output to the block input like sequential ones, so the measures are the same.
- ``mix_rollout``: 1 - R[i, i] with attention rollout (Abnar and Zuidema 2020):
  R_l = (0.5 * mean_h A_l + 0.5 * I) R_{l-1}, R_0 = I: how much of position i's state no
  longer traces back to its own input token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from residual_trace._typing import Float, Tensor
from residual_trace.defaults import DEFAULT_BATCH_SIZE
from residual_trace.models import TracedModel
from residual_trace.tracer.batching import (
    BLOCK_TOKEN_KEYS,
    Batch,
    EncodedText,
    iter_batches,
    prepare_texts,
)
from residual_trace.tracer.chunking import chunks, items_per_chunk
from residual_trace.tracer.decompose import ReconstructionError, reconstruction_tolerance
from residual_trace.tracer.mixing_measures import MIXING

#: Live (key x d_model) temporaries per query row of the contribution tensor.
_ROW_TEMPORARIES = 4


@dataclass(frozen=True)
class LayerMixing:
    """One layer's mixing measures for one text (``n`` tokens, no padding).

    Every ratio is Kobayashi et al.'s r_i = |context_i| / (|context_i| + |self_i|) with
    context_i the *vector sum* of the terms of the other tokens (j != i) and self_i the
    token's own term (see :func:`norm_mixing`).

    Attributes:
        raw_self: mean over heads of the attention weight on itself ``[n]`` (Attn-W is
            1 - raw_self).
        attn_n: Attn-N: attention terms only ``[n]``.
        attnres_n: AttnRes-N: the residual x_i added to the self term ``[n]``.
        attnresln_n: AttnResLn-N: AttnRes-N's terms carried through the norm the attention
            output passes through; NaN for blocks without one (pre-norm) ``[n]``.
        contributions: |t_ij| of every term ``[n (target i), n (source j)]``, residual on
            the diagonal, through the norm where there is one (the per-pair map), or
            ``None`` when not asked for.
    """

    raw_self: Float[Tensor, " n"]
    attn_n: Float[Tensor, " n"]
    attnres_n: Float[Tensor, " n"]
    attnresln_n: Float[Tensor, " n"]
    contributions: Float[Tensor, "n n"] | None


def _ratio(context: Tensor, own: Tensor) -> Tensor:
    """|context| / (|context| + |own|) per row; 0 where both are 0."""
    c, o = context.norm(dim=-1), own.norm(dim=-1)
    return c / (c + o).clamp_min(1e-12)


def _attnresln_n(
    context: Tensor, own: Tensor, residual: Tensor, norm: TermNorm, residual_normed: bool
) -> Tensor:
    """AttnResLn-N: context and self term carried through the norm.

    The residual is carried through it too when it passes through the norm; else it is added after
    it.
    """

    def carry(x: Tensor) -> Tensor:
        centred = x - x.mean(-1, keepdim=True) if norm.centres else x
        return norm.gain * centred / norm.scale

    own_res = carry(own + residual) if residual_normed else carry(own) + residual
    return _ratio(carry(context), own_res)


def norm_mixing(
    pattern: Float[Tensor, "head_index n n"],
    head_values: Float[Tensor, "n head_index d_model"],
    residual: Float[Tensor, "n d_model"],
    ln_gamma: Float[Tensor, " d_model"] | None = None,
    ln_scale: Float[Tensor, "n 1"] | None = None,
    centres: bool = True,
    residual_normed: bool = True,
    pairs: bool = True,
) -> LayerMixing:
    """Kobayashi et al.'s mixing ratios of one layer of one text, as in the authors' code.

    The term of source j at target i is a_ij = sum_h alpha^h_ij f_h(x_j), with f_h(x_j) =
    (x_j W_V^h + b_V^h) W_O^h (b_O belongs to no token). The context vector is
    c_i = sum_{j != i} a_ij (a vector sum: the attention output minus the self term a_ii).

    - Attn-N (2020): r_i = |c_i| / (|c_i| + |a_ii|).
    - AttnRes-N (2021): the self term becomes a_ii + x_i (the residual).
    - AttnResLn-N (2021): both carried through the norm: g(v) = gamma * (v - mean(v)) / s_i
      for LayerNorm (no centring for RMSNorm), s_i the norm's real divisor at i (its input
      includes b_O; the norm's bias is attributed to no token). Where the residual bypasses
      the norm (a norm on the attention output only: Gemma 2/3, OLMo 2), the self term is
      g(a_ii) + x_i. Undefined (NaN) without such a norm (pre-norm blocks).

    Args:
        pattern: attention weights per head, rows = targets i, columns = sources j.
        head_values: f_h(x_j) for every source j and head h.
        residual: what the attention output is added to at each target (the block input).
        ln_gamma: gain of the norm the attention output passes through (``None``: pre-norm).
        ln_scale: that norm's per-target divisor (``None`` for pre-norm blocks).
        centres: LayerNorm (True) or RMSNorm (False).
        residual_normed: whether the residual passes through that norm too (post-LN).
        pairs: also compute the per-pair map (n x n x d_model work, chunked over targets).

    Examples:
        >>> eye = torch.eye(3).expand(2, 3, 3)  # 2 heads, 3 tokens, each attending to itself
        >>> mixing = norm_mixing(eye, torch.randn(3, 2, 4), torch.randn(3, 4))
        >>> float(mixing.attn_n.abs().max()), float(mixing.attnres_n.abs().max())
        (0.0, 0.0)
    """
    own = torch.einsum("hi,ihm->im", pattern.diagonal(dim1=-2, dim2=-1), head_values)  # a_ii
    context = torch.einsum("hij,jhm->im", pattern, head_values) - own  # sum_{j != i} a_ij
    attn_n = _ratio(context, own)
    attnres_n = _ratio(context, own + residual)
    term_norm = None
    if ln_gamma is not None and ln_scale is not None:
        term_norm = TermNorm(ln_gamma, torch.zeros_like(ln_gamma), centres, ln_scale)
        attnresln_n = _attnresln_n(context, own, residual, term_norm, residual_normed)
    else:
        attnresln_n = torch.full_like(attn_n, float("nan"))
    contributions = (
        _pair_map(pattern, head_values, residual, term_norm, residual_normed) if pairs else None
    )
    return LayerMixing(
        raw_self=pattern.diagonal(dim1=-2, dim2=-1).mean(0),
        attn_n=attn_n,
        attnres_n=attnres_n,
        attnresln_n=attnresln_n,
        contributions=contributions,
    )


def _pair_map(
    pattern: Tensor,
    head_values: Tensor,
    residual: Tensor,
    attention_norm: TermNorm | None,
    residual_normed: bool,
) -> Tensor:
    """|t_ij| for every target i and source j.

    The residual is on the diagonal; the terms are taken through the norm after the attention sum
    where there is one.
    """
    return torch.cat(
        [
            terms.norm(dim=-1)
            for _, terms in _carried_terms(
                pattern, head_values, residual, attention_norm, residual_normed
            )
        ]
    )


def _carried_terms(
    pattern: Tensor,
    head_values: Tensor,
    residual: Tensor,
    attention_norm: TermNorm | None,
    residual_normed: bool,
    temporaries: int = _ROW_TEMPORARIES,
) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, terms)`` chunk by chunk of targets, from v_ij = a_ij + [i = j] x_i.

    Terms ``[rows, n, d_model]`` are v_ij carried through the norm after the attention sum (the
    residual joins before it when ``residual_normed``, after it otherwise), or v_ij itself without
    such a norm. Chunked so that the n x n x d_model terms stay within the memory budget.
    """
    n = pattern.shape[-1]
    size = items_per_chunk(n * head_values.shape[-1] * 4, temporaries=temporaries)
    for rows in chunks(n, size):
        terms = torch.einsum("hij,jhm->ijm", pattern[:, rows], head_values)  # a_ij [i, j, d]
        index = torch.arange(rows.start, rows.stop, device=pattern.device)
        local = index - rows.start
        res = residual[rows]
        if attention_norm is not None and residual_normed:
            terms[local, index] += res  # the residual joins the self term, then the norm
            terms = attention_norm.carry(terms, rows)
        elif attention_norm is not None:
            terms = attention_norm.carry(terms, rows)
            terms[local, index] += res
        else:
            terms[local, index] += res
        yield rows, terms


@dataclass(frozen=True)
class TermNorm:
    """A norm that a block's terms pass through, as the affine map of its fixed divisor.

    The map is ``gain * c(v) / scale + bias`` (``c`` centring for LayerNorm).
    """

    gain: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]
    centres: bool
    scale: Float[Tensor, "n 1"]

    def carry(self, terms: Tensor, rows: slice) -> Tensor:
        """The linear part applied to ``terms`` ``[rows, ..., d_model]`` of targets ``rows``."""
        centred = terms - terms.mean(-1, keepdim=True) if self.centres else terms
        scale = self.scale[rows].reshape(-1, *([1] * (terms.dim() - 1)))
        return self.gain * centred / scale


@dataclass(frozen=True)
class Attributions:
    """One layer's token-to-token attribution matrices ``[n (target i), n (source j)]``.

    Attributes:
        alti: ALTI (Ferrando et al. 2022): c_ij = max(0, |y_i|_1 - |y_i - T_i(x_j)|_1),
            each row divided by its sum.
        globenc: GlobEnc's per-layer N-Enc (Modarressi et al. 2022): |e_ij|_2, the term of
            source j carried through both norms of the layer (raw, rows not normalised).
        term_norms: |T_i(x_j)|_2 (the per-pair map of :class:`LayerMixing`).
    """

    alti: Float[Tensor, "n n"]
    globenc: Float[Tensor, "n n"]
    term_norms: Float[Tensor, "n n"]


def attributions(
    pattern: Float[Tensor, "head_index n n"],
    head_values: Float[Tensor, "n head_index d_model"],
    residual: Float[Tensor, "n d_model"],
    b_O: Float[Tensor, " d_model"] | None,
    attention_norm: TermNorm | None,
    residual_normed: bool,
    second_norm: TermNorm | None,
) -> Attributions:
    """ALTI and GlobEnc matrices of one layer of one text, as the authors' code defines them.

    The term of source j at target i is v_ij = a_ij + [i = j] x_i (the residual joins the
    token's own term), a_ij = sum_h alpha^h_ij f_h(x_j) as in :func:`norm_mixing`.

    - T_i(x_j): v_ij carried through the norm after the attention sum (post-LN's LN1,
      centred and scaled by gamma / s_i) when ``residual_normed``; through the norm on the
      attention output only (the residual added after) otherwise; v_ij itself for pre-norm
      blocks (the authors' pre-LN branch). y_i = sum_j T_i(x_j) + the biases (b_O carried
      likewise, the norm's bias): the attention sublayer's real output in the residual stream.
    - ALTI: c_ij = max(0, |y_i|_1 - |y_i - T_i(x_j)|_1), rows normalised to sum 1.
    - GlobEnc: e_ij = T_i(x_j) carried through the layer's second norm (post-LN's LN2 with its
      real divisor, which the FFN output enters; the FFN itself is not decomposed), N_ij =
      |e_ij|_2; without a second norm after the residual sum (pre-norm and output-norm
      blocks), N_ij = |T_i(x_j)|_2.

    Work is chunked over targets (n x n x d_model terms at most ``items_per_chunk`` rows).
    """
    d = head_values.shape[-1]
    bias = torch.zeros(d, device=pattern.device) if b_O is None else b_O
    alti, globenc, norms = [], [], []
    for rows, terms in _carried_terms(
        pattern, head_values, residual, attention_norm, residual_normed, _ROW_TEMPORARIES + 2
    ):
        rest = bias.expand(terms.shape[0], d)  # what belongs to no token, in y_i
        if attention_norm is not None:
            rest = attention_norm.carry(rest, rows) + attention_norm.bias
        y = terms.sum(1) + rest  # [i, d]
        distance = (y[:, None, :] - terms).abs().sum(-1)  # |y_i - T_i(x_j)|_1
        c = (y.abs().sum(-1, keepdim=True) - distance).clamp_min(0.0)
        alti.append(c / c.sum(-1, keepdim=True).clamp_min(1e-12))
        norms.append(terms.norm(dim=-1))
        if second_norm is not None:
            terms = second_norm.carry(terms, rows)
        globenc.append(terms.norm(dim=-1))
    return Attributions(
        alti=torch.cat(alti), globenc=torch.cat(globenc), term_norms=torch.cat(norms)
    )


#: Live [pairs, width] temporaries per (target, source) pair in :func:`value_zeroing`
#: (the zeroed attention output, the block's intermediates, its output).
_VZ_TEMPORARIES = 6


def value_zeroing(
    pattern: Float[Tensor, "head_index n n"],
    values: Float[Tensor, "n head_index d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    resid_pre: Float[Tensor, "n d_model"],
    attn_out: Float[Tensor, "n d_model"],
    rest: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    mlp_out: Float[Tensor, "n d_model"] | None,
    width: int,
) -> tuple[Float[Tensor, "n n"], Float[Tensor, "n d_model"]]:
    """Value Zeroing (Mohebbi et al. 2023) of one layer of one text.

    S[i, t] is the cosine distance between the block's output at i and its output when token t's
    value vectors (every head's, b_V included) are zeroed, each row divided by its sum (the
    diagonal, zeroing a token's own value, is kept). The function returns
    ``(S, the recomputed block output)``.

    Zeroing v_t leaves the attention weights alone, so the attention output at i loses
    exactly sum_h alpha^h_it v^h_t W^h_O; ``rest`` (a :class:`BlockRest`) re-runs the rest
    of the block on (x_i, o'_i) for every pair with a non-zero weight. Pairs no head
    attends (the causal mask's upper triangle) change nothing and are 0 without being run.
    Work is chunked over pairs (``width``: the widest per-row activation, d_mlp).
    """
    n = pattern.shape[-1]
    heads, d_head = values.shape[1], values.shape[2]
    reference = rest(resid_pre, attn_out, mlp_out)
    distance = torch.zeros(n, n, dtype=torch.float64, device=pattern.device)
    targets, sources = (pattern.sum(0) > 0).nonzero(as_tuple=True)
    flat_W_O = W_O.reshape(heads * d_head, -1)
    per_chunk = items_per_chunk(4 * max(width, heads * d_head), _VZ_TEMPORARIES)
    for part in chunks(len(targets), per_chunk):
        i, t = targets[part], sources[part]
        weights = pattern[:, i, t].T  # [pairs, head]
        lost = (weights[:, :, None] * values[t]).reshape(len(i), heads * d_head) @ flat_W_O
        zeroed = rest(resid_pre[i], attn_out[i] - lost, None if mlp_out is None else mlp_out[i])
        distance[i, t] = _cosine_distance(zeroed, reference[i])
    total = distance.sum(-1, keepdim=True)
    scores = torch.where(total > 0, distance / total.clamp_min(1e-300), torch.nan)
    return scores, reference


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a_p, b_p) per row, in float64, clipped to [0, 2] (as sklearn's)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return (1.0 - cos).clamp(0.0, 2.0)


def rollout_product(previous: Tensor, layer: Tensor) -> Tensor:
    """``layer @ previous`` in float64, divided by its largest entry.

    A raw product of matrices (GlobEnc's norms) would overflow over many layers, and a global factor
    leaves every row's shares unchanged.
    """
    product = layer.double() @ previous.double()
    return product / product.abs().max().clamp_min(1e-300)


def rollout_step(
    previous: Float[Tensor, "n n"], pattern: Float[Tensor, "head_index n n"]
) -> Float[Tensor, "n n"]:
    """One step of attention rollout: (0.5 * mean_h A + 0.5 * I) @ previous.

    Examples:
        >>> uniform = torch.full((1, 2, 2), 0.5)
        >>> rollout_step(torch.eye(2), uniform).tolist()
        [[0.75, 0.25], [0.25, 0.75]]
    """
    n = pattern.shape[-1]
    mixed = 0.5 * pattern.mean(0) + 0.5 * torch.eye(n, device=pattern.device)
    return mixed @ previous


# -- batches ----------------------------------------------------------------------------

#: One row per text x position x block: how much of the token's attention-block output
#: comes from other tokens.
MIXING_COLUMNS = (
    *BLOCK_TOKEN_KEYS,
    "raw_self",  # the weight on itself, averaged over heads (mix_raw is 1 minus it)
    *(
        column
        for m in MIXING
        for column in (("rollout_self", m.column) if m.column == "mix_rollout" else (m.column,))
    ),
)

#: Value Zeroing re-runs the rest of each block once per (target, source) pair, n^2 rows
#: per block: texts longer than this many tokens get NaN (``vz_max_tokens`` to change it).
VZ_MAX_TOKENS = 256


def _mixed(rollout: Tensor) -> np.ndarray:
    """1 - R_ii / sum_j R_ij: the share of each row's attribution from other tokens."""
    total = rollout.sum(-1).clamp_min(1e-300)
    return (1.0 - rollout.diagonal() / total).float().cpu().numpy()


def block_mixing_hooks(model: TracedModel, block: int) -> list[str]:
    """Hooks the mixing of block ``block`` reads (its input, pattern, values, norm scale)."""
    names = [
        model.spec.resid_hook(block),
        model.spec.pattern_hook(block),
        model.spec.attn_values.format(block=block),
    ]
    norm = _attention_norm(model, block)
    names += [f"{norm[0]}.hook_scale"] if norm is not None else []
    second = _second_norm(model, block)
    names += [f"{second}.hook_scale"] if second is not None else []
    # Value Zeroing: the raw attention output, the block output it is checked against, and
    # what else the rest of the block reads (a parallel block's MLP output)
    names += [model.spec.raw_attn_hook(block), model.spec.resid_hook(block + 1)]
    return list(dict.fromkeys(names + model.block_rest(block).hooks))


def mixing_hooks(model: TracedModel) -> list[str]:
    """Hooks :func:`mixing_batch` reads: :func:`block_mixing_hooks` of every block."""
    return [name for block in range(model.n_blocks) for name in block_mixing_hooks(model, block)]


def _attention_norm(model: TracedModel, block: int) -> tuple[str, bool] | None:
    """The norm the attention output passes through before joining the stream.

    Also whether the residual passes through it too (post-LN) or not (a norm on the sublayer
    output).
    """
    paths = model.spec.post_norm_modules(block)
    if paths is not None:
        return paths[0], True
    outputs = model.spec.output_norm_modules(block)
    return None if outputs is None else (outputs[0], False)


def _second_norm(model: TracedModel, block: int) -> str | None:
    """The norm after the MLP's residual sum (post-LN's LN2).

    GlobEnc carries every term through it; ``None`` where the stream is not normalised after the
    MLP.
    """
    paths = model.spec.post_norm_modules(block)
    return None if paths is None else paths[1]


@dataclass(frozen=True)
class _BlockTensors:
    """One block's hook tensors of a padded batch, as :class:`MixingStream` reads them.

    Patterns ``[batch, head, pos, pos]``, values ``[batch, pos, kv_head, d_head]``, the block input
    ``[batch, pos, d_model]`` and the divisors of its norms ``[batch, pos, 1]`` (``None`` where the
    block has no such norm).
    """

    pattern: Tensor
    values: Tensor
    resid: Tensor
    scale: Tensor | None
    second_scale: Tensor | None


class MixingStream:
    """Mixing rows of one batch, computed block by block (a :class:`BlockStream`).

    Computed inside the forward pass with :meth:`TracedModel.run_hooks`, so that one block's
    attention patterns are all that is held, or from a full store with :func:`mixing_batch`.
    """

    def __init__(
        self,
        model: TracedModel,
        batch: Batch,
        pair_text: int | Mapping[int, Collection[int] | None] | None = None,
        pair_blocks: Collection[int] | None = None,
        vz_max_tokens: int = VZ_MAX_TOKENS,
        head_pairs: bool = False,
    ) -> None:
        """``pair_text``: the text whose per-pair map is kept, at the blocks in ``pair_blocks``.

        Every block when ``pair_blocks`` is ``None``. Several texts: a mapping from each
        ``text_id`` to its blocks (``None``: every block). With ``head_pairs``, those texts'
        attention weights are also kept head by head (:meth:`head_frame`). Value Zeroing runs
        on texts of at most ``vz_max_tokens`` tokens (NaN beyond).
        """
        self.model, self.batch = model, batch
        if pair_text is None:
            self.pair_maps: dict[int, Collection[int] | None] = {}
        elif isinstance(pair_text, int):
            self.pair_maps = {pair_text: pair_blocks}
        else:
            self.pair_maps = dict(pair_text)
        self.head_pairs = head_pairs
        self.head_rows: list[pd.DataFrame] = []
        self.vz_max_tokens = vz_max_tokens
        self.rests = [model.block_rest(block) for block in range(model.n_blocks)]
        self.width = max(model.d_model, int(getattr(model.bridge.cfg, "d_mlp", 0) or 0))
        self.tolerance = reconstruction_tolerance(model.dtype)
        self.weights = [model.output_weights(block) for block in range(model.n_blocks)]
        self.norms = [_attention_norm(model, block) for block in range(model.n_blocks)]
        self.affines = [None if n is None else model.norm_affine(n[0]) for n in self.norms]
        self.seconds = [_second_norm(model, block) for block in range(model.n_blocks)]
        self.second_affines = [None if p is None else model.norm_affine(p) for p in self.seconds]
        device = model.device
        self.rollouts = [torch.eye(len(item.ids), device=device) for item in batch.texts]
        eye64 = [
            torch.eye(len(item.ids), device=device, dtype=torch.float64) for item in batch.texts
        ]
        self.alti_rollouts, self.globenc_rollouts = list(eye64), list(eye64)
        self.vz_rollouts = list(eye64)
        self.special = [
            torch.isin(
                torch.tensor(item.ids, device=device),
                torch.tensor(sorted(model.special_ids), device=device),
            )
            .cpu()
            .numpy()
            for item in batch.texts
        ]
        self.tokens = [model.token_strings(item.ids) for item in batch.texts]
        self.rows: list[pd.DataFrame] = []
        self.pairs: list[pd.DataFrame] = []
        self.shape = tuple(batch.ids.shape)

    def names(self, block: int) -> list[str]:
        """The hooks block ``block``'s mixing measures read."""
        return block_mixing_hooks(self.model, block)

    def reduce(self, block: int, tensors: dict[str, Tensor]) -> None:
        """Every mixing measure of every text of the batch at ``block``."""
        norm, second = self.norms[block], self.seconds[block]
        inputs = _BlockTensors(
            pattern=tensors[self.model.spec.pattern_hook(block)],
            values=tensors[self.model.spec.attn_values.format(block=block)],
            resid=tensors[self.model.spec.resid_hook(block)],
            scale=None
            if norm is None
            else tensors[f"{norm[0]}.hook_scale"].reshape(*self.shape, 1),
            second_scale=None
            if second is None
            else tensors[f"{second}.hook_scale"].reshape(*self.shape, 1),
        )
        for row, item in enumerate(self.batch.texts):
            self._reduce_text(block, row, item, inputs, tensors, self._wanted(item.text_id, block))

    def _wanted(self, text_id: int, block: int) -> bool:
        """Whether text ``text_id``'s per-pair map is kept at ``block``."""
        if text_id not in self.pair_maps:
            return False
        blocks = self.pair_maps[text_id]
        return blocks is None or block in blocks

    def _term_norms(
        self, block: int, row: int, n: int, inputs: _BlockTensors
    ) -> tuple[TermNorm | None, TermNorm | None]:
        """The norms text ``row``'s terms pass through at ``block``.

        One after attention and one after the whole block (each ``None`` where the block has none).
        """
        affine, second_affine = self.affines[block], self.second_affines[block]
        attention_norm = second_norm = None
        if affine is not None and inputs.scale is not None:
            attention_norm = TermNorm(
                affine.gain, affine.bias, affine.centres, inputs.scale[row, :n]
            )
        if second_affine is not None and inputs.second_scale is not None:
            second_norm = TermNorm(
                second_affine.gain,
                second_affine.bias,
                second_affine.centres,
                inputs.second_scale[row, :n],
            )
        return attention_norm, second_norm

    def _reduce_text(
        self,
        block: int,
        row: int,
        item: EncodedText,
        inputs: _BlockTensors,
        tensors: dict[str, Tensor],
        wanted: bool,
    ) -> None:
        """Every mixing measure of text ``row`` at ``block``, appended as its rows."""
        norm, affine = self.norms[block], self.affines[block]
        W_O, b_O = self.weights[block]
        n = len(item.ids)
        pattern = inputs.pattern[row, :, :n, :n]
        values = inputs.values[row, :n]
        repeat = W_O.shape[0] // values.shape[1]  # grouped-query attention: share kv heads
        values = values.repeat_interleave(repeat, dim=1)
        head_values = torch.einsum("jhd,hdm->jhm", values, W_O)
        residual_normed = norm is not None and norm[1]
        mixing = norm_mixing(
            pattern,
            head_values,
            inputs.resid[row, :n],
            ln_gamma=None if affine is None else affine.gain,
            ln_scale=None if inputs.scale is None else inputs.scale[row, :n],
            centres=True if affine is None else affine.centres,
            residual_normed=residual_normed,
            pairs=False,  # the pair map comes from attributions() below
        )
        self.rollouts[row] = rollout_step(self.rollouts[row], pattern)
        attention_norm, second_norm = self._term_norms(block, row, n, inputs)
        found = attributions(
            pattern,
            head_values,
            inputs.resid[row, :n],
            b_O,
            attention_norm,
            residual_normed,
            second_norm,
        )
        self.alti_rollouts[row] = rollout_product(self.alti_rollouts[row], found.alti)
        self.globenc_rollouts[row] = rollout_product(self.globenc_rollouts[row], found.globenc)
        vz = self._value_zeroing(block, row, n, tensors, pattern, values)
        self.rows.append(self._text_frame(block, row, item, mixing, vz))
        if wanted:
            self.pairs.append(
                self._pairs(item.text_id, block, found, vz, pattern, self.tokens[row])
            )
            if self.head_pairs:
                self.head_rows.append(_head_weights(self.model.name, item.text_id, block, pattern))

    def _text_frame(
        self, block: int, row: int, item: EncodedText, mixing: LayerMixing, vz: Tensor | None
    ) -> pd.DataFrame:
        """``mixing.csv``'s rows of text ``row`` at ``block`` (the rollouts updated)."""
        n = len(item.ids)
        rollout_self = self.rollouts[row].diagonal()
        vz_layer = vz_rolled = np.full(n, np.nan)
        if vz is not None:
            self.vz_rollouts[row] = rollout_product(self.vz_rollouts[row], vz)
            vz_layer = (1.0 - vz.diagonal()).cpu().numpy()
            vz_rolled = _mixed(self.vz_rollouts[row])
        return pd.DataFrame(
            {
                "model": self.model.name,
                "text_id": item.text_id,
                "position": np.arange(n),
                "block": block,
                "token": self.tokens[row],
                "token_id": list(item.ids),
                "is_special": self.special[row],
                "is_unk": self.model.is_unk(item.ids),
                "raw_self": mixing.raw_self.cpu().numpy(),
                "mix_raw": (1.0 - mixing.raw_self).cpu().numpy(),
                "mix_attn_n": mixing.attn_n.cpu().numpy(),
                "mix_attnres_n": mixing.attnres_n.cpu().numpy(),
                "mix_attnresln_n": mixing.attnresln_n.cpu().numpy(),
                "rollout_self": rollout_self.cpu().numpy(),
                "mix_rollout": (1.0 - rollout_self).cpu().numpy(),
                "mix_globenc": _mixed(self.globenc_rollouts[row]),
                "mix_alti": _mixed(self.alti_rollouts[row]),
                "mix_vz": vz_layer,
                "mix_vz_rollout": vz_rolled,
            }
        )

    def _value_zeroing(
        self,
        block: int,
        row: int,
        n: int,
        tensors: dict[str, Tensor],
        pattern: Tensor,
        values: Tensor,
    ) -> Tensor | None:
        """Value Zeroing of text ``row`` at ``block`` (``None`` beyond ``vz_max_tokens``).

        Given after checking that the recomputed block output is the model's own.
        """
        if n > self.vz_max_tokens:
            return None
        spec, rest = self.model.spec, self.rests[block]
        extra = [tensors[name][row, :n] for name in rest.hooks]
        scores, recomputed = value_zeroing(
            pattern,
            values,
            self.weights[block][0],
            tensors[spec.resid_hook(block)][row, :n],
            tensors[spec.raw_attn_hook(block)][row, :n],
            rest,
            extra[0] if extra else None,
            self.width,
        )
        error = rest.check(recomputed, tensors[spec.resid_hook(block + 1)][row, :n], self.tolerance)
        if error is not None:
            raise ReconstructionError(
                f"value zeroing: block {block} of {self.model.model_type} recomputed from its "
                f"attention output differs from the model's own output (relative error "
                f"{error:.2g})"
            )
        return scores

    def _pairs(
        self,
        text_id: int,
        block: int,
        found: Attributions,
        vz: Tensor | None,
        pattern: Tensor,
        tokens: list[str],
    ) -> pd.DataFrame:
        n = len(tokens)
        contribution = found.term_norms.cpu().numpy()
        share = contribution / np.clip(contribution.sum(-1, keepdims=True), 1e-12, None)
        globenc = found.globenc.double().cpu().numpy()
        globenc = globenc / np.clip(globenc.sum(-1, keepdims=True), 1e-300, None)
        target, source = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        return pd.DataFrame(
            {
                "model": self.model.name,
                "text_id": text_id,
                "block": block,
                "target": target.ravel(),
                "source": source.ravel(),
                "target_token": np.array(tokens, dtype=object)[target.ravel()],
                "source_token": np.array(tokens, dtype=object)[source.ravel()],
                "contribution": contribution.ravel(),
                "share": share.ravel(),
                "attention": pattern.mean(0).cpu().numpy().ravel(),
                "globenc": globenc.ravel(),
                "alti": found.alti.cpu().numpy().ravel(),
                "vz": np.full(n * n, np.nan) if vz is None else vz.cpu().numpy().ravel(),
            }
        )

    def head_frame(self) -> pd.DataFrame | None:
        """With ``head_pairs``: the kept texts' attention weights, one row per head and pair."""
        return pd.concat(self.head_rows, ignore_index=True) if self.head_rows else None

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """The mixing rows (sorted by text, position, block) and the pair map, if any."""
        frame = pd.concat(self.rows, ignore_index=True)
        frame = frame.sort_values(["text_id", "position", "block"], kind="stable")
        pairs = pd.concat(self.pairs, ignore_index=True) if self.pairs else None
        return frame.reset_index(drop=True)[list(MIXING_COLUMNS)], pairs


def _head_weights(model: str, text_id: int, block: int, pattern: Tensor) -> pd.DataFrame:
    """``attention_heads.csv``'s rows: each head's weight a_ij of every target i on source j."""
    h, n, _ = pattern.shape
    head, target, source = np.meshgrid(np.arange(h), np.arange(n), np.arange(n), indexing="ij")
    return pd.DataFrame(
        {
            "model": model,
            "text_id": text_id,
            "block": block,
            "head": head.ravel(),
            "target": target.ravel(),
            "source": source.ravel(),
            "attention": pattern.float().cpu().numpy().ravel(),
        }
    )


def mixing_batch(
    model: TracedModel,
    batch: Batch,
    store: dict[str, Tensor],
    pair_text: int | Mapping[int, Collection[int] | None] | None = None,
    vz_max_tokens: int = VZ_MAX_TOKENS,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-token mixing rows for one batch, and the per-pair map of text ``pair_text``.

    Both come from a store holding :func:`mixing_hooks` (the same numbers as :class:`MixingStream`
    inside the forward pass).

    The pair table has one row per block x target x source: ``contribution`` (the norm of
    F_i(x_j), the residual added on the diagonal), ``share`` (its share of the target's
    row sum), ``attention`` (mean raw attention weight over heads), and this block's own
    ``globenc`` (N-Enc, as a share of the target's row) and ``alti`` (c_ij, rows sum to 1)
    before any rollout.
    """
    stream = MixingStream(model, batch, pair_text, vz_max_tokens=vz_max_tokens)
    for block in range(model.n_blocks):
        stream.reduce(block, {name: store[name] for name in stream.names(block)})
    return stream.frames()


def mixing_table(
    model: TracedModel,
    texts: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    pair_text: int | Mapping[int, Collection[int] | None] | None = None,
    vz_max_tokens: int = VZ_MAX_TOKENS,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Mixing rows for ``texts`` (and the pair map of ``pair_text``)."""
    encoded = prepare_texts(model, texts)
    frames, pair_frames = [], []
    with torch.inference_mode():
        for batch in iter_batches(encoded, batch_size, model.pad_id):
            store = model.run_hooks(batch.ids, batch.mask, mixing_hooks(model))
            frame, pairs = mixing_batch(model, batch, store, pair_text, vz_max_tokens)
            frames.append(frame)
            if pairs is not None:
                pair_frames.append(pairs)
    return pd.concat(frames, ignore_index=True), (
        pd.concat(pair_frames, ignore_index=True) if pair_frames else None
    )
