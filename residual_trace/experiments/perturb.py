"""``perturb``: does attention (and the residual stream) follow tokens or positions?

``residual_trace.perturb(model, texts)`` returns a :class:`PerturbResult` (tables
``perturbations``, ``resid``, ``heads``, ``summary``, ``resid_summary``). The measures are
:mod:`residual_trace.tracer.perturb`'s (and the per-head and per-block summaries
:mod:`residual_trace.tracer.alignment_summary`'s); this module is glue, and imports nothing
heavy until a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from residual_trace.defaults import PERTURB_MODES, PerturbMode
from residual_trace.errors import UserError
from residual_trace.experiments.contract import Experiment, ShardPart, on_texts, open_run
from residual_trace.experiments.options import (
    CorpusOptions,
    ModelArg,
    Texts,
    Warn,
    check_text_id,
    python_warning,
    texts_argument,
)
from residual_trace.experiments.result import Result
from residual_trace.naming import parse_head_name
from residual_trace.options import no_type_check, option

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.figures.perturb import AttentionExample
    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = [
    "EXPERIMENT",
    "MAX_SAMPLES",
    "MODES",
    "Mode",
    "PerturbOptions",
    "PerturbResult",
    "merge_extras",
    "run_perturb",
    "shard_rows",
]

#: Most perturbations per text (each is a forward pass): beyond, a typo (an extra digit or
#: two) would run for days.
MAX_SAMPLES = 100_000

#: The ``mode`` choices (declared in :mod:`residual_trace.defaults`, which the figures and
#: the summaries read too).
Mode = PerturbMode
MODES = PERTURB_MODES


@no_type_check
@dataclass(kw_only=True)
class PerturbOptions(CorpusOptions):
    """Options of ``perturb`` (and ``trace perturb``).

    ``samples`` is the number of perturbations per text (pair swaps, shuffles, random-token
    draws) or, for ``embed-shuffle``, the number of embedding permutations.
    """

    mode: Mode = option(
        "swap",
        "swap: exchange two tokens (swap=) or sampled pairs; shuffle: permute the non-special "
        "tokens; embed-shuffle: permute the embedding rows (tokens meaningless, positions "
        "intact); random-token: replace tokens by random ones (control).",
    )
    swap: tuple[str, str] | None = option(
        None,
        "Exchange these two words (their subword spans, lengths may differ).",
        metavar="WORD1 WORD2",
    )
    samples: int | None = option(
        None,
        "Perturbations per text (pair swaps, shuffles, random-token draws), or the number of "
        "embedding shuffles (default 10; not with swap words or all_pairs).",
    )
    all_pairs: bool = option(False, "mode swap: every pair of non-special tokens.")
    show_text: int = option(0, "text_id drawn in the side-by-side attention figure.")
    show_heads: tuple[str, ...] = option(
        (),
        "Head drawn in the attention figure, named L<block>H<head> (TransformerLens naming, "
        "from 0), e.g. L0H2; repeatable. Default: the most token- and most "
        "position-following head.",
        flag="--show-head",
        metavar="LxHy",
    )

    def validate(self) -> None:
        """Check that the swap words, ``all_pairs``, ``samples`` and the heads fit the mode."""
        super().validate()
        if self.swap is not None:
            if self.mode != "swap":
                raise self.fail("swap", f"goes with mode swap, not mode {self.mode}")
            if self.swap[0] == self.swap[1]:
                raise self.fail("swap", "needs two different words")
        if self.all_pairs and (self.mode != "swap" or self.swap is not None):
            raise self.fail("all_pairs", "goes with mode swap and no swap words")
        if self.samples is not None:
            if not 1 <= self.samples <= MAX_SAMPLES:
                raise self.fail(
                    "samples", f"must be between 1 and {MAX_SAMPLES:,}, got {self.samples}"
                )
            if self.swap is not None or self.all_pairs:
                what = "swap words (one swap per text)" if self.swap else "all_pairs"
                raise self.fail("samples", f"is not used with {what}: leave it out")
        if self.show_text < 0:
            raise self.fail("show_text", f"must be a text id >= 0, got {self.show_text}")
        for spec in self.show_heads:
            try:
                parse_head_name(spec)
            except UserError as error:
                raise self.fail("show_heads", str(error)) from None

    @property
    def n_samples(self) -> int:
        """``samples``, or its default of 10."""
        return 10 if self.samples is None else self.samples

    def check_texts(self, texts: list[str]) -> None:
        """Refuse a ``show_text`` that names no text (before any model loads)."""
        check_text_id("show_text", self.show_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> PerturbResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.perturb`."""
        return run_perturb(model, texts_argument(texts), self, warn)


@dataclass(repr=False)
class PerturbResult(Result):
    """The tables and figures of ``trace perturb``.

    Tables perturbations, resid, heads, summary (per block), resid_summary (per layer); figures
    index_heatmap, layers, structure (for modes that do not move tokens) and attention (text
    ``show_text``).
    """

    command = "perturb"
    n_perturbations: int = 0
    skipped: list[int] = field(default_factory=list)
    example: AttentionExample | None = None
    shown_heads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """The perturbation mode of the run (``swap``, ``shuffle``, ...)."""
        options = self.options
        assert isinstance(options, PerturbOptions)
        return options.mode

    def figures(self) -> dict[str, Figure]:
        """index_heatmap, layers, structure (modes that do not move tokens) and attention."""
        from residual_trace.figures.perturb import (
            attention_pairs_figure,
            index_heatmap_figure,
            layers_figure,
            structure_figure,
        )

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
            chosen = [key for key in self.shown_heads if key in self.example.original]
            figures["attention"] = attention_pairs_figure(
                self.example, chosen, self.model.name, options.show_text
            )
        return figures

    def viewer_sections(self) -> list[str]:
        """The grid of indices and each kept head's patterns on ``show_text``."""
        from residual_trace.viewer import perturb_view

        if self.example is None:
            return []
        return [perturb_view(self.tables["heads"], self.example, self.mode)]

    def headline(self) -> str:
        """The number of perturbations and the heads' verdicts, on one line."""
        heads = self.tables["heads"]
        heads = heads[heads["perturbation"] == self.mode]
        counts = heads["verdict"].value_counts()
        verdicts = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("token", "position", "undecided"))
        return f"{self.n_perturbations} perturbations ({self.mode}); heads: {verdicts}"

    def describe(self) -> str:
        """The per-block summary and the heads worth a look, as ``trace perturb`` prints them."""
        return describe(self)


@dataclass
class _ShardFacts:
    """Perturb's per-shard facts beside its tables."""

    n_perturbations: int = 0
    skipped: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)


def shard_rows(
    traced: TracedModel, encoded: Sequence[EncodedText], config: PerturbOptions
) -> ShardPart:
    """The per-perturbation rows of some texts, and the texts skipped and why.

    The rows are those of tables ``perturbations`` and ``resid``.
    """
    import pandas as pd

    from residual_trace.tracer.perturb import iter_perturb_encoded

    heads: list[pd.DataFrame] = []
    resid: list[pd.DataFrame] = []
    facts = _ShardFacts()
    rows = iter_perturb_encoded(
        traced, encoded, config, batch_size=config.batch_size, progress=config.progress
    )
    for text in rows:
        if text.skipped is not None:
            facts.skipped.append(text.text_id)
            facts.reasons[text.text_id] = text.skipped
        heads += text.heads
        resid += text.resid
        facts.n_perturbations += text.n_perturbations
    out: dict[str, pd.DataFrame] = {}
    if heads:
        out["perturbations"] = pd.concat(heads, ignore_index=True)
        out["resid"] = pd.concat(resid, ignore_index=True)
    return ShardPart(out, facts)


def merge_extras(extras: list[_ShardFacts]) -> _ShardFacts:
    """The shards' facts, in text order."""
    merged = _ShardFacts()
    for facts in extras:
        merged.n_perturbations += facts.n_perturbations
        merged.skipped += facts.skipped
        merged.reasons.update(facts.reasons)
    return merged


def _refuse_or_note_skipped(
    config: PerturbOptions, n_texts: int, extra: _ShardFacts, note: Warn
) -> None:
    """Texts with nothing to perturb: one error, or one warning naming them.

    An error when no text could be perturbed (or the one text of ``swap`` words could not), else a
    warning naming the texts.
    """
    skipped, reasons = extra.skipped, extra.reasons
    if config.swap is not None and n_texts == 1 and skipped:
        raise UserError(reasons[skipped[0]])
    if extra.n_perturbations == 0:
        why = "; ".join(f"text {k}: {v}" for k, v in list(reasons.items())[:3])
        raise UserError(f"no text could be perturbed with mode {config.mode} ({why})")
    if skipped:
        shown_ids = ", ".join(map(str, skipped[:8])) + (" ..." if len(skipped) > 8 else "")
        first = reasons[skipped[0]]
        note(
            f"warning: {len(skipped)} text(s) skipped, nothing to perturb "
            f"(text ids {shown_ids}; e.g. {first})"
        )


def _tables(
    model_name: str, per_perturbation: pd.DataFrame, resid: pd.DataFrame, config: PerturbOptions
) -> dict[str, pd.DataFrame]:
    """The rows and their summaries: per head, per block and per residual layer."""
    from residual_trace.tracer.alignment_summary import block_summary, head_table, resid_summary

    heads = head_table(per_perturbation, model_name, config.seed)
    summary = block_summary(heads, per_perturbation, config.seed)
    summary.insert(0, "model", model_name)
    states = resid_summary(resid, config.seed)
    states.insert(0, "model", model_name)
    return {
        "perturbations": per_perturbation,
        "resid": resid,
        "heads": heads,
        "summary": summary,
        "resid_summary": states,
    }


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
    from residual_trace.experiments.engine import run_shards

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
    _refuse_or_note_skipped(config, len(texts_list), extra, echo)
    tables = _tables(traced.name, rows.tables["perturbations"], rows.tables["resid"], config)
    shown_heads = shown_heads or _default_heads(tables["heads"], config.mode)
    example = _example(traced, config, encoded[config.show_text], tables, shown_heads)
    return PerturbResult(
        model=traced,
        options=config,
        tables=tables,
        texts=texts_list,
        source=source,
        notes=notes,
        record={
            "n_perturbations": extra.n_perturbations,
            "skipped_texts": extra.skipped,
            "engine": rows.engine,
        },
        n_perturbations=extra.n_perturbations,
        skipped=extra.skipped,
        example=example,
        shown_heads=shown_heads,
    )


def _example(
    traced: TracedModel,
    config: PerturbOptions,
    item: EncodedText,
    tables: dict[str, pd.DataFrame],
    shown: list[tuple[int, int]],
) -> AttentionExample | None:
    """``item``'s patterns (the figure's heads, and the viewer's within bounds)."""
    from residual_trace.tracer.perturb import attention_example

    heads = _viewer_heads(tables["heads"], config.mode, shown, len(item.ids))
    return attention_example(traced, config, item, heads)


#: The viewer keeps the drawn text's patterns of at most this many values (heads x 2 x n^2).
VIEWER_PATTERN_VALUES = 8_000_000


def _viewer_heads(
    heads: pd.DataFrame, kind: str, shown: list[tuple[int, int]], n_tokens: int
) -> list[tuple[int, int]]:
    """The heads whose patterns the run keeps: the drawn ones, then by |index|, within bounds."""
    rows = heads[heads["perturbation"] == kind]
    order = rows.assign(size=rows["follow_index"].abs().fillna(-1.0)).sort_values(
        ["size", "block", "head"], ascending=[False, True, True], kind="stable"
    )
    most = max(len(shown), VIEWER_PATTERN_VALUES // max(1, 2 * n_tokens * n_tokens))
    kept = list(shown)
    for block, head in zip(order["block"], order["head"], strict=True):
        key = (int(block), int(head))
        if len(kept) >= most:
            break
        if key not in kept:
            kept.append(key)
    return kept


def _default_heads(heads: pd.DataFrame, kind: str) -> list[tuple[int, int]]:
    """The most token-following and most position-following head, as ``(block, head)``.

    Without an index, the heads whose pattern survives best and worst.
    """
    import numpy as np

    from residual_trace.tracer.alignment_summary import MOVING

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
    from residual_trace.stats import format_interval

    return format_interval(low, high, f"+.{digits}f")


def _mass(value: float) -> str:
    """An attention mass, or ``n/a`` (the next token of a causal model)."""
    return "n/a" if value != value else f"{value:.2f}"


def _head_line(row: Any) -> str:
    return (
        f"  {row.head_name}: index {row.follow_index:+.3f} "
        f"{_interval(row.follow_index_lo, row.follow_index_hi)} {row.verdict}, "
        f"token sim {row.sim_token:.3f} vs position sim {row.sim_position:.3f}, "
        f"previous/next-token mass {_mass(row.prev_mass)}/{_mass(row.next_mass)}, "
        f"n_obs={row.n_obs}"
    )


def describe(result: PerturbResult) -> str:
    """The per-block summary and the heads worth a look, for the terminal."""
    import numpy as np

    from residual_trace.tracer.alignment_summary import MOVING

    model, kind = result.model, result.mode

    def of_mode(table: pd.DataFrame) -> pd.DataFrame:
        return table[table["perturbation"] == kind]

    summary, states = of_mode(result.tables["summary"]), of_mode(result.tables["resid_summary"])
    heads = of_mode(result.tables["heads"])
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
        lines += _moving_lines(summary, states, heads)
    else:
        lines += _in_place_lines(summary, states, kind)
    return "\n".join(lines)


def _moving_lines(summary: pd.DataFrame, states: pd.DataFrame, heads: pd.DataFrame) -> list[str]:
    """``describe``'s lines for the modes that move tokens (swap, shuffle)."""
    import numpy as np

    lines = [
        f"{'block':>5}  {'token-following index':>24}  {'token':>5}  {'position':>8}  "
        f"{'undecided':>9}"
    ]
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
    return lines


def _in_place_lines(summary: pd.DataFrame, states: pd.DataFrame, kind: str) -> list[str]:
    """``describe``'s lines for the modes that change tokens in place.

    Those modes are random-token and embed-shuffle.
    """
    lines = [
        f"{'block':>5}  {'pattern kept':>22}  {'entropy (bits)':>15}  "
        f"{'prev-token mass':>15}  {'special mass':>13}"
    ]
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
    return lines


EXPERIMENT = Experiment(
    name="perturb",
    options=PerturbOptions,
    run=run_perturb,
    result=PerturbResult,
    help="""Does attention follow tokens or positions? Perturb the input and compare.

    For each text and perturbation, compares every head's pattern with the original's
    aligned by token (moved with the tokens) and by position, giving a token-following
    index in [-1, 1] with a 95% interval over texts and a noise floor from re-running the
    unperturbed text; does the same for the residual stream. Writes perturbations.csv (one
    row per perturbation x block x head), heads.csv, summary.csv (per block), resid.csv,
    resid_summary.csv (per layer), run.json and figures.
    """,
    epilog="""\b
Examples:
  trace perturb --model minilm --text "The dog chased the cat." --swap dog cat --out runs/swap
  trace perturb --model minilm --mode shuffle --samples 20 --seed 0     # bundled sentences
  trace perturb --model smollm2 --mode embed-shuffle
  trace perturb --model minilm --mode random-token --show-head L0H3 --show-head L5H0
""",
    doc="""Does attention follow tokens or positions? (``trace perturb``).

    ``perturb(model, texts=None, mode="swap", swap=("dog", "cat"), **options)`` with the
    options of :class:`PerturbOptions`. Returns a :class:`PerturbResult` (tables
    ``perturbations``, ``resid``, ``heads``, ``summary``, ``resid_summary``).
    """,
    shard_rows=shard_rows,
    merge_extras=merge_extras,
    report_tables=("summary", "heads"),
)


#: ``residual_trace.perturb``: the Python function of this verb.
perturb = on_texts(EXPERIMENT)
