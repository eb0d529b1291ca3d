"""Activation patching: restore states of one run inside another, many cells per forward pass.

A *cell* is one intervention: at one site, one layer or block (or a window of consecutive
blocks), one position (or every position), and for ``head`` one attention head. Each cell's
patched run is the *target* input (the corrupt one when denoising) with the cell's
activations replaced by the *source* run's (the clean one when denoising) at the same
positions; everything else is computed anew. A chunk of cells is one forward pass: its rows
are the target input repeated, and each row's hooks replace only that row's cell. The source
activations come from one forward pass of the source input.

Sites and the activation each replaces (TransformerLens hook names of the bridge):

- ``resid``: residual layer ``l`` (0..L-1), the input of block ``l`` (``resid_pre``);
- ``attn`` / ``mlp``: what block ``b``'s attention / MLP sublayer adds to the residual
  stream (for post-LN models: to the sum its LayerNorm reads; with sandwich norms: after
  the sublayer's own output norm);
- ``head``: head ``h``'s mixed values ``z`` in block ``b`` (what the output projection
  reads for that head): its contribution to the attention output, per query head, so that
  grouped-query attention is patched per query head, not per shared key/value head.

Metrics (read from the final residual state, the last block's output):

- ``logit-diff``: logit of the answer minus logit of the wrong token, through the model's
  own head (final norm, unembedding, soft-capping), at the metric position;
- ``logprob``: log-probability of the answer there (nats);
- ``state-cos``: cosine of the final state at the metric position to the clean run's final
  state there (1 for the clean run): for models without an output head.

Effects are normalised per pair: ``(patched - corrupt) / (clean - corrupt)``, 0 where the
patch restored nothing and 1 where it restored the clean run's metric (denoising); NaN where
clean and corrupt agree to 1e-6 (nothing to restore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from residual_trace._typing import Float, Tensor
from residual_trace.tracer.chunking import items_per_chunk

if TYPE_CHECKING:
    from residual_trace.models import TracedModel

Site = Literal["resid", "attn", "mlp", "head"]
Metric = Literal["logit-diff", "logprob", "state-cos"]
SITES: tuple[Site, ...] = ("resid", "attn", "mlp", "head")
METRICS: tuple[Metric, ...] = ("logit-diff", "logprob", "state-cos")

#: ``same``: the metric is read at the patched position itself (``state-cos`` only).
SAME = -2
#: A cell that patches every position (a head summed over positions).
EVERY = -1
#: Clean and corrupt metrics closer than this leave the normalised effect undefined.
AGREE = 1e-6


@dataclass(frozen=True)
class Cell:
    """One intervention (see the module docstring).

    Attributes:
        site: ``resid``, ``attn``, ``mlp`` or ``head``.
        index: the residual layer (``resid``) or the block (the others; with a window, the
            block the window is centred on).
        position: the position patched, or :data:`EVERY`.
        head: the head (``head`` only; else -1).
        blocks: the layers/blocks whose activations are replaced (one, or a window).
    """

    site: Site
    index: int
    position: int
    head: int = -1
    blocks: tuple[int, ...] = ()


def window_blocks(block: int, window: int, n_blocks: int) -> tuple[int, ...]:
    """The blocks a window of ``window`` restores around ``block``, as Meng et al. (2022) do.

    ``range(max(0, block - window // 2), min(n_blocks, block + ceil(window / 2)))``: for an
    even window the centre block and ``window / 2 - 1`` after it.

    Examples:
        >>> window_blocks(5, 1, 30), window_blocks(5, 10, 30), window_blocks(1, 10, 30)
        ((5,), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (0, 1, 2, 3, 4, 5))
    """
    return tuple(range(max(0, block - window // 2), min(n_blocks, block - (-window // 2))))


def grid_cells(
    site: Site,
    n_blocks: int,
    n_heads: int,
    n_positions: int,
    window: int = 1,
    head_positions: Literal["all", "each"] = "all",
    positions: Sequence[int] | None = None,
) -> list[Cell]:
    """Every cell of one site: layers (or blocks) x positions (x heads for ``head``).

    ``positions`` restricts the positions (default: every one); ``head_positions="all"``
    patches each head at every position at once (one cell per head).
    """
    chosen = list(range(n_positions)) if positions is None else list(positions)
    if site == "resid":
        return [Cell("resid", layer, p, -1, (layer,)) for layer in range(n_blocks) for p in chosen]
    if site == "head":
        where = [EVERY] if head_positions == "all" else chosen
        return [
            Cell("head", block, p, head, (block,))
            for block in range(n_blocks)
            for head in range(n_heads)
            for p in where
        ]
    return [
        Cell(site, block, p, -1, window_blocks(block, window, n_blocks))
        for block in range(n_blocks)
        for p in chosen
    ]


def hook_name(model: TracedModel, site: Site, index: int) -> str:
    """The hook whose activation a cell of ``site`` replaces at layer/block ``index``."""
    spec = model.spec
    if site == "resid":
        return spec.resid_hook(index)
    if site == "head":
        return spec.attn_z.format(block=index)
    attn, mlp = spec.delta_hooks(index)
    return attn if site == "attn" else mlp


def needed_hooks(model: TracedModel, sites: Sequence[Site]) -> list[str]:
    """Every hook the source run must keep for cells of ``sites``."""
    return [hook_name(model, site, k) for site in sites for k in range(model.n_blocks)]


Edit = Callable[[Tensor], Tensor]


def _edits(
    model: TracedModel,
    cells: Sequence[Cell],
    source: dict[str, Tensor],
    base: dict[str, Edit] | None = None,
) -> dict[str, Edit]:
    """Per hook, the function replacing each row's cell with the source's activation.

    ``base`` edits (the noise of a noise-corrupted run) apply to every row first, so that a
    cell at the same hook overwrites them.
    """
    plan: dict[str, list[tuple[int, int, int]]] = {}
    n_positions = next(iter(source.values())).shape[1]
    for row, cell in enumerate(cells):
        spots = range(n_positions) if cell.position == EVERY else (cell.position,)
        for index in cell.blocks:
            name = hook_name(model, cell.site, index)
            plan.setdefault(name, []).extend((row, p, cell.head) for p in spots)

    def edit_for(name: str, spots: list[tuple[int, int, int]]) -> Callable[[Tensor], Tensor]:
        rows = torch.tensor([s[0] for s in spots])
        at = torch.tensor([s[1] for s in spots])
        heads = torch.tensor([s[2] for s in spots])
        per_head = bool((heads >= 0).any())
        values = source[name][0]  # [pos, d] or [pos, head, d_head]

        def edit(tensor: Tensor) -> Tensor:
            out = tensor.clone()
            device = out.device
            r, p = rows.to(device), at.to(device)
            if per_head:
                h = heads.to(device)
                out[r, p, h] = values.to(device=device, dtype=out.dtype)[p, h]
            else:
                out[r, p] = values.to(device=device, dtype=out.dtype)[p]
            return out

        return edit

    edits = {name: edit_for(name, spots) for name, spots in plan.items()}
    for name, first in (base or {}).items():
        then = edits.get(name)
        edits[name] = first if then is None else _compose(first, then)
    return edits


def _compose(first: Edit, then: Edit) -> Edit:
    def both(tensor: Tensor) -> Tensor:
        return then(first(tensor))

    return both


@dataclass(frozen=True)
class MetricSpec:
    """How a run's final states become one number per row.

    Attributes:
        metric: ``logit-diff``, ``logprob`` or ``state-cos``.
        position: the position read (``SAME``: the patched position, ``state-cos`` only).
        answer, wrong: token ids (``logit-diff`` needs both, ``logprob`` the answer).
        reference: the clean run's final states ``[pos, d_model]`` (``state-cos``).
    """

    metric: Metric
    position: int
    answer: int | None = None
    wrong: int | None = None
    reference: Tensor | None = None


def metric_values(
    model: TracedModel,
    final: Float[Tensor, "n pos d_model"],
    spec: MetricSpec,
    positions: Sequence[int],
    head: Callable[[Tensor], Tensor] | None,
) -> np.ndarray:
    """The metric of each row of ``final`` (``positions``: each row's read position)."""
    rows = torch.arange(final.shape[0])
    at = torch.tensor(list(positions))
    states = final[rows, at]
    if spec.metric == "state-cos":
        assert spec.reference is not None
        reference = spec.reference.to(states.device)[at]
        values = torch.nn.functional.cosine_similarity(states.double(), reference.double(), dim=-1)
        return values.cpu().numpy()
    assert head is not None and spec.answer is not None
    out = np.empty(states.shape[0])
    # vocabulary-sized: the head runs on as many rows as the memory budget allows
    step = items_per_chunk(model.d_vocab * 4, temporaries=3)
    for start in range(0, states.shape[0], step):
        rows = states[start : start + step]
        if spec.metric == "logprob":
            chosen = torch.log_softmax(head(rows).double(), dim=-1)[:, spec.answer]
        else:  # two logits: no vocabulary-sized temporary where the head is linear
            assert spec.wrong is not None
            columns = getattr(head, "columns", None)
            pair = (
                columns(rows, [spec.answer, spec.wrong])
                if columns
                else head(rows)[:, [spec.answer, spec.wrong]]
            )
            chosen = pair[:, 0].double() - pair[:, 1].double()
        out[start : start + step] = chosen.cpu().numpy()
    return out


def read_positions(spec: MetricSpec, cells: Sequence[Cell], n_positions: int) -> list[int]:
    """Where each cell's metric is read: the metric position, or the cell's own (``SAME``)."""
    if spec.position != SAME:
        return [spec.position] * len(cells)
    return [c.position if c.position >= 0 else n_positions - 1 for c in cells]


#: Tokens one patched forward pass holds at most: on two CPU cores the throughput of a pass
#: stops growing near 512-1024 tokens (smollm2: 5.4 s for 300 cells at 64 rows of 10 tokens,
#: 5.3 s at 300 rows), while its memory keeps growing.
TOKENS_PER_PASS = 1024


def cells_per_pass(model: TracedModel, n_positions: int, limit: int | None = None) -> int:
    """Cells one forward pass holds: at most :data:`TOKENS_PER_PASS` tokens, within the budget.

    A row costs about its residual stream per block, its MLP's hidden layer and its attention
    scores, in float32: ``n_positions * (12 * d_model + heads * n_positions) * 4`` bytes.
    """
    per_row = n_positions * (12 * model.d_model + model.n_heads * n_positions) * 4
    n = min(items_per_chunk(per_row, temporaries=2), max(1, TOKENS_PER_PASS // n_positions))
    return max(1, min(n, limit or n))


def run_cells(
    model: TracedModel,
    target_ids: Sequence[int],
    cells: Sequence[Cell],
    source: dict[str, Tensor],
    spec: MetricSpec,
    head: Callable[[Tensor], Tensor] | None,
    per_pass: int,
    on_pass: Callable[[int], None] | None = None,
    base: dict[str, Edit] | None = None,
) -> np.ndarray:
    """The metric of every cell's patched run, ``per_pass`` cells per forward pass.

    ``base`` edits apply to every row before its cell (the target's noise); ``on_pass(k)``
    is called after each pass with the number of cells it ran.
    """
    n_positions = len(target_ids)
    final_hook = model.spec.resid_hook(model.n_blocks)
    values = np.empty(len(cells))
    for start in range(0, len(cells), per_pass):
        chunk = cells[start : start + per_pass]
        ids = torch.tensor([list(target_ids)] * len(chunk))
        mask = torch.ones_like(ids)
        final = model.run_patched(ids, mask, _edits(model, chunk, source, base), final_hook)
        at = read_positions(spec, chunk, n_positions)
        values[start : start + len(chunk)] = metric_values(model, final, spec, at, head)
        if on_pass is not None:
            on_pass(len(chunk))
    return values


def source_states(
    model: TracedModel,
    ids: Sequence[int],
    hooks: Sequence[str],
    base: dict[str, Edit] | None = None,
) -> tuple[dict[str, Tensor], Float[Tensor, "pos d_model"]]:
    """One forward pass of ``ids``: the activations at ``hooks``, and the final states.

    The activations are kept as the model holds them (its dtype: what a patch writes back),
    by hook name, after any ``base`` edit at the same hook (a noise-corrupted run); the final
    residual state ``[pos, d_model]`` comes back float32.
    """
    batch = torch.tensor([list(ids)])
    store: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[[Tensor], Tensor]:
        def keep(tensor: Tensor) -> Tensor:
            store[name] = tensor.detach().clone()
            return tensor

        return keep

    final_hook = model.spec.resid_hook(model.n_blocks)
    edits: dict[str, Edit] = {h: keeper(h) for h in dict.fromkeys(hooks)}
    for name, first in (base or {}).items():
        edits[name] = _compose(first, edits[name]) if name in edits else first
    final = model.run_patched(batch, torch.ones_like(batch), edits, final_hook)
    return store, final[0]


def noise_edit(
    model: TracedModel, positions: Sequence[int], noise: Float[Tensor, "k d_model"]
) -> dict[str, Edit]:
    """The edit adding ``noise`` to the input embedding states (layer 0) at ``positions``.

    Meng et al. (2022) corrupt a fact by adding Gaussian noise to the subject's token
    embeddings; layer 0 is what the first block reads (after BERT's embedding LayerNorm,
    Gemma's scaling).
    """
    at = torch.tensor(list(positions))

    def add(tensor: Tensor) -> Tensor:
        out = tensor.clone()
        out[:, at.to(out.device)] += noise.to(device=out.device, dtype=out.dtype)
        return out

    return {model.spec.resid_hook(0): add}


def gaussian_noise(
    n_positions: int, d_model: int, scale: float, seed: int
) -> Float[Tensor, "n d_model"]:
    """``N(0, scale^2)`` noise of shape ``[n_positions, d_model]`` from its own seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_positions, d_model, generator=generator, dtype=torch.float32) * scale


def normalised(patched: np.ndarray, clean: float, corrupt: float) -> np.ndarray:
    """``(patched - corrupt) / (clean - corrupt)``; NaN where clean and corrupt agree."""
    span = clean - corrupt
    if not np.isfinite(span) or abs(span) < AGREE:
        return np.full_like(patched, np.nan, dtype=float)
    return (patched - corrupt) / span


def position_kinds(
    clean: Sequence[int], corrupt: Sequence[int], subject: Sequence[int] | None = None
) -> list[str]:
    """Each position's role, as Meng et al. (2022) group them, the differing span as subject.

    ``subject`` gives the subject's positions instead (noise corruption, where the tokens
    themselves do not differ).

    ``before`` the first differing token, ``subject_first``, ``subject_middle`` and
    ``subject_last`` (the differing span; one differing token is ``subject_last``),
    ``after_first`` (the token after it), ``after`` (further tokens) and ``last`` (the
    last position, whatever else it is).

    Examples:
        >>> position_kinds([1, 2, 3, 4, 5, 6], [1, 9, 9, 4, 5, 6])
        ['before', 'subject_first', 'subject_last', 'after_first', 'after', 'last']
    """
    differ = (
        sorted(subject)
        if subject is not None
        else [i for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b]
    )
    kinds = []
    first, last = (differ[0], differ[-1]) if differ else (len(clean), len(clean))
    for i in range(len(clean)):
        if i == len(clean) - 1:
            kinds.append("last")
        elif i < first:
            kinds.append("before")
        elif i == last:
            kinds.append("subject_last")
        elif i == first:
            kinds.append("subject_first")
        elif i < last:
            kinds.append("subject_middle")
        elif i == last + 1:
            kinds.append("after_first")
        else:
            kinds.append("after")
    return kinds
