"""The measures of ``trace perturb``, run over a corpus batch by batch.

They ask whether attention (and the residual stream) follows tokens or positions.

For every text, the original is run once in a padded batch; then the unperturbed text is run
again (the *re-run*, in a different batch: the noise floor) together with its perturbations.
Each perturbed run is reduced at once against the original (nothing larger than one text's
patterns is kept):

- per block and head, the token- and position-aligned similarity of the patterns and the
  token-following index (:mod:`residual_trace.tracer.alignment`), or, when the tokens
  change but do not move (``random-token``, ``embed-shuffle``), the similarity at the same
  positions (how much of the pattern survives without its tokens);
- per head, the structure measures of the perturbed pattern
  (:mod:`residual_trace.tracer.structure`);
- per residual layer, the cosine of the perturbed states to the original ones, aligned by
  token and by position.

:func:`iter_perturb_encoded` yields one :class:`TextRows` per text; the perturbations are
drawn by :class:`PerturbationSource` from a :class:`PerturbPlan` (the options of
``trace perturb`` are one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch

from residual_trace._typing import Tensor
from residual_trace.defaults import DEFAULT_BATCH_SIZE
from residual_trace.errors import UserError
from residual_trace.figures.perturb import AttentionExample
from residual_trace.models import TracedModel
from residual_trace.models.traced import BlockStream
from residual_trace.naming import head_name
from residual_trace.progress import progress_bar
from residual_trace.tracer.alignment import (
    align_patterns,
    position_similarity,
    rerun_distance,
    resid_alignment,
)
from residual_trace.tracer.alignment_summary import MOVING
from residual_trace.tracer.batching import EncodedText, iter_batches
from residual_trace.tracer.chunking import chunks, items_per_chunk
from residual_trace.tracer.perturbations import (
    Perturbation,
    embed_shuffle,
    embedding_order,
    embedding_rows,
    identity,
    pair_swaps,
    random_tokens,
    replacement_candidates,
    shuffle,
    swap_spans,
    word_span,
)
from residual_trace.tracer.structure import STRUCTURE_COLUMNS, pattern_structure

__all__ = [
    "PERTURBATION_COLUMNS",
    "RESID_COLUMNS",
    "PerturbPlan",
    "PerturbationSource",
    "TextRows",
    "attention_example",
    "iter_perturb_encoded",
]


@runtime_checkable
class PerturbPlan(Protocol):
    """Which perturbations to draw (:class:`~residual_trace.PerturbOptions` is one).

    ``mode`` is ``swap``, ``shuffle``, ``embed-shuffle`` or ``random-token``; ``swap`` the
    two words to exchange (or ``None``); ``n_samples`` the perturbations per text (or
    embedding shuffles); ``all_pairs`` every pair swap; ``seed`` the seed of every draw.
    """

    @property
    def mode(self) -> str:
        """``swap``, ``shuffle``, ``embed-shuffle`` or ``random-token``."""

    @property
    def swap(self) -> tuple[str, str] | None:
        """The two words to exchange, or ``None``."""

    @property
    def n_samples(self) -> int:
        """Perturbations per text (or embedding shuffles)."""

    @property
    def all_pairs(self) -> bool:
        """Every pair swap instead of a sample."""

    @property
    def seed(self) -> int:
        """The seed of every draw."""


#: One row per model x text x perturbation x block x head (``perturbations.csv``).
PERTURBATION_COLUMNS = (
    "model",
    "text_id",
    "perturbation",
    "sample",
    "label",
    "block",
    "head",
    "head_name",
    "sim_token",
    "sim_position",
    "follow_index",
    "n_rows",
    "noise",
    *STRUCTURE_COLUMNS,
)

#: One row per model x text x perturbation x residual layer (``resid.csv``).
RESID_COLUMNS = (
    "model",
    "text_id",
    "perturbation",
    "sample",
    "layer",
    "cos_token",
    "cos_position",
    "n_positions",
)


@dataclass
class _Run:
    """One sequence's patterns ``[layer, head, n, n]`` and residual stream ``[layer, n, d]``.

    The patterns are kept as views into the batch's hook tensors, one per layer: a batch's
    patterns are never copied.
    """

    pattern_layers: list[torch.Tensor]
    resid: torch.Tensor


class _Runner:
    """Forward passes keeping exactly the patterns and residual layers the job needs."""

    def __init__(self, model: TracedModel) -> None:
        self.model = model
        self.pattern_names = [model.spec.pattern_hook(b) for b in range(model.n_blocks)]
        self.resid_names = [model.spec.resid_hook(k) for k in range(model.n_blocks + 1)]

    def padded(self, ids: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]) -> list[_Run]:
        """The originals of a padded batch, with every block's patterns.

        It runs like any forward pass that returns its attentions.
        """
        store = self.model.run_hooks(ids, mask, [*self.pattern_names, *self.resid_names])
        layers = [store[name] for name in self.pattern_names]
        resid = torch.stack([store[n] for n in self.resid_names], dim=1)
        return [
            _Run([layer[row, :, :n, :n] for layer in layers], resid[row, :, :n])
            for row, n in enumerate(lengths)
        ]

    def streamed(self, sequences: Sequence[Sequence[int]], stream: BlockStream) -> torch.Tensor:
        """Sequences of one length in one forward pass (no padding).

        Their patterns are handed to ``stream`` block by block and dropped; returns the
        residual stream ``[sequence, layer, n, d]``.
        """
        ids = torch.tensor([list(s) for s in sequences])
        store = self.model.run_hooks(ids, torch.ones_like(ids), self.resid_names, stream=stream)
        return torch.stack([store[n] for n in self.resid_names], dim=1)


def _sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _perturbations(
    model: TracedModel,
    config: PerturbPlan,
    item: EncodedText,
    special: list[bool],
    candidates: list[int] | None,
) -> list[Perturbation]:
    """The perturbations of one text (``[]`` when the text cannot be perturbed this way)."""
    ids = item.ids
    if config.mode == "swap" and config.swap is not None:
        (first, n_first), (second, n_second) = (
            word_span(model, item.text, ids, word) for word in config.swap
        )
        label = f"swap {config.swap[0]}<->{config.swap[1]}"
        repeated = [
            f"{w} x{n}" for w, n in zip(config.swap, (n_first, n_second), strict=True) if n > 1
        ]
        if repeated:  # the first occurrence of each is used
            label += f" (first of {', '.join(repeated)})"
        return [swap_spans(ids, first, second, label=label)]
    if config.mode == "swap":
        swaps = list(pair_swaps(ids, special))
        if config.all_pairs or len(swaps) <= config.n_samples:
            return swaps
        rng = np.random.default_rng(_sample_seed(config.seed, item.text_id))
        chosen = sorted(rng.choice(len(swaps), size=config.n_samples, replace=False))
        return [swaps[i] for i in chosen]
    out: list[Perturbation] = []
    seen: set[tuple[int, ...]] = set()
    for sample in range(config.n_samples):
        seed = _sample_seed(config.seed, item.text_id, sample)
        if config.mode == "shuffle":
            p = shuffle(ids, special, seed)
        else:
            assert candidates is not None
            p = random_tokens(ids, special, candidates, seed)
        if p.ids not in seen:
            seen.add(p.ids)
            out.append(p)
    return out


#: Live n x n temporaries per head in :func:`_head_values` (the alignment's views, the
#: renormalised rows and the Jensen-Shannon terms), for sizing chunks of heads.
ALIGN_TEMPORARIES = 24


def _head_values(
    flat_original: Tensor,
    flat_rerun: Tensor,
    flat: Tensor,
    kind: str,
    permutation: Tensor,
    special: Tensor,
    content: Tensor,
    compared: Tensor,
    causal: bool,
) -> dict[str, Tensor]:
    """Per-head values of one chunk of heads ``[chunk, n, n]``."""
    count, n, _ = flat.shape
    nan = torch.full((count,), float("nan"), device=flat.device)
    if kind == "identity":
        similarity = 1.0 - rerun_distance(flat_original, flat)
        sim_token = sim_position = similarity
        index, noise = torch.zeros_like(similarity), nan
        rows = torch.full((count,), n)
    elif kind in MOVING:
        aligned = align_patterns(flat_original, flat, permutation, causal)
        again = align_patterns(flat_rerun, flat, permutation, causal)
        sim_token, sim_position, index, rows = (
            aligned.sim_token,
            aligned.sim_position,
            aligned.follow_index,
            aligned.n_rows,
        )
        noise = (aligned.follow_index - again.follow_index).abs()
    else:
        sim_position = position_similarity(flat_original, flat, compared)
        noise = (sim_position - position_similarity(flat_rerun, flat, compared)).abs()
        sim_token, index = nan, nan
        rows = torch.full((count,), int(compared.sum()))
    structure = pattern_structure(flat, special, content, causal)
    return {
        "sim_token": sim_token,
        "sim_position": sim_position,
        "follow_index": index,
        "n_rows": rows.to(flat.device),
        "noise": noise,
        **structure,
    }


@dataclass(frozen=True)
class _Setting:
    """What comparing one perturbed sequence with its original needs besides patterns."""

    perturbation: Perturbation
    permutation: Tensor
    special: Tensor
    content: Tensor
    compared: Tensor


def _setting(p: Perturbation, original_ids: Sequence[int], special: Tensor) -> _Setting:
    """Which positions ``p`` compares, by the kind of perturbation.

    The moved ones for swaps and shuffles, the changed ones for random tokens, every content
    token for embed-shuffle and the identity.
    """
    device = special.device
    permutation = torch.tensor(p.permutation, device=device)
    positions = torch.arange(len(p.ids), device=device)
    content = ~special
    if p.kind == "identity":
        compared = content
    elif p.kind in MOVING:
        compared = content & (permutation != positions)
    else:  # the tokens change in place: random-token, embed-shuffle
        # random tokens change where the id changed; shuffled embeddings change every token
        changed = torch.tensor(
            [p.kind == "embed-shuffle" or a != b for a, b in zip(p.ids, original_ids, strict=True)],
            device=device,
        )
        compared = content & changed
    return _Setting(p, permutation, special, content, compared)


def _block_values(
    original: Tensor, rerun: Tensor, perturbed: Tensor, setting: _Setting, causal: bool
) -> dict[str, Tensor]:
    """Per-head values of one block.

    ``original``, ``rerun`` and ``perturbed`` are the block's ``[head, n, n]`` patterns of the
    original, the re-run of the unperturbed text and the perturbed text.

    ``noise`` is how far the head's measure (index, or pattern kept) moves when the re-run
    of the unperturbed text stands in for the original: run-to-run noise, in the measure's
    units.
    """
    heads, n, _ = perturbed.shape
    # heads are independent: chunk them so the temporaries (about ALIGN_TEMPORARIES copies
    # of a head's n x n pattern) stay within the memory budget at any length
    size = items_per_chunk(n * n * perturbed.element_size(), temporaries=ALIGN_TEMPORARIES)
    parts = [
        _head_values(
            original[part],
            rerun[part],
            perturbed[part],
            setting.perturbation.kind,
            setting.permutation,
            setting.special,
            setting.content,
            setting.compared,
            causal,
        )
        for part in chunks(heads, size)
    ]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


class _GroupStream:
    """A :class:`BlockStream` over one same-length group of one text.

    The group is ``[unperturbed, perturbed...]``: each block's patterns are compared with the
    original's as soon as the block has run, then dropped. Row 0 (the re-run of the
    unperturbed text) is every row's noise reference; a row whose setting is ``None`` is not
    reported (the re-run of a later group).
    """

    def __init__(
        self,
        runner: _Runner,
        original: _Run,
        settings: Sequence[_Setting | None],
        causal: bool,
    ) -> None:
        self.runner, self.original, self.settings, self.causal = runner, original, settings, causal
        self.values: list[list[dict[str, Tensor]]] = [[] for _ in settings]

    def names(self, block: int) -> list[str]:
        return [self.runner.pattern_names[block]]

    def reduce(self, block: int, tensors: dict[str, Tensor]) -> None:
        patterns = tensors[self.runner.pattern_names[block]]  # [row, head, n, n]
        original = self.original.pattern_layers[block]
        for row, setting in enumerate(self.settings):
            if setting is not None:
                values = _block_values(original, patterns[0], patterns[row], setting, self.causal)
                self.values[row].append(values)

    def per_head(self, row: int) -> dict[str, np.ndarray]:
        """Row ``row``'s values over every block x head (block-major)."""
        blocks = self.values[row]
        return {key: torch.cat([b[key] for b in blocks]).cpu().numpy() for key in blocks[0]}


def _resid_values(
    original: _Run, resid: Tensor, setting: _Setting
) -> tuple[dict[str, np.ndarray], int]:
    """Per-residual-layer cosines of the perturbed states to the original's.

    Also returns the number of positions they compare.
    """
    kind = setting.perturbation.kind
    aligned = resid_alignment(original.resid, resid, setting.permutation, setting.compared)
    per_layer = {
        "cos_token": aligned.cos_token.cpu().numpy(),
        "cos_position": aligned.cos_position.cpu().numpy(),
    }
    if kind not in MOVING and kind != "identity":
        per_layer["cos_token"] = np.full_like(per_layer["cos_token"], np.nan)
    return per_layer, aligned.n_positions


class _Tables:
    """Collects the per-perturbation rows (one frame per perturbed run)."""

    def __init__(self, model: TracedModel) -> None:
        self.model = model
        self.heads: list[pd.DataFrame] = []
        self.resid: list[pd.DataFrame] = []
        blocks, heads = model.n_blocks, model.n_heads
        self.block_of = np.repeat(np.arange(blocks), heads)
        self.head_of = np.tile(np.arange(heads), blocks)
        self.names = [
            head_name(int(b), int(h)) for b, h in zip(self.block_of, self.head_of, strict=True)
        ]
        self.n_perturbations = 0

    def add(
        self,
        text_id: int,
        p: Perturbation,
        sample: int,
        per_head: dict[str, np.ndarray],
        per_layer: dict[str, np.ndarray],
        n_positions: int,
    ) -> None:
        size = len(self.block_of)
        frame = pd.DataFrame(
            {
                "model": self.model.name,
                "text_id": text_id,
                "perturbation": p.kind,
                "sample": sample,
                "label": p.label,
                "block": self.block_of,
                "head": self.head_of,
                "head_name": self.names,
                **{k: np.broadcast_to(v, (size,)) for k, v in per_head.items()},
            }
        )[list(PERTURBATION_COLUMNS)]
        self.heads.append(frame)
        layers = len(per_layer["cos_token"])
        resid = pd.DataFrame(
            {
                "model": self.model.name,
                "text_id": text_id,
                "perturbation": p.kind,
                "sample": sample,
                "layer": np.arange(layers),
                **per_layer,
                "n_positions": n_positions,
            }
        )[list(RESID_COLUMNS)]
        self.resid.append(resid)
        if p.kind != "identity":
            self.n_perturbations += 1


@dataclass(frozen=True)
class PerturbationSource:
    """What a text's perturbations are drawn from.

    The mode's options, the replacement vocabulary (random-token) and the embedding
    permutations (embed-shuffle).
    """

    model: TracedModel
    config: PerturbPlan
    candidates: list[int] | None
    orders: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def of(cls, model: TracedModel, config: PerturbPlan) -> PerturbationSource:
        """The sources of ``config``'s perturbations on ``model``."""
        candidates = replacement_candidates(model) if config.mode == "random-token" else None
        orders = []
        if config.mode == "embed-shuffle":
            rows, keep = embedding_rows(model), sorted(model.special_ids)
            for sample in range(config.n_samples):
                seed = _sample_seed(config.seed, sample)  # one permutation per sample
                orders.append((seed, embedding_order(rows, seed, keep)))
        return cls(model, config, candidates, tuple(orders))

    def perturbations(self, item: EncodedText) -> list[Perturbation]:
        """The perturbations of one text.

        When it has none: ``[]``, or a :class:`UserError` saying why.
        """
        if self.config.mode == "embed-shuffle":
            return [
                embed_shuffle(item.ids, order, f"embedding shuffle seed {seed}")
                for seed, order in self.orders
            ]
        special = [i in self.model.special_ids for i in item.ids]
        return _perturbations(self.model, self.config, item, special, self.candidates)


class _HeadPatterns:
    """A :class:`BlockStream` keeping chosen heads' patterns of every sequence in a batch."""

    def __init__(self, runner: _Runner, heads: Sequence[tuple[int, int]]) -> None:
        self.runner, self.heads = runner, list(heads)
        self.kept: dict[tuple[int, int], Tensor] = {}

    def names(self, block: int) -> list[str]:
        wanted = any(b == block for b, _ in self.heads)
        return [self.runner.pattern_names[block]] if wanted else []

    def reduce(self, block: int, tensors: dict[str, Tensor]) -> None:
        patterns = tensors[self.runner.pattern_names[block]]
        for b, head in self.heads:
            if b == block:
                self.kept[(b, head)] = patterns[:, head].clone()


def attention_example(
    model: TracedModel,
    config: PerturbPlan,
    item: EncodedText,
    heads: Sequence[tuple[int, int]],
) -> AttentionExample | None:
    """Text ``item`` and its first perturbation, run again together.

    Only the drawn heads' patterns are kept (memory n^2 per head at any length); ``None``
    when the text has no perturbation.
    """
    try:
        perturbations = PerturbationSource.of(model, config).perturbations(item)
    except UserError:
        return None
    if not perturbations:
        return None
    p = perturbations[0]
    runner = _Runner(model)
    stream = _HeadPatterns(runner, heads)
    with torch.inference_mode():
        runner.streamed([item.ids, p.ids], stream)
    return AttentionExample(
        tokens=model.token_strings(item.ids),
        perturbed_tokens=model.token_strings(p.ids),
        permutation=p.permutation,
        label=p.label,
        original={key: value[0].cpu().numpy() for key, value in stream.kept.items()},
        perturbed={key: value[1].cpu().numpy() for key, value in stream.kept.items()},
    )


@dataclass(frozen=True)
class TextRows:
    """One text's rows.

    ``heads`` (``perturbations.csv``'s rows) and ``resid`` (``resid.csv``'s), or, for a text
    with nothing to perturb, ``skipped`` (why).
    """

    text_id: int
    heads: list[pd.DataFrame]
    resid: list[pd.DataFrame]
    n_perturbations: int
    skipped: str | None = None


def _text_rows(
    runner: _Runner,
    sources: PerturbationSource,
    item: EncodedText,
    original: _Run,
    per_group: int,
) -> TextRows:
    """Every perturbation of ``item``, reduced against ``original``.

    They run ``per_group`` at a time beside the re-run of the unperturbed text.
    """
    model = runner.model
    causal = model.spec.family == "decoder"
    try:
        perturbations = sources.perturbations(item)
    except UserError as error:
        return TextRows(item.text_id, [], [], 0, str(error))
    if not perturbations:
        return TextRows(item.text_id, [], [], 0, "nothing to perturb")
    special = torch.tensor([i in model.special_ids for i in item.ids], device=original.resid.device)
    tables = _Tables(model)
    samples: dict[str, int] = {}
    unperturbed = identity(item.ids)
    for start in range(0, len(perturbations), per_group):
        group = perturbations[start : start + per_group]
        # the first group also reports the re-run itself (the identity rows)
        first = _setting(unperturbed, item.ids, special) if start == 0 else None
        settings = [first, *(_setting(p, item.ids, special) for p in group)]
        stream = _GroupStream(runner, original, settings, causal)
        resid = runner.streamed([unperturbed.ids, *(p.ids for p in group)], stream)
        for row, setting in enumerate(settings):
            if setting is None:
                continue
            p = setting.perturbation
            sample = samples.get(p.kind, 0)
            samples[p.kind] = sample + 1
            per_layer, n_positions = _resid_values(original, resid[row], setting)
            tables.add(item.text_id, p, sample, stream.per_head(row), per_layer, n_positions)
    return TextRows(item.text_id, tables.heads, tables.resid, tables.n_perturbations)


def iter_perturb_encoded(
    model: TracedModel,
    encoded: Sequence[EncodedText],
    plan: PerturbPlan,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> Iterator[TextRows]:
    """Yield each text's rows, in order (``text_id`` as encoded).

    Args:
        model: the model to perturb.
        encoded: texts as :func:`~residual_trace.tracer.prepare_texts` encodes them.
        plan: which perturbations (see :class:`PerturbPlan`).
        batch_size: originals per forward pass; each perturbed forward pass holds the
            re-run of the unperturbed text and up to ``batch_size - 1`` perturbations.
        progress: show a progress bar on stderr (one step per text).
    """
    sources = PerturbationSource.of(model, plan)
    runner = _Runner(model)
    per_group = max(1, batch_size - 1)
    with (
        torch.inference_mode(),
        progress_bar(
            total=len(encoded),
            desc=f"perturbing {model.name} ({plan.mode})",
            unit="text",
            enabled=progress,
        ) as bar,
    ):
        for batch in iter_batches(encoded, batch_size, model.pad_id):
            lengths = [len(item.ids) for item in batch.texts]
            # the originals' patterns are held for the batch (as by any forward pass that
            # returns attentions); every perturbed run is reduced block by block
            originals = runner.padded(batch.ids, batch.mask, lengths)
            for item, original in zip(batch.texts, originals, strict=True):
                yield _text_rows(runner, sources, item, original, per_group)
                bar.update(1)
