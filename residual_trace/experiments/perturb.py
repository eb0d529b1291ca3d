"""The ``trace perturb`` job: does attention (and the residual stream) follow tokens or positions?

For every text, the original is run once in a padded batch; then the unperturbed text is run
again (the *re-run*, in a different batch: the noise floor) together with its perturbations.
Each perturbed run is reduced at once against the original (nothing larger than one text's
patterns is kept):

- per layer and head, the token- and position-aligned similarity of the patterns and the
  token-following index (:mod:`residual_trace.experiments.alignment`), or, when the tokens
  change but do not move (``random-token``, ``embed-shuffle``), the similarity at the same
  positions (how much of the pattern survives without its tokens);
- per head, the structure measures of the perturbed pattern
  (:mod:`residual_trace.tracer.structure`);
- per residual layer, the cosine of the perturbed states to the original ones, aligned by
  token and by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from residual_trace._typing import Tensor
from residual_trace.errors import UserError
from residual_trace.experiments.contract import Experiment, open_run
from residual_trace.experiments.engine import ShardPart, run_shards
from residual_trace.experiments.options import (
    MODES,
    ModelArg,
    PerturbOptions,
    Texts,
    Warn,
    python_warning,
)
from residual_trace.experiments.result import Result
from residual_trace.figures.perturb import (
    AttentionExample,
    attention_pairs_figure,
    index_heatmap_figure,
    layers_figure,
    structure_figure,
)
from residual_trace.models import TracedModel
from residual_trace.models.traced import BlockStream
from residual_trace.naming import head_name, parse_head_name
from residual_trace.stats import format_interval
from residual_trace.tracer import iter_batches
from residual_trace.tracer.alignment import (
    align_patterns,
    position_similarity,
    rerun_distance,
    resid_alignment,
)
from residual_trace.tracer.alignment_summary import (
    MOVING,
    block_summary,
    head_table,
    resid_summary,
)
from residual_trace.tracer.batching import EncodedText
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
    "EXPERIMENT",
    "MODES",
    "PERTURBATION_COLUMNS",
    "RESID_COLUMNS",
    "PerturbOptions",
    "PerturbResult",
    "merge_extras",
    "run_perturb",
    "shard_rows",
]

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


@dataclass(repr=False)
class PerturbResult(Result):
    """Tables perturbations, resid, heads, summary (per block), resid_summary (per layer);
    figures index_heatmap, layers, structure (for modes that do not move tokens) and
    attention (text ``show_text``)."""

    command = "perturb"
    n_perturbations: int = 0
    skipped: list[int] = field(default_factory=list)
    example: AttentionExample | None = None
    shown_heads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        options = self.options
        assert isinstance(options, PerturbOptions)
        return options.mode

    def figures(self) -> dict[str, Figure]:
        kind, heads, summary = self.mode, self.tables["heads"], self.tables["summary"]
        figures = {
            "index_heatmap": index_heatmap_figure(heads, kind),
            "layers": layers_figure(summary, self.tables["resid_summary"], kind),
        }
        if kind in ("embed-shuffle", "random-token"):
            figures["structure"] = structure_figure(summary, kind)
        if self.example is not None:
            options = self.options
            assert isinstance(options, PerturbOptions)
            chosen = list(self.example.original)  # the heads run for the example
            figures["attention"] = attention_pairs_figure(
                self.example, chosen, self.model.name, options.show_text
            )
        return figures

    def headline(self) -> str:
        heads = self.tables["heads"]
        heads = heads[heads["perturbation"] == self.mode]
        counts = heads["verdict"].value_counts()
        verdicts = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("token", "position", "undecided"))
        return f"{self.n_perturbations} perturbations ({self.mode}); heads: {verdicts}"

    def describe(self) -> str:
        return describe(self)


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
        """The originals of a padded batch: every block's patterns, like any forward pass
        that returns its attentions."""
        store = self.model.run_hooks(ids, mask, [*self.pattern_names, *self.resid_names])
        layers = [store[name] for name in self.pattern_names]
        resid = torch.stack([store[n] for n in self.resid_names], dim=1)
        return [
            _Run([layer[row, :, :n, :n] for layer in layers], resid[row, :, :n])
            for row, n in enumerate(lengths)
        ]

    def streamed(self, sequences: Sequence[Sequence[int]], stream: BlockStream) -> torch.Tensor:
        """Sequences of one length in one forward pass (no padding), their patterns handed
        to ``stream`` block by block and dropped; returns the residual stream
        ``[sequence, layer, n, d]``."""
        ids = torch.tensor([list(s) for s in sequences])
        store = self.model.run_hooks(ids, torch.ones_like(ids), self.resid_names, stream=stream)
        return torch.stack([store[n] for n in self.resid_names], dim=1)


def _sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _perturbations(
    model: TracedModel,
    config: PerturbOptions,
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
    """Which positions ``p`` compares: the moved ones for swaps and shuffles, the changed
    ones for random tokens, every content token for embed-shuffle and the identity."""
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
    """Per-head values of one block (``[head, n, n]`` patterns of the original, the re-run
    of the unperturbed text and the perturbed text).

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
    """A :class:`BlockStream` over one same-length group ``[unperturbed, perturbed...]`` of
    one text: each block's patterns are compared with the original's as soon as the block
    has run, then dropped. Row 0 (the re-run of the unperturbed text) is every row's noise
    reference; a row whose setting is ``None`` is not reported (the re-run of a later
    group)."""

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
    """Per-residual-layer cosines of the perturbed states to the original's, and the number
    of positions they compare."""
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
class _Sources:
    """What a text's perturbations are drawn from: the mode's options, the replacement
    vocabulary (random-token) and the embedding permutations (embed-shuffle)."""

    model: TracedModel
    config: PerturbOptions
    candidates: list[int] | None
    orders: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def of(cls, model: TracedModel, config: PerturbOptions) -> _Sources:
        candidates = replacement_candidates(model) if config.mode == "random-token" else None
        orders = []
        if config.mode == "embed-shuffle":
            rows, keep = embedding_rows(model), sorted(model.special_ids)
            for sample in range(config.n_samples):
                seed = _sample_seed(config.seed, sample)  # one permutation per sample
                orders.append((seed, embedding_order(rows, seed, keep)))
        return cls(model, config, candidates, tuple(orders))

    def perturbations(self, item: EncodedText) -> list[Perturbation]:
        """The perturbations of one text (``[]``, or a :class:`UserError` saying why, when
        it has none)."""
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


def _attention_example(
    model: TracedModel,
    config: PerturbOptions,
    item: EncodedText,
    heads: Sequence[tuple[int, int]],
) -> AttentionExample | None:
    """Text ``item`` and its first perturbation, run again together, keeping only the
    drawn heads' patterns (memory n^2 per head at any length), or ``None`` when the text has
    no perturbation."""
    try:
        perturbations = _Sources.of(model, config).perturbations(item)
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


@dataclass
class _ShardFacts:
    """Perturb's per-shard facts beside its tables."""

    n_perturbations: int = 0
    skipped: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)


def shard_rows(
    traced: TracedModel, encoded: Sequence[EncodedText], config: PerturbOptions
) -> ShardPart:
    """The per-perturbation rows of some texts (tables ``perturbations`` and ``resid``),
    and the texts skipped and why."""
    causal = traced.spec.family == "decoder"
    sources = _Sources.of(traced, config)
    runner = _Runner(traced)
    tables = _Tables(traced)
    skipped: list[int] = []
    reasons: dict[int, str] = {}
    # perturbed sequences per forward pass, beside the re-run of the unperturbed text
    per_group = max(1, config.batch_size - 1)

    def perturbations_of(item: EncodedText) -> list[Perturbation]:
        try:
            return sources.perturbations(item)
        except UserError as error:
            reasons[item.text_id] = str(error)
            return []

    def run_text(item: EncodedText, original: _Run) -> None:
        special = torch.tensor(
            [i in traced.special_ids for i in item.ids], device=original.resid.device
        )
        samples: dict[str, int] = {}
        perturbations = perturbations_of(item)
        if not perturbations:
            skipped.append(item.text_id)
            reasons.setdefault(item.text_id, "nothing to perturb")
            return
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

    with (
        torch.inference_mode(),
        tqdm(
            total=len(encoded),
            desc=f"perturbing {traced.name} ({config.mode})",
            unit="text",
            disable=not config.progress,
            leave=False,
        ) as bar,
    ):
        for batch in iter_batches(encoded, config.batch_size, traced.pad_id):
            lengths = [len(item.ids) for item in batch.texts]
            # the originals' patterns are held for the batch (as by any forward pass that
            # returns attentions); every perturbed run is reduced block by block
            for item, original in zip(
                batch.texts, runner.padded(batch.ids, batch.mask, lengths), strict=True
            ):
                run_text(item, original)
                bar.update(1)
    facts = _ShardFacts(tables.n_perturbations, skipped, reasons)
    out: dict[str, pd.DataFrame] = {}
    if tables.heads:
        out["perturbations"] = pd.concat(tables.heads, ignore_index=True)
        out["resid"] = pd.concat(tables.resid, ignore_index=True)
    return ShardPart(out, facts)


def merge_extras(extras: list[_ShardFacts]) -> _ShardFacts:
    """The shards' facts, in text order."""
    merged = _ShardFacts()
    for facts in extras:
        merged.n_perturbations += facts.n_perturbations
        merged.skipped += facts.skipped
        merged.reasons.update(facts.reasons)
    return merged


#: ``trace perturb`` as the engines run it.
EXPERIMENT = Experiment("perturb", shard_rows, merge_extras)


def run_perturb(
    model: ModelArg,
    texts: Texts = None,
    options: PerturbOptions | None = None,
    warn: Warn = python_warning,
) -> PerturbResult:
    """Does attention (and the residual stream) follow tokens or positions?

    For each text and perturbation, compares every head's pattern with the original's
    aligned by token (moved with the tokens) and by position, giving a token-following
    index in [-1, 1] with a 95% interval over texts and a noise floor from re-running the
    unperturbed text; does the same for the residual stream.

    Args:
        model: a loaded model, or a name for :func:`residual_trace.load_model`.
        texts: a list of texts, one text, a file (``Path``), or ``None`` (bundled sentences).
        options: :class:`PerturbOptions` (defaults when ``None``).
        warn: receives one-line warnings (skipped texts, truncation).
    """
    config = options or PerturbOptions()
    shown_heads: list[tuple[int, int]] = []

    def check_model(traced: TracedModel) -> None:
        try:
            shown_heads.extend(
                parse_head_name(spec, traced.n_blocks, traced.n_heads) for spec in config.show_heads
            )
        except UserError as error:
            raise config.fail("show_heads", str(error)) from None

    texts_list, source, traced, encoded, notes, echo = open_run(
        model, texts, config, warn, check_model
    )
    rows = run_shards(EXPERIMENT, traced, encoded, config)
    extra: _ShardFacts = rows.extra
    skipped, reasons = extra.skipped, extra.reasons
    if config.swap is not None and len(texts_list) == 1 and skipped:
        raise UserError(reasons[skipped[0]])
    if extra.n_perturbations == 0:
        why = "; ".join(f"text {k}: {v}" for k, v in list(reasons.items())[:3])
        raise UserError(f"no text could be perturbed with mode {config.mode} ({why})")
    if skipped:
        shown_ids = ", ".join(map(str, skipped[:8])) + (" ..." if len(skipped) > 8 else "")
        first = reasons[skipped[0]]
        echo(
            f"warning: {len(skipped)} text(s) skipped, nothing to perturb "
            f"(text ids {shown_ids}; e.g. {first})"
        )
    per_perturbation, resid = rows.tables["perturbations"], rows.tables["resid"]
    heads = head_table(per_perturbation, traced.name, config.seed)
    shown_heads = shown_heads or _default_heads(heads, config.mode)
    example = _attention_example(traced, config, encoded[config.show_text], shown_heads)
    summary = block_summary(heads, per_perturbation, config.seed)
    summary.insert(0, "model", traced.name)
    states = resid_summary(resid, config.seed)
    states.insert(0, "model", traced.name)
    return PerturbResult(
        model=traced,
        options=config,
        tables={
            "perturbations": per_perturbation,
            "resid": resid,
            "heads": heads,
            "summary": summary,
            "resid_summary": states,
        },
        texts=texts_list,
        source=source,
        notes=notes,
        record={
            "n_perturbations": extra.n_perturbations,
            "skipped_texts": skipped,
            "engine": rows.engine,
        },
        n_perturbations=extra.n_perturbations,
        skipped=skipped,
        example=example,
        shown_heads=shown_heads,
    )


def _default_heads(heads: pd.DataFrame, kind: str) -> list[tuple[int, int]]:
    """The most token-following and most position-following head (or, without an index,
    the heads whose pattern survives best and worst), as ``(block, head)``."""
    rows = heads[heads["perturbation"] == kind]
    column = "follow_index" if kind in MOVING else "sim_position"
    rows = rows[np.isfinite(rows[column])]
    if rows.empty:
        return [(0, 0)]
    best = rows.loc[rows[column].idxmax()]
    worst = rows.loc[rows[column].idxmin()]
    picked = [(int(best["block"]), int(best["head"])), (int(worst["block"]), int(worst["head"]))]
    return list(dict.fromkeys(picked))


def _interval(low: float, high: float, digits: int = 2) -> str:
    return format_interval(low, high, f"+.{digits}f")


def _head_line(row: Any) -> str:
    return (
        f"  {row.head_name}: index {row.follow_index:+.3f} "
        f"{_interval(row.follow_index_lo, row.follow_index_hi)} {row.verdict}, "
        f"token sim {row.sim_token:.3f} vs position sim {row.sim_position:.3f}, "
        f"previous/next-token mass {row.prev_mass:.2f}/{row.next_mass:.2f}, n_obs={row.n_obs}"
    )


def describe(result: PerturbResult) -> str:
    """The per-block summary and the heads worth a look, for the terminal."""
    model, kind = result.model, result.mode
    summary = result.tables["summary"]
    summary = summary[summary["perturbation"] == kind]
    states = result.tables["resid_summary"]
    states = states[states["perturbation"] == kind]
    heads = result.tables["heads"]
    heads = heads[heads["perturbation"] == kind]
    noise = float(heads["noise_floor"].max())
    n_texts = len(result.texts) - len(result.skipped)
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family} ({model.spec.norm_placement}-norm), "
        f"{model.n_blocks} blocks x {model.n_heads} heads; {n_texts} text(s), "
        f"{result.n_perturbations} perturbations ({kind})",
        "noise floor (the measure's shift when a re-run of the unperturbed text stands in "
        "for the original): "
        + (f"max {noise:.1e}" if np.isfinite(noise) else "n/a (no head had evidence)"),
    ]
    if kind in MOVING:
        lines.append(
            f"{'block':>5}  {'token-following index':>24}  {'token':>5}  {'position':>8}  "
            f"{'undecided':>9}"
        )
        for row in summary.itertuples(index=False):
            lines.append(
                f"{row.block:>5}  {row.follow_index:>+7.3f} "
                f"{_interval(row.follow_index_lo, row.follow_index_hi, 3):<16}  "
                f"{row.n_heads_token:>5}  {row.n_heads_position:>8}  {row.n_heads_undecided:>9}"
            )
        lines.append(
            "residual stream, cosine to the original state at the same token / position, "
            "per layer: "
            + ", ".join(
                f"{r.layer}: {r.cos_token:.3f}/{r.cos_position:.3f}"
                for r in states.itertuples(index=False)
            )
        )
        ranked = heads[np.isfinite(heads["follow_index"])].sort_values("follow_index")
        lines.append("most token-following heads:")
        lines += [_head_line(r) for r in ranked.iloc[::-1].head(3).itertuples(index=False)]
        lines.append("most position-following heads:")
        lines += [_head_line(r) for r in ranked.head(3).itertuples(index=False)]
        clark = heads[(heads["prev_mass"] > 0.5) | (heads["next_mass"].fillna(0) > 0.5)]
        lines.append(
            f"heads with >50% previous- or next-token attention (Clark et al. 2019): {len(clark)}"
        )
        if not np.isfinite(heads["follow_index_lo"]).any():
            lines.append(
                "no intervals and so no verdicts: a single observation per head (give more "
                "texts, or leave out --swap to draw several swaps per text)"
            )
        lines += [_head_line(r) for r in clark.itertuples(index=False)]
        lines.append(
            "index: is the original pattern closer (Jensen-Shannon distance) to the perturbed "
            "one read in token order (+1) or in position order (-1)? Per row, as a share of the "
            "distance between the two readings; verdicts need the 95% interval over texts clear "
            "of the noise floor. Heads are named L<block>H<head>."
        )
    else:
        lines.append(
            f"{'block':>5}  {'pattern kept':>22}  {'entropy (bits)':>15}  "
            f"{'prev-token mass':>15}  {'special mass':>13}"
        )
        for row in summary.itertuples(index=False):
            kept = _interval(row.sim_position_lo, row.sim_position_hi, 3)
            lines.append(
                f"{row.block:>5}  {row.sim_position:>6.3f} {kept:<15}  "
                f"{row.entropy:>6.2f} -> {row.entropy_perturbed:<5.2f}  "
                f"{row.prev_mass:>6.2f} -> {row.prev_mass_perturbed:<5.2f}  "
                f"{row.special_mass:>5.2f} -> {row.special_mass_perturbed:<5.2f}"
            )
        lines.append(
            "residual stream, cosine to the original state at the same position, per layer: "
            + ", ".join(f"{r.layer}: {r.cos_position:.3f}" for r in states.itertuples(index=False))
        )
        lines.append(
            "pattern kept: similarity (1 - JS distance) of each head's pattern with the "
            f"{'tokens replaced' if kind == 'random-token' else 'token embeddings shuffled'} "
            "to the original at the same positions; structure measures original -> "
            "perturbed. Patterns that keep their look without token identity are about "
            "positions, not tokens."
        )
    return "\n".join(lines)
