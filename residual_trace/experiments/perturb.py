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

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from residual_trace.errors import UserError
from residual_trace.experiments.alignment import (
    align_patterns,
    position_similarity,
    rerun_distance,
    resid_alignment,
)
from residual_trace.experiments.common import (
    RunOptions,
    inputs_record,
    load_inputs,
    model_record,
)
from residual_trace.experiments.perturb_summary import MOVING, head_table, layer_summary
from residual_trace.experiments.perturbations import (
    Perturbation,
    identity,
    pair_swaps,
    random_tokens,
    replacement_candidates,
    shuffle,
    shuffled_embeddings,
    swap_spans,
    word_span,
)
from residual_trace.figures.perturb import (
    AttentionExample,
    attention_pairs_figure,
    index_heatmap_figure,
    layers_figure,
    structure_figure,
)
from residual_trace.models import TracedModel
from residual_trace.runs import RunDir, TableStream, save_figures, write_run_json, write_table
from residual_trace.tracer import iter_batches, prepare_texts
from residual_trace.tracer.batching import EncodedText
from residual_trace.tracer.structure import STRUCTURE_COLUMNS, pattern_structure

__all__ = [
    "MODES",
    "PERTURBATION_COLUMNS",
    "RESID_COLUMNS",
    "PerturbConfig",
    "PerturbResult",
    "describe",
    "head_table",
    "run_perturb",
]

#: The ``--mode`` choices.
MODES = ("swap", "shuffle", "embed-shuffle", "random-token")

#: One row per model x text x perturbation x layer x head (``perturbations.csv``).
PERTURBATION_COLUMNS = (
    "model",
    "text_id",
    "perturbation",
    "sample",
    "label",
    "layer",
    "head",
    "sim_token",
    "sim_position",
    "index",
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
class PerturbConfig(RunOptions):
    """Everything ``trace perturb`` needs: the shared options plus its own.

    ``samples`` is the number of perturbations per text (pair swaps, shuffles, random-token
    draws) or, for ``embed-shuffle``, the number of embedding permutations.
    """

    mode: str = "swap"
    swap: tuple[str, str] | None = None
    samples: int = 10
    all_pairs: bool = False
    show_text: int = 0
    show_heads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.swap is not None:
            self.swap = (str(self.swap[0]), str(self.swap[1]))
            if self.mode != "swap":
                raise UserError(f"--swap goes with --mode swap, not --mode {self.mode}")
            if self.swap[0] == self.swap[1]:
                raise UserError("--swap needs two different words")
        if self.all_pairs and (self.mode != "swap" or self.swap is not None):
            raise UserError("--all-pairs goes with --mode swap and no --swap")
        if self.samples < 1:
            raise UserError(f"--samples must be at least 1, got {self.samples}")
        if self.show_text < 0:
            raise UserError("--show-text must be a text id >= 0")
        for spec in self.show_heads:
            _parse_head(spec)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["show_heads"] = list(self.show_heads)
        data["swap"] = None if self.swap is None else list(self.swap)
        return data


def _parse_head(spec: str) -> tuple[int, int]:
    """``"3.7"`` -> layer 3 (output of block 2), head 7."""
    try:
        layer, head = (int(part) for part in spec.split("."))
    except ValueError:
        raise UserError(
            f"--show-head {spec}: expected LAYER.HEAD, e.g. 3.7 (layer 1..L, head from 0)"
        ) from None
    if layer < 1 or head < 0:
        raise UserError(f"--show-head {spec}: layer counts from 1, head from 0")
    return layer, head


@dataclass
class PerturbResult:
    out: Path
    heads: pd.DataFrame
    summary: pd.DataFrame
    resid: pd.DataFrame
    n_texts: int
    n_perturbations: int
    model: TracedModel
    mode: str
    skipped: list[int] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@dataclass
class _Run:
    """One sequence's patterns ``[layer, head, n, n]`` and residual stream ``[layer, n, d]``."""

    patterns: torch.Tensor
    resid: torch.Tensor


class _Runner:
    """Forward passes keeping exactly the patterns and residual layers the job needs."""

    def __init__(self, model: TracedModel) -> None:
        self.model = model
        self.pattern_names = [model.spec.pattern_hook(b) for b in range(model.n_layers)]
        self.resid_names = [model.spec.resid_hook(k) for k in range(model.n_layers + 1)]

    def padded(self, ids: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]) -> list[_Run]:
        store = self.model.run_hooks(ids, mask, [*self.pattern_names, *self.resid_names])
        patterns = torch.stack([store[n] for n in self.pattern_names], dim=1)
        resid = torch.stack([store[n] for n in self.resid_names], dim=1)
        return [
            _Run(patterns[row, :, :, :n, :n], resid[row, :, :n]) for row, n in enumerate(lengths)
        ]

    def same_length(self, sequences: Sequence[Sequence[int]], batch_size: int) -> Iterator[_Run]:
        """Sequences of one length, ``batch_size`` per forward pass (no padding)."""
        for start in range(0, len(sequences), batch_size):
            ids = torch.tensor([list(s) for s in sequences[start : start + batch_size]])
            yield from self.padded(ids, torch.ones_like(ids), [ids.shape[1]] * len(ids))


def _sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _perturbations(
    model: TracedModel,
    config: PerturbConfig,
    item: EncodedText,
    special: list[bool],
    candidates: list[int] | None,
) -> list[Perturbation]:
    """The perturbations of one text (``[]`` when the text cannot be perturbed this way)."""
    ids = item.ids
    if config.mode == "swap" and config.swap is not None:
        first, second = (word_span(model, ids, word) for word in config.swap)
        label = f"swap {config.swap[0]}<->{config.swap[1]}"
        return [swap_spans(ids, first, second, label=label)]
    if config.mode == "swap":
        swaps = list(pair_swaps(ids, special))
        if config.all_pairs or len(swaps) <= config.samples:
            return swaps
        rng = np.random.default_rng(_sample_seed(config.seed, item.text_id))
        chosen = sorted(rng.choice(len(swaps), size=config.samples, replace=False))
        return [swaps[i] for i in chosen]
    out: list[Perturbation] = []
    seen: set[tuple[int, ...]] = set()
    for sample in range(config.samples):
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


def _compare(
    original: _Run,
    rerun: _Run,
    perturbed: _Run,
    p: Perturbation,
    original_ids: Sequence[int],
    special: torch.Tensor,
    causal: bool,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Reduce one perturbed run against the original: per-head values (flattened
    ``layer x head``), per-residual-layer cosines, and the positions those compared.

    ``noise`` is how far the head's measure (index, or pattern kept) moves when the re-run of
    the unperturbed text stands in for the original: run-to-run noise, in the measure's units.
    """
    layers, heads, n, _ = original.patterns.shape
    flat_original = original.patterns.reshape(layers * heads, n, n)
    flat_rerun = rerun.patterns.reshape(layers * heads, n, n)
    flat = perturbed.patterns.reshape(layers * heads, n, n)
    permutation = torch.tensor(p.permutation, device=flat.device)
    positions = torch.arange(n, device=flat.device)
    content = ~special
    nan = torch.full((layers * heads,), float("nan"), device=flat.device)
    if p.kind == "identity":
        similarity = 1.0 - rerun_distance(flat_original, flat)
        sim_token = sim_position = similarity
        index, noise = torch.zeros_like(similarity), nan
        rows = torch.full((layers * heads,), n)
        compared = content
    elif p.kind in MOVING:
        aligned = align_patterns(flat_original, flat, permutation, causal)
        again = align_patterns(flat_rerun, flat, permutation, causal)
        sim_token, sim_position, index, rows = (
            aligned.sim_token,
            aligned.sim_position,
            aligned.index,
            aligned.n_rows,
        )
        noise = (aligned.index - again.index).abs()
        compared = content & (permutation != positions)
    else:  # the tokens change in place: random-token, embed-shuffle
        # random tokens change where the id changed; shuffled embeddings change every token
        changed = torch.tensor(
            [p.kind == "embed-shuffle" or a != b for a, b in zip(p.ids, original_ids, strict=True)],
            device=flat.device,
        )
        compared = content & changed
        sim_position = position_similarity(flat_original, flat, compared)
        noise = (sim_position - position_similarity(flat_rerun, flat, compared)).abs()
        sim_token, index = nan, nan
        rows = torch.full((layers * heads,), int(compared.sum()))
    structure = pattern_structure(flat, special, content, causal)
    values = {
        "sim_token": sim_token,
        "sim_position": sim_position,
        "index": index,
        "n_rows": rows,
        "noise": noise,
        **structure,
    }
    resid = resid_alignment(original.resid, perturbed.resid, permutation, compared)
    per_head = {k: v.detach().cpu().numpy() for k, v in values.items()}
    per_layer = {
        "cos_token": resid.cos_token.cpu().numpy(),
        "cos_position": resid.cos_position.cpu().numpy(),
    }
    if p.kind not in MOVING and p.kind != "identity":
        per_layer["cos_token"] = np.full_like(per_layer["cos_token"], np.nan)
    return per_head, per_layer, resid.n_positions


class _Tables:
    """Streams the per-perturbation tables and keeps the few columns the summaries need."""

    def __init__(self, run: RunDir, model: TracedModel) -> None:
        self.model = model
        self.heads_stream = TableStream(run.tmp / "perturbations.csv")
        self.resid_stream = TableStream(run.tmp / "resid.csv")
        self.kept: list[pd.DataFrame] = []
        self.resid_kept: list[pd.DataFrame] = []
        layers, heads = model.n_layers, model.n_heads
        self.layer_of = np.repeat(np.arange(1, layers + 1), heads)
        self.head_of = np.tile(np.arange(heads), layers)
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
        size = len(self.layer_of)
        frame = pd.DataFrame(
            {
                "model": self.model.name,
                "text_id": text_id,
                "perturbation": p.kind,
                "sample": sample,
                "label": p.label,
                "layer": self.layer_of,
                "head": self.head_of,
                **{k: np.broadcast_to(v, (size,)) for k, v in per_head.items()},
            }
        )[list(PERTURBATION_COLUMNS)]
        self.heads_stream.write(frame)
        self.kept.append(frame.drop(columns=["model", "label"]))
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
        self.resid_stream.write(resid)
        self.resid_kept.append(resid)
        if p.kind != "identity":
            self.n_perturbations += 1

    def close(self) -> None:
        self.heads_stream.close()
        self.resid_stream.close()


def run_perturb(
    config: PerturbConfig,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    model: TracedModel | None = None,
) -> PerturbResult:
    """Run ``trace perturb``: tables, figures and run.json into ``config.out``."""
    texts, source = load_inputs(config.texts, config.file)
    if config.show_text >= len(texts):
        raise UserError(f"--show-text {config.show_text}: only {len(texts)} text(s) given")
    out = config.output_dir()
    with RunDir(out) as run:
        model = config.model_for(model, echo)
        shown_heads = [_parse_head(spec) for spec in config.show_heads]
        for layer, head in shown_heads:
            if layer > model.n_layers or head >= model.n_heads:
                raise UserError(
                    f"--show-head {layer}.{head}: {model.name} has layers 1..{model.n_layers} "
                    f"and heads 0..{model.n_heads - 1}"
                )
        encoded = prepare_texts(
            model, texts, config.max_length, warn=lambda m: echo(f"warning: {m}")
        )
        causal = model.spec.family == "decoder"
        candidates = replacement_candidates(model) if config.mode == "random-token" else None
        runner = _Runner(model)
        tables = _Tables(run, model)
        skipped: list[int] = []
        reasons: dict[int, str] = {}
        shown: AttentionExample | None = None

        def reduce(
            item: EncodedText, original: _Run, rerun: _Run, p: Perturbation, run_: _Run
        ) -> None:
            nonlocal shown
            special = torch.tensor(
                [i in model.special_ids for i in item.ids], device=original.patterns.device
            )
            sample = samples_seen.get((item.text_id, p.kind), 0)
            samples_seen[(item.text_id, p.kind)] = sample + 1
            per_head, per_layer, n_positions = _compare(
                original, rerun, run_, p, item.ids, special, causal
            )
            tables.add(item.text_id, p, sample, per_head, per_layer, n_positions)
            if shown is None and item.text_id == config.show_text and p.kind != "identity":
                shown = AttentionExample(
                    tokens=model.token_strings(item.ids),
                    perturbed_tokens=model.token_strings(p.ids),
                    permutation=p.permutation,
                    label=p.label,
                    original=original.patterns.cpu().numpy(),
                    perturbed=run_.patterns.cpu().numpy(),
                )

        samples_seen: dict[tuple[int, str], int] = {}
        with (
            torch.inference_mode(),
            tqdm(
                total=len(encoded),
                desc=f"perturbing {model.name} ({config.mode})",
                unit="text",
                disable=not config.progress,
                leave=False,
            ) as bar,
        ):
            for batch in iter_batches(encoded, config.batch_size, model.pad_id):
                lengths = [len(item.ids) for item in batch.texts]
                originals = runner.padded(batch.ids, batch.mask, lengths)
                reruns: list[_Run | None] = []
                for item, original in zip(batch.texts, originals, strict=True):
                    special = [i in model.special_ids for i in item.ids]
                    perturbations: list[Perturbation] = []
                    if config.mode != "embed-shuffle":
                        try:
                            perturbations = _perturbations(model, config, item, special, candidates)
                        except UserError as error:
                            if config.swap is not None and len(texts) == 1:
                                raise
                            reasons[item.text_id] = str(error)
                        if not perturbations:
                            skipped.append(item.text_id)
                            reasons.setdefault(item.text_id, "nothing to perturb")
                            continue
                    sequences = [identity(item.ids), *perturbations]
                    runs = runner.same_length([q.ids for q in sequences], config.batch_size)
                    rerun = None
                    for p, run_ in zip(sequences, runs, strict=True):
                        rerun = run_ if rerun is None else rerun  # the first: unperturbed
                        reduce(item, original, rerun, p, run_)
                    reruns.append(rerun)
                if config.mode == "embed-shuffle":
                    keep = sorted(model.special_ids)
                    for sample in range(config.samples):
                        seed = _sample_seed(config.seed, sample)
                        with shuffled_embeddings(model, seed, keep=keep):
                            shuffled = runner.padded(batch.ids, batch.mask, lengths)
                        for item, original, rerun, run_ in zip(
                            batch.texts, originals, reruns, shuffled, strict=True
                        ):
                            n = len(item.ids)
                            label = f"embedding shuffle seed {seed}"
                            p = Perturbation("embed-shuffle", item.ids, tuple(range(n)), label)
                            assert rerun is not None  # embed-shuffle skips no text
                            reduce(item, original, rerun, p, run_)
                bar.update(len(batch.texts))
        tables.close()
        if tables.n_perturbations == 0:
            why = "; ".join(f"text {k}: {v}" for k, v in list(reasons.items())[:3])
            raise UserError(f"no text could be perturbed with --mode {config.mode} ({why})")
        if skipped:
            shown_ids = ", ".join(map(str, skipped[:8])) + (" ..." if len(skipped) > 8 else "")
            first = reasons[skipped[0]]
            echo(
                f"warning: {len(skipped)} text(s) skipped, nothing to perturb "
                f"(text ids {shown_ids}; e.g. {first})"
            )
        per_perturbation = pd.concat(tables.kept, ignore_index=True)
        resid = pd.concat(tables.resid_kept, ignore_index=True)
        heads = head_table(per_perturbation, model.name, config.seed)
        summary = layer_summary(heads, per_perturbation, resid, config.seed)
        summary.insert(0, "model", model.name)
        files = [
            run.out / name for name in [*tables.heads_stream.files, *tables.resid_stream.files]
        ]
        for frame, name in ((heads, "heads.csv"), (summary, "summary.csv")):
            files += [run.out / p.name for p in write_table(frame, run.tmp / name)]
        kind = "embed-shuffle" if config.mode == "embed-shuffle" else config.mode
        figures = {
            "index_heatmap": index_heatmap_figure(heads, kind),
            "layers": layers_figure(summary, kind),
        }
        if config.mode in ("embed-shuffle", "random-token"):
            figures["structure"] = structure_figure(summary, kind)
        if shown is not None:
            chosen = shown_heads or _default_heads(heads, kind)
            figures["attention"] = attention_pairs_figure(
                shown, chosen, model.name, config.show_text
            )
        files += save_figures(figures, run.tmp, run.out, config.figure_format)
        write_run_json(
            run.tmp / "run.json",
            {
                "command": "perturb",
                "model": model_record(model),
                "device": str(model.device),
                "inputs": inputs_record(texts, source),
                "options": config.to_dict(),
                "seed": config.seed,
                "n_perturbations": tables.n_perturbations,
                "skipped_texts": skipped,
                "rows": tables.heads_stream.rows,
                "files": [p.name for p in files],
            },
        )
        files.append(run.out / "run.json")
    return PerturbResult(
        out=out,
        heads=heads,
        summary=summary,
        resid=resid,
        n_texts=len(texts) - len(skipped),
        n_perturbations=tables.n_perturbations,
        model=model,
        mode=config.mode,
        skipped=skipped,
        files=files,
    )


def _default_heads(heads: pd.DataFrame, kind: str) -> list[tuple[int, int]]:
    """The most token-following and most position-following head (or, without an index,
    the heads whose pattern survives best and worst)."""
    rows = heads[heads["perturbation"] == kind]
    column = "index" if kind in MOVING else "sim_position"
    rows = rows[np.isfinite(rows[column])]
    if rows.empty:
        return [(1, 0)]
    best = rows.loc[rows[column].idxmax()]
    worst = rows.loc[rows[column].idxmin()]
    picked = [(int(best["layer"]), int(best["head"])), (int(worst["layer"]), int(worst["head"]))]
    return list(dict.fromkeys(picked))


def _head_line(row: Any) -> str:
    interval = (
        f"[{row.index_lo:+.2f}, {row.index_hi:+.2f}]" if np.isfinite(row.index_lo) else "[n/a]"
    )
    return (
        f"  head {row.layer}.{row.head}: index {row.index:+.3f} {interval} {row.verdict}, "
        f"token sim {row.sim_token:.3f} vs position sim {row.sim_position:.3f}, "
        f"previous/next-token mass {row.prev_mass:.2f}/{row.next_mass:.2f}, n={row.n}"
    )


def describe(result: PerturbResult) -> str:
    """The per-layer summary and the heads worth a look, for the terminal."""
    model = result.model
    kind = result.mode
    summary = result.summary[result.summary["perturbation"] == kind]
    heads = result.heads[result.heads["perturbation"] == kind]
    noise = float(heads["noise_floor"].max())
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family} ({model.spec.norm_placement}-LN), "
        f"{model.n_layers} layers x {model.n_heads} heads; {result.n_texts} text(s), "
        f"{result.n_perturbations} perturbations ({kind})",
        f"noise floor (the measure's shift when a re-run of the unperturbed text stands in "
        f"for the original): max {noise:.1e}",
    ]
    if kind in MOVING:
        lines.append(
            f"{'layer':>5}  {'token-following index':>24}  {'token':>5}  {'position':>8}  "
            f"{'undecided':>9}  {'resid cos token / position':>26}"
        )
        for row in summary.itertuples(index=False):
            interval = (
                f"[{row.index_lo:+.3f},{row.index_hi:+.3f}]"
                if np.isfinite(row.index_lo)
                else f"{'[n/a]':<15}"
            )
            attention = (
                f"{row.index:>+7.3f} {interval}" if row.layer > 0 and np.isfinite(row.index) else ""
            )
            lines.append(
                f"{row.layer:>5}  {attention:>24}  {_count(row, 'token'):>5}  "
                f"{_count(row, 'position'):>8}  {_count(row, 'undecided'):>9}  "
                f"{row.cos_token:>12.3f} / {row.cos_position:.3f}"
            )
        ranked = heads[np.isfinite(heads["index"])].sort_values("index")
        lines.append("most token-following heads:")
        lines += [_head_line(r) for r in ranked.iloc[::-1].head(3).itertuples(index=False)]
        lines.append("most position-following heads:")
        lines += [_head_line(r) for r in ranked.head(3).itertuples(index=False)]
        clark = heads[(heads["prev_mass"] > 0.5) | (heads["next_mass"].fillna(0) > 0.5)]
        lines.append(
            f"heads with >50% previous- or next-token attention (Clark et al. 2019): {len(clark)}"
        )
        if not np.isfinite(heads["index_lo"]).any():
            lines.append(
                "no intervals and so no verdicts: a single observation per head (give more "
                "texts, or leave out --swap to draw several swaps per text)"
            )
        lines += [_head_line(r) for r in clark.itertuples(index=False)]
        lines.append(
            "index: is the original pattern closer (Jensen-Shannon distance) to the perturbed "
            "one read in token order (+1) or in position order (-1)? Per row, as a share of the "
            "distance between the two readings; verdicts need the 95% interval over texts clear "
            "of the noise floor."
        )
    else:
        lines.append(
            f"{'layer':>5}  {'pattern kept':>22}  {'entropy (bits)':>15}  "
            f"{'prev-token mass':>15}  {'special mass':>13}  {'resid cos':>9}"
        )
        for row in summary.itertuples(index=False):
            if row.layer == 0:
                lines.append(
                    f"{row.layer:>5}  {'':>22}  {'':>15}  {'':>15}  {'':>13}  "
                    f"{row.cos_position:>9.3f}"
                )
                continue
            lines.append(
                f"{row.layer:>5}  {row.sim_position:>6.3f} "
                f"[{row.sim_position_lo:.3f},{row.sim_position_hi:.3f}]  "
                f"{row.entropy:>6.2f} -> {row.entropy_perturbed:<5.2f}  "
                f"{row.prev_mass:>6.2f} -> {row.prev_mass_perturbed:<5.2f}  "
                f"{row.special_mass:>5.2f} -> {row.special_mass_perturbed:<5.2f}  "
                f"{row.cos_position:>9.3f}"
            )
        lines.append(
            "pattern kept: similarity (1 - JS distance) of each head's pattern with the "
            f"{'tokens replaced' if kind == 'random-token' else 'token embeddings shuffled'} "
            "to the original at the same positions; structure measures original -> "
            "perturbed. Patterns that keep their look without token identity are about "
            "positions, not tokens."
        )
    lines.append(f"wrote {result.out}/: " + ", ".join(p.name for p in result.files))
    return "\n".join(lines)


def _count(row: Any, verdict: str) -> str:
    return "" if row.layer == 0 else str(getattr(row, f"n_{verdict}"))
