"""Exact split of every layer's state into residual, attention, MLP and norm-bias parts.

Most decoders are additive: resid_post = resid_pre + attn + mlp, where attn and mlp are
what each sublayer adds to the stream: its own output for pre-norm blocks (GPT-2, Llama,
Qwen, Mistral, Phi-3, OPT) and for parallel ones (GPT-NeoX, GPT-J, Phi, where both read the
block input), the output of the norm applied to it for Gemma 2/3 and OLMo 2. For those, the
per-head split carries each head's output through that norm (RMSNorm is linear once its
divisor is fixed: gain * h / s).

Post-LN encoders (BERT) normalise after each sublayer: mid = LN1(pre + attn) and
post = LN2(mid + mlp). LayerNorm is affine once its divisor s (the scale of the *sum*, read
from the ``hook_scale`` hooks) is fixed: LN(x) = gamma * (x - mean(x)) / s + beta. So each
part p of the sum is carried as gamma * (p - mean(p)) / s, and beta is a part of its own.
The parts then add up to the block output exactly. TransformerLens's ``decompose_resid``
adds the post-LN ``hook_attn_out`` (LN1's *output*, a residual, not a delta) and so misses
the true state silently; this module does not, and checks at run time that its parts
reconstruct ``resid_post`` (relative error below :data:`RECONSTRUCTION_TOLERANCE`).

Two views:

- *local*: layer k (the output of block k-1) = residual part (block input carried through
  the block's norms) + attention part + MLP part + bias part;
- *cumulative*: layer k = the layer-0 state carried through every later norm + each earlier
  sublayer's part carried the same way (+ one bias part, the sum of every carried beta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from residual_trace._typing import Float, Tensor
from residual_trace.defaults import DEFAULT_BATCH_SIZE
from residual_trace.models import TracedModel
from residual_trace.naming import head_name
from residual_trace.tracer.batching import (
    BLOCK_TOKEN_KEYS,
    Batch,
    iter_batches,
    prepare_texts,
)

#: Largest tolerated relative error ``|sum(parts) - resid_post| / |resid_post|`` (float32).
RECONSTRUCTION_TOLERANCE = 1e-4


def reconstruction_tolerance(dtype: torch.dtype) -> float:
    """The tolerance for a model run in ``dtype``: 1e-4, or 4 machine epsilons in half precision.

    It is 1e-4 for float32 and wider. In half precision every hook tensor is rounded to the
    dtype once, and a block sums a handful of them, so it is 4 machine epsilons: 0.031 for
    bfloat16, 0.0039 for float16.
    """
    return max(RECONSTRUCTION_TOLERANCE, 4 * torch.finfo(dtype).eps)


class ReconstructionError(RuntimeError):
    """The named parts do not add up to the model's own state: the split is wrong."""


@dataclass(frozen=True)
class PostNorm:
    """One norm applied after a sublayer, with the divisor it used on this batch.

    Attributes:
        weight: the effective gain ``[d_model]`` (gamma; 1 + w for Gemma's RMSNorm).
        bias: beta ``[d_model]`` (zeros when the norm has none).
        scale: the divisor of the norm's input ``[batch, pos, 1]``: sqrt(var(x) + eps) for
            LayerNorm, sqrt(mean(x^2) + eps) for RMSNorm.
        centres: LayerNorm (subtract the mean first) or RMSNorm (no centring).
    """

    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]
    scale: Float[Tensor, "batch pos 1"]
    centres: bool = True

    def _centre(self, part: Tensor) -> Tensor:
        return part - part.mean(-1, keepdim=True) if self.centres else part

    def carry(self, part: Float[Tensor, "*parts batch pos d_model"]) -> Tensor:
        """The share of ``part`` in the norm's output: gamma * c(part) / s."""
        return self.weight * self._centre(part) / self.scale

    def carry_heads(self, heads: Float[Tensor, "batch pos head_index d_model"]) -> Tensor:
        """:meth:`carry` for per-head parts (the divisor is shared by a position's heads)."""
        return self.weight * self._centre(heads) / self.scale[..., None]


@dataclass(frozen=True)
class BlockParts:
    """One block's output split into named parts that add up to it exactly.

    Attributes:
        resid: the block input, carried through the block's norms.
        attn: the attention sublayer's output, carried through the norms after it.
        mlp: the MLP sublayer's output, carried likewise.
        bias: the norms' betas, carried likewise (zero for pre-LN models).
    """

    resid: Float[Tensor, "batch pos d_model"]
    attn: Float[Tensor, "batch pos d_model"]
    mlp: Float[Tensor, "batch pos d_model"]
    bias: Float[Tensor, "batch pos d_model"]

    def total(self) -> Tensor:
        """The sum of the parts (equal to the block output, to rounding)."""
        return self.resid + self.attn + self.mlp + self.bias


def split_block(
    resid_pre: Float[Tensor, "batch pos d_model"],
    attn: Float[Tensor, "batch pos d_model"],
    mlp: Float[Tensor, "batch pos d_model"],
    norms: tuple[PostNorm, PostNorm] | None,
) -> BlockParts:
    """Split a block's output; ``norms`` are (LN1, LN2) for post-LN, ``None`` for pre-LN.

    Examples:
        >>> x, a, m = torch.ones(1, 1, 2), torch.full((1, 1, 2), 2.0), torch.zeros(1, 1, 2)
        >>> split_block(x, a, m, norms=None).total().tolist()
        [[[3.0, 3.0]]]
    """
    if norms is None:
        return BlockParts(resid=resid_pre, attn=attn, mlp=mlp, bias=torch.zeros_like(resid_pre))
    ln1, ln2 = norms
    return BlockParts(
        resid=ln2.carry(ln1.carry(resid_pre)),
        attn=ln2.carry(ln1.carry(attn)),
        mlp=ln2.carry(mlp),
        bias=ln2.carry(ln1.bias.expand_as(resid_pre)) + ln2.bias,
    )


def carry_through_block(
    parts: Float[Tensor, "part batch pos d_model"], norms: tuple[PostNorm, PostNorm] | None
) -> Tensor:
    """Carry earlier parts of the block input through the block (identity for pre-LN)."""
    if norms is None:
        return parts
    ln1, ln2 = norms
    return ln2.carry(ln1.carry(parts))


def relative_error(
    estimate: Float[Tensor, "batch pos d_model"],
    target: Float[Tensor, "batch pos d_model"],
) -> Float[Tensor, "batch pos"]:
    """|estimate - target| / |target| per position."""
    return (estimate - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)


def check_reconstruction(
    estimate: Tensor,
    target: Tensor,
    valid: Tensor,
    where: str,
    tolerance: float = RECONSTRUCTION_TOLERANCE,
) -> float:
    """Raise :class:`ReconstructionError` if the parts miss the state on any valid token."""
    error = float(relative_error(estimate, target)[valid].max()) if bool(valid.any()) else 0.0
    if not error < tolerance:
        raise ReconstructionError(
            f"{where}: the decomposition misses resid_post by a relative error of {error:.2e} "
            f"(tolerance {tolerance:.0e}): the structure derived for this architecture "
            "(residual_trace/models/architectures.py) does not hold here; please report it"
        )
    return error


# -- tables ------------------------------------------------------------------------------

#: Columns of the local decomposition table (one row per text x position x block: what
#: block ``block`` did to the token; its output is residual layer ``block + 1``).
DECOMPOSE_COLUMNS = (
    *BLOCK_TOKEN_KEYS,
    "attn_norm_rel",
    "mlp_norm_rel",
    "proj_pre",
    "proj_resid",
    "proj_attn",
    "proj_mlp",
    "proj_bias",
    "proj_post",
    "recon_error",
)


def post_norm(model: TracedModel, path: str, store: dict[str, Tensor]) -> PostNorm:
    """The norm at bridge path ``path`` with the divisor it used on the stored batch."""
    affine = model.norm_affine(path)
    reference = store[model.spec.resid_hook(0)]
    scale = store[f"{path}.hook_scale"].reshape(*reference.shape[:-1], 1)
    return PostNorm(weight=affine.gain, bias=affine.bias, scale=scale, centres=affine.centres)


def _post_norms(
    model: TracedModel, block: int, store: dict[str, Tensor]
) -> tuple[PostNorm, PostNorm] | None:
    """Post-LN models: the LayerNorms after the attention and MLP residual sums."""
    paths = model.spec.post_norm_modules(block)
    if paths is None:
        return None
    return post_norm(model, paths[0], store), post_norm(model, paths[1], store)


def _attn_output_norm(model: TracedModel, block: int, store: dict[str, Tensor]) -> PostNorm | None:
    """Sandwich/output models: the norm applied to the attention sublayer's output."""
    paths = model.spec.output_norm_modules(block)
    return None if paths is None else post_norm(model, paths[0], store)


def decompose_hooks(model: TracedModel, per_head: bool = False) -> list[str]:
    """The hooks :func:`decompose_batch` reads (with the per-head ones for ``per_head``)."""
    names = [model.spec.resid_hook(k) for k in range(model.n_blocks + 1)]
    for block in range(model.n_blocks):
        names += model.spec.delta_hooks(block)
        if per_head:
            names += [model.spec.attn_z.format(block=block), model.spec.raw_attn_hook(block)]
            outputs = model.spec.output_norm_modules(block)
            if outputs is not None:
                names.append(f"{outputs[0]}.hook_scale")
        paths = model.spec.post_norm_modules(block)
        if paths is not None:
            names += [f"{path}.hook_scale" for path in paths]
    return list(dict.fromkeys(names))


#: Columns of the per-head table (``--per-head``): one row per text x position x block x head
#: (head -1, named ``L{block}b_O``, is the attention output bias).
HEAD_COLUMNS = (
    "model",
    "text_id",
    "position",
    "block",
    "head",
    "head_name",
    "token",
    "token_id",
    "is_special",
    "is_unk",
    "head_norm_rel",
    "proj_head",
)


@dataclass
class BatchDecomposition:
    """One batch's local table, its cumulative sums and, with ``per_head``, the per-head table.

    The cumulative sums are to be pooled over batches.
    """

    local: pd.DataFrame
    cumulative: pd.DataFrame
    heads: pd.DataFrame | None = None


@dataclass(frozen=True)
class HeadParts:
    """Each head's output (z_h @ W_O[h]) and the output bias, raw and carried.

    They are carried like the attention part; raw and carried are identical for pre-LN
    models.
    """

    raw: Float[Tensor, "batch pos head_index d_model"]
    raw_bias: Float[Tensor, "batch pos d_model"]
    carried: Float[Tensor, "batch pos head_index d_model"]
    carried_bias: Float[Tensor, "batch pos d_model"]


def split_heads(
    model: TracedModel,
    block: int,
    z: Float[Tensor, "batch pos head_index d_head"],
    attn: Float[Tensor, "batch pos d_model"],
    norms: tuple[PostNorm, PostNorm] | None,
    valid: Tensor,
    output_norm: PostNorm | None = None,
) -> HeadParts:
    """Split the attention output into heads; the heads plus b_O must reconstruct it.

    ``attn`` is the raw sublayer output (before any norm). ``norms`` carries it through a
    post-LN block; ``output_norm`` through the norm on the sublayer's output (Gemma 2/3,
    OLMo 2), whose own bias, if any, joins the output-bias row.
    """
    W_O, b_O = model.output_weights(block)
    heads = torch.einsum("bphd,hdm->bphm", z, W_O)
    bias = torch.zeros_like(attn) if b_O is None else b_O.expand_as(attn)
    where = f"{model.name} ({model.model_type}), block {block} heads"
    tolerance = reconstruction_tolerance(model.dtype)
    check_reconstruction(heads.sum(2) + bias, attn, valid, where, tolerance)
    if output_norm is not None:
        return HeadParts(
            raw=heads,
            raw_bias=bias,
            carried=output_norm.carry_heads(heads),
            carried_bias=output_norm.carry(bias) + output_norm.bias,
        )
    if norms is None:
        return HeadParts(raw=heads, raw_bias=bias, carried=heads, carried_bias=bias)
    ln1, ln2 = norms
    return HeadParts(
        raw=heads,
        raw_bias=bias,
        carried=ln2.carry_heads(ln1.carry_heads(heads)),
        carried_bias=ln2.carry(ln1.carry(bias)),
    )


@dataclass(frozen=True)
class _Tokens:
    """What every block of one batch is measured against.

    That is the real (unpadded) tokens, their unit input-token directions, which of them are
    special, and the reconstruction tolerance.
    """

    valid: Tensor
    ids: Tensor
    e_hat: Tensor
    special: Tensor
    content: Tensor
    tolerance: float

    @classmethod
    def of(cls, model: TracedModel, batch: Batch) -> _Tokens:
        valid = batch.mask.bool().to(model.device)
        ids = batch.ids.to(model.device)
        e_hat = F.normalize(model.W_E[ids], dim=-1)  # unit input-token direction [b, p, d]
        special = torch.isin(ids, torch.tensor(sorted(model.special_ids), device=model.device))
        content = valid & ~special
        return cls(valid, ids, e_hat, special, content, reconstruction_tolerance(model.dtype))

    def proj(self, x: Tensor) -> Tensor:
        """The projection of ``x`` on the unit input-token direction."""
        return (x * self.e_hat).sum(-1)


def _block_values(
    model: TracedModel,
    tokens: _Tokens,
    block: int,
    states: tuple[Tensor, Tensor, Tensor, Tensor],
    norms: tuple[PostNorm, PostNorm] | None,
    parts: BlockParts,
) -> dict[str, Tensor]:
    """``decompose.csv``'s measures of one block (every position, padded)."""
    x, a, m, post = states
    if norms is not None:
        mlp_input = norms[0].carry(x + a) + norms[0].bias
    else:
        mlp_input = x if model.spec.parallel else x + a
    proj = tokens.proj
    return {
        "attn_norm_rel": a.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12),
        "mlp_norm_rel": m.norm(dim=-1) / mlp_input.norm(dim=-1).clamp_min(1e-12),
        "proj_pre": proj(x),
        "proj_resid": proj(parts.resid),
        "proj_attn": proj(parts.attn),
        "proj_mlp": proj(parts.mlp),
        "proj_bias": proj(parts.bias),
        "proj_post": proj(post),
        "recon_error": relative_error(parts.total(), post),
    }


def _head_values(
    model: TracedModel,
    tokens: _Tokens,
    block: int,
    store: dict[str, Tensor],
    norms: tuple[PostNorm, PostNorm] | None,
    x_and_a: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """``(head_norm_rel, proj_head)`` of one block's heads, ``[n, head + 1]`` over real tokens.

    The output bias b_O, attributed to no head, is the last column (head -1).
    """
    x, a = x_and_a
    valid = tokens.valid
    z = store[model.spec.attn_z.format(block=block)]
    raw = store[model.spec.raw_attn_hook(block)]
    output_norm = _attn_output_norm(model, block, store)
    split = split_heads(model, block, z, raw, norms, valid, output_norm)
    if output_norm is not None:
        carried = split.carried.sum(2) + split.carried_bias
        where = f"{model.name} ({model.model_type}), block {block} heads through the norm"
        check_reconstruction(carried, a, valid, where, tokens.tolerance)
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    raw_norms = [split.raw.norm(dim=-1), split.raw_bias.norm(dim=-1)[..., None]]
    projected = [
        (split.carried * tokens.e_hat[:, :, None]).sum(-1),
        tokens.proj(split.carried_bias)[..., None],
    ]
    return (torch.cat(raw_norms, -1) / x_norm)[valid], torch.cat(projected, -1)[valid]


def _cumulative_rows(
    tokens: _Tokens, layer: int, labelled: list[tuple[str, Tensor]], post: Tensor
) -> list[dict[str, object]]:
    """``cumulative``'s per-batch sums at residual layer ``layer``: one row per source."""
    content = tokens.content
    squared = (post * post).sum(-1).clamp_min(1e-12)
    return [
        {
            "layer": layer,
            "source": label,
            "source_block": _source_block(label),
            "n_tokens": int(content.sum()),
            "sum_proj": float(tokens.proj(part)[content].sum()),
            "sum_share": float(((part * post).sum(-1) / squared)[content].sum()),
            "sum_norm": float(part.norm(dim=-1)[content].sum()),
        }
        for label, part in labelled
    ]


def _token_keys(model: TracedModel, batch: Batch, tokens: _Tokens) -> dict[str, np.ndarray]:
    """The key columns of the real tokens, in (text, position) order, for one block."""
    valid = tokens.valid
    token_ids = tokens.ids[valid]
    text_rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    positions = torch.arange(valid.shape[1], device=valid.device)[None, :].expand_as(valid)[valid]
    text_ids = np.array([t.text_id for t in batch.texts], dtype=np.int64)
    ids_np = token_ids.cpu().numpy()
    return {
        "text_id": text_ids[text_rows.cpu().numpy()],
        "position": positions.cpu().numpy(),
        "token": np.array(model.token_strings(ids_np.tolist()), dtype=object),
        "token_id": ids_np,
        "is_special": tokens.special[valid].cpu().numpy(),
        "is_unk": np.array(model.is_unk(ids_np.tolist()), dtype=bool),
    }


def _local_frame(
    model: TracedModel, keys: dict[str, np.ndarray], local: dict[str, list[Tensor]]
) -> pd.DataFrame:
    """``decompose.csv``'s rows of one batch."""
    n_blocks, n_tokens = model.n_blocks, len(keys["token_id"])
    frame = pd.DataFrame(
        {
            "model": model.name,
            "text_id": np.tile(keys["text_id"], n_blocks),
            "position": np.tile(keys["position"], n_blocks),
            "block": np.repeat(np.arange(n_blocks, dtype=np.int64), n_tokens),
            **{k: np.tile(keys[k], n_blocks) for k in ("token", "token_id", "is_special")},
            "is_unk": np.tile(keys["is_unk"], n_blocks),
            **{name: torch.cat(parts).cpu().numpy() for name, parts in local.items()},
        }
    )
    frame = frame.sort_values(["text_id", "position", "block"], kind="stable")
    return frame.reset_index(drop=True)[list(DECOMPOSE_COLUMNS)]


def _heads_frame(
    model: TracedModel, keys: dict[str, np.ndarray], head_values: dict[str, list[Tensor]]
) -> pd.DataFrame:
    """``heads.csv``'s rows of one batch."""
    n_blocks, n_tokens = model.n_blocks, len(keys["token_id"])
    per_layer = torch.stack([torch.stack(head_values[k]) for k in head_values])  # [2, L, n, H+1]
    n_heads = per_layer.shape[-1]
    head_ids = np.array([*range(n_heads - 1), -1])

    def per_head(values: np.ndarray) -> np.ndarray:
        return np.repeat(np.tile(values, n_blocks), n_heads)

    frame = pd.DataFrame(
        {
            "model": model.name,
            "text_id": per_head(keys["text_id"]),
            "position": per_head(keys["position"]),
            "block": np.repeat(np.arange(n_blocks), n_tokens * n_heads),
            "head": np.tile(head_ids, n_tokens * n_blocks),
            **{k: per_head(keys[k]) for k in ("token", "token_id", "is_special", "is_unk")},
            "head_norm_rel": per_layer[0].reshape(-1).cpu().numpy(),
            "proj_head": per_layer[1].reshape(-1).cpu().numpy(),
        }
    )
    assert len(frame) == n_tokens * n_blocks * n_heads
    frame = frame.sort_values(["text_id", "position", "block", "head"], kind="stable")
    frame = frame.reset_index(drop=True)
    names = {(b, h): head_name(b, int(h)) for b in range(n_blocks) for h in head_ids}
    frame["head_name"] = [names[key] for key in zip(frame["block"], frame["head"], strict=True)]
    return frame[list(HEAD_COLUMNS)]


def decompose_batch(
    model: TracedModel,
    batch: Batch,
    store: dict[str, Tensor] | None = None,
    per_head: bool = False,
) -> BatchDecomposition:
    """Split every layer of one batch; raises :class:`ReconstructionError` if parts miss.

    ``store`` may hold the activations already (from :meth:`TracedModel.run_hooks` with at
    least :func:`decompose_hooks`), so that one forward pass serves several analyses.
    """
    if store is None:
        store = model.run_hooks(batch.ids, batch.mask, decompose_hooks(model, per_head))
    tokens = _Tokens.of(model, batch)
    valid, tolerance = tokens.valid, tokens.tolerance
    resid = [store[model.spec.resid_hook(k)] for k in range(model.n_blocks + 1)]
    sources, labels = resid[0][None], ["embed"]
    bias = torch.zeros_like(resid[0])
    local: dict[str, list[Tensor]] = {
        name: [] for name in DECOMPOSE_COLUMNS[len(BLOCK_TOKEN_KEYS) :]
    }
    head_values: dict[str, list[Tensor]] = {"head_norm_rel": [], "proj_head": []}
    cumulative_rows: list[dict[str, object]] = []
    for block in range(model.n_blocks):
        attn_name, mlp_name = model.spec.delta_hooks(block)
        x, a, m, post = resid[block], store[attn_name], store[mlp_name], resid[block + 1]
        norms = _post_norms(model, block, store)
        parts = split_block(x, a, m, norms)
        where = f"{model.name} ({model.model_type}), block {block}"
        check_reconstruction(parts.total(), post, valid, where, tolerance)
        for name, tensor in _block_values(
            model, tokens, block, (x, a, m, post), norms, parts
        ).items():
            local[name].append(tensor[valid])
        if per_head:
            norm_rel, projected = _head_values(model, tokens, block, store, norms, (x, a))
            head_values["head_norm_rel"].append(norm_rel)
            head_values["proj_head"].append(projected)
        sources = torch.cat(
            [carry_through_block(sources, norms), parts.attn[None], parts.mlp[None]]
        )
        labels += [f"L{block}_attn", f"L{block}_mlp"]
        bias = (carry_through_block(bias[None], norms)[0] if norms else bias) + parts.bias
        check_reconstruction(sources.sum(0) + bias, post, valid, f"{where}, cumulative", tolerance)
        labelled = list(zip([*labels, "bias"], [*sources, bias], strict=True))
        cumulative_rows += _cumulative_rows(tokens, block + 1, labelled, post)
    keys = _token_keys(model, batch, tokens)
    return BatchDecomposition(
        local=_local_frame(model, keys, local),
        cumulative=pd.DataFrame(cumulative_rows),
        heads=_heads_frame(model, keys, head_values) if per_head else None,
    )


def _source_block(label: str) -> int | None:
    """The block of a cumulative source label (``L3_mlp`` -> 3; ``embed``, ``bias`` -> None)."""
    return int(label[1:].split("_")[0]) if label.startswith("L") else None


def pool_cumulative(parts: list[pd.DataFrame], model_name: str) -> pd.DataFrame:
    """Means over all non-special tokens of every batch: one row per layer x source.

    Columns: ``layer`` (the residual state, 1..L), ``source`` (``embed``, ``L{b}_attn``,
    ``L{b}_mlp`` for block b, ``bias``: every norm bias carried to this layer),
    ``source_block`` (b, empty for ``embed`` and ``bias``),
    ``proj`` (mean projection on the unit input-token direction), ``share`` (mean share of
    the state's squared norm, (part . h) / |h|^2: sums to 1 over sources), ``norm`` (mean
    norm of the carried part), ``n_tokens``.
    """
    sums = (
        pd.concat(parts)
        .groupby(["layer", "source"], sort=False)
        .agg({"sum_proj": "sum", "sum_share": "sum", "sum_norm": "sum", "n_tokens": "sum"})
        .reset_index()
    )
    n = sums["n_tokens"].clip(lower=1)
    return pd.DataFrame(
        {
            "model": model_name,
            "layer": sums["layer"],
            "source": sums["source"],
            "source_block": pd.array([_source_block(s) for s in sums["source"]], dtype="Int64"),
            "proj": sums["sum_proj"] / n,
            "share": sums["sum_share"] / n,
            "norm": sums["sum_norm"] / n,
            "n_tokens": sums["n_tokens"],
        }
    )


def decompose_table(
    model: TracedModel,
    texts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(local, cumulative)`` decomposition tables for ``texts`` (see the module docstring)."""
    encoded = prepare_texts(model, texts, max_length)
    locals_, cumulative = [], []
    with torch.inference_mode():
        for batch in iter_batches(encoded, batch_size, model.pad_id):
            result = decompose_batch(model, batch)
            locals_.append(result.local)
            cumulative.append(result.cumulative)
    return pd.concat(locals_, ignore_index=True), pool_cumulative(cumulative, model.name)
