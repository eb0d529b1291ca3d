"""``decompose``: split every block's update exactly into parts, and measure context mixing.

The parts are attention, MLP, carried residual and norm bias.

Tables: ``decompose`` (one row per text x position x block), ``mixing`` (the same keys),
``summary`` (one row per block), ``cumulative`` (one row per residual layer x source),
``mixing_pairs`` (one text's target x source map per block) and, with ``per_head``,
``heads`` (per token x block x head) and ``head_summary`` (per block x head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from residual_trace.experiments.contract import Experiment, ShardPart, on_texts, open_run
from residual_trace.experiments.options import (
    CorpusOptions,
    ModelArg,
    Texts,
    Warn,
    check_text_id,
    include_special_option,
    python_warning,
    texts_argument,
)
from residual_trace.experiments.result import Result
from residual_trace.options import no_type_check, option

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = ["EXPERIMENT", "DecomposeOptions", "DecomposeResult", "run_decompose", "shard_rows"]


@no_type_check
@dataclass(kw_only=True)
class DecomposeOptions(CorpusOptions):
    """Options of ``decompose`` (and ``trace decompose``)."""

    mixing_text: int = option(
        0, "text_id whose per-pair mixing map is kept (mixing_pairs, mixing_heatmap)."
    )
    viewer_texts: int = option(
        2,
        "How many texts (from text 0) viewer.html shows; their per-pair maps join "
        "mixing_text's in mixing_pairs (0: no viewer).",
        metavar="N",
    )
    per_head: bool = option(
        False,
        "Also split the attention part by head (heads, head_summary, heads figure) and keep "
        "the viewer texts' attention weights head by head (attention_heads).",
    )
    mixing_block: int | None = option(
        None, "Block drawn in mixing_heatmap (from 0; default: the middle block)."
    )
    include_special: bool = include_special_option()
    vz_max_tokens: int = option(
        256,  # tracer.mixing.VZ_MAX_TOKENS (a test keeps them equal)
        "Value Zeroing re-runs each block's MLP once per (token, source) pair: texts longer "
        "than this get NaN in mix_vz, mix_vz_rollout and vz, with a warning (0: never).",
        metavar="N",
    )

    def validate(self) -> None:
        """Refuse a negative text id or block and a negative Value Zeroing limit."""
        super().validate()
        if self.mixing_text < 0:
            raise self.fail("mixing_text", f"must be a text id >= 0, got {self.mixing_text}")
        if self.mixing_block is not None and self.mixing_block < 0:
            raise self.fail("mixing_block", f"blocks count from 0, got {self.mixing_block}")
        if self.viewer_texts < 0:
            raise self.fail("viewer_texts", f"must be 0 or more, got {self.viewer_texts}")
        if self.vz_max_tokens < 0:
            raise self.fail("vz_max_tokens", f"must be 0 or more, got {self.vz_max_tokens}")

    def check_texts(self, texts: list[str]) -> None:
        """Refuse a ``mixing_text`` that names no text (before any model loads)."""
        check_text_id("mixing_text", self.mixing_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> DecomposeResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.decompose`."""
        return run_decompose(model, texts_argument(texts), self, warn)


@dataclass(repr=False)
class DecomposeResult(Result):
    """The tables and figures of ``decompose``.

    Tables decompose, mixing, summary, cumulative, mixing_pairs (heads, head_summary);
    figures sublayers, cumulative, mixing, mixing_heatmap (heads).
    """

    command = "decompose"
    mixing_block: int = 0

    @property
    def summary(self) -> pd.DataFrame:
        """``tables["summary"]``: one row per block."""
        return self.tables["summary"]

    @property
    def mixing_text_pairs(self) -> pd.DataFrame:
        """``mixing_pairs``'s rows of ``mixing_text`` (the text the heatmap draws)."""
        pairs = self.tables["mixing_pairs"]
        return pairs[pairs["text_id"] == self.options.mixing_text]  # type: ignore[attr-defined]

    def figures(self) -> dict[str, Figure]:
        """sublayers, cumulative, mixing, mixing_heatmap (and heads with ``per_head``)."""
        from residual_trace.figures.decompose import (
            cumulative_figure,
            heads_figure,
            mixing_figure,
            mixing_heatmap_figure,
            sublayer_figure,
        )

        figures = {
            "sublayers": sublayer_figure(self.summary),
            "cumulative": cumulative_figure(self.tables["cumulative"]),
            "mixing": mixing_figure(self.summary),
            "mixing_heatmap": mixing_heatmap_figure(self.mixing_text_pairs, self.mixing_block),
        }
        if "head_summary" in self.tables:
            figures["heads"] = heads_figure(self.tables["head_summary"])
        return figures

    def viewer_sections(self) -> list[str]:
        """Token x token maps of the viewer's texts (``mixing_pairs``, ``attention_heads``)."""
        from residual_trace.viewer import decompose_view

        options = self.options
        assert isinstance(options, DecomposeOptions)
        pairs = self.tables["mixing_pairs"]
        wanted = [t for t in range(options.viewer_texts) if t in set(pairs["text_id"])]
        if not wanted:
            return []
        return [
            decompose_view(
                self.tables["mixing_pairs"],
                self.texts,
                wanted,
                self.tables.get("attention_heads"),
            )
        ]

    def headline(self) -> str:
        """The largest reconstruction error and AttnRes-N per block, on one line."""
        s = self.summary
        return f"max reconstruction error {s['max_recon_error'].max():.1e}; AttnRes-N " + " ".join(
            f"{v:.2f}" for v in s["mix_attnres_n"]
        )

    def describe(self) -> str:
        """The per-block table ``trace decompose`` prints, with what its columns mean."""
        from residual_trace.console import table
        from residual_trace.tracer.mixing_measures import DISPLAYED

        model, summary = self.model, self.summary
        lines = [
            f"{model.name}: {model.model_type} {model.spec.family} "
            f"({model.spec.norm_placement}-norm), {model.n_blocks} blocks, {len(self.texts)} "
            "texts; parts reconstruct every block output (max relative error "
            f"{summary['max_recon_error'].max():.1e})",
        ]
        headers = ["block", "|attn|/|x|", "|mlp|/|x|", "attn → token", "mlp → token", "carried",
                   "net change", *(m.short for m in DISPLAYED)]  # fmt: skip
        rows = [
            [str(row.block), f"{row.attn_norm_rel:.3f}", f"{row.mlp_norm_rel:.3f}",
             _signed(row.proj_attn, row.proj_attn_lo, row.proj_attn_hi),
             _signed(row.proj_mlp, row.proj_mlp_lo, row.proj_mlp_hi),
             f"{row.proj_carried_change:+.3f}", f"{row.proj_change:+.3f}",
             *(_ratio(getattr(row, m.column)) for m in DISPLAYED)]
            for row in summary.itertuples(index=False)
        ]  # fmt: skip
        lines += table(headers, rows)
        lines += [
            "block b's output is layer b+1. x → token: signed change of the state's projection "
            "on the unit input-token direction (+ restores identity, − erodes it), mean with "
            "95% CI; carried: the norms' rescaling of the block input (0 for pre-LN); net "
            "change = attn + mlp + carried + norm biases.",
            "mixing: share of each token's attention-block output from other tokens: raw "
            "attention weight (Attn-W), attention rollout, and Kobayashi et al.'s norm-based "
            "ratios (attention only, + residual, + residual and the norm after it; n/a "
            "without such a norm), GlobEnc, ALTI and Value Zeroing (VZ: cosine distance of the "
            "block output when a token's values are zeroed); rollout, GlobEnc, ALTI and VZ "
            "roll compound over the blocks so far.",
        ]
        return "\n".join(lines)


#: ``mixing_pairs`` keeps a text's map at every block while all kept maps have at most this
#: many rows (tokens^2 x blocks); beyond, ``mixing_text`` keeps only the block drawn
#: (``mixing_block``) and a viewer text none, so that long texts do not turn one table into
#: gigabytes.
MAX_PAIR_ROWS = 2_000_000


def pair_blocks(model: TracedModel, n_tokens: int, options: DecomposeOptions) -> tuple[int, ...]:
    """The blocks at which ``mixing_pairs`` keeps the mixing text's map."""
    if n_tokens * n_tokens * model.n_blocks <= MAX_PAIR_ROWS:
        return tuple(range(model.n_blocks))
    return (_mixing_block(model, options),)


def pair_maps(
    model: TracedModel, lengths: dict[int, int], options: DecomposeOptions
) -> dict[int, tuple[int, ...]]:
    """The texts whose per-pair map ``mixing_pairs`` keeps, each with its blocks.

    ``lengths`` maps every ``text_id`` to its length in tokens; ``mixing_text`` comes
    first, then the viewer's texts in order while the rows stay within ``MAX_PAIR_ROWS``.
    """
    kept = {options.mixing_text: pair_blocks(model, lengths[options.mixing_text], options)}
    rows = lengths[options.mixing_text] ** 2 * len(kept[options.mixing_text])
    for text_id in range(min(options.viewer_texts, len(lengths))):
        cost = lengths[text_id] ** 2 * model.n_blocks
        if text_id in kept or rows + cost > MAX_PAIR_ROWS:
            continue
        kept[text_id] = tuple(range(model.n_blocks))
        rows += cost
    return kept


def _mixing_block(model: TracedModel, options: DecomposeOptions) -> int:
    return options.mixing_block if options.mixing_block is not None else model.n_blocks // 2


def shard_rows(
    traced: TracedModel, encoded: Sequence[EncodedText], options: DecomposeOptions
) -> ShardPart:
    """The per-token split and mixing rows of some texts.

    With them come the per-batch sums that :func:`pool_cumulative` pools (table ``pooled``)
    and, for the shard holding ``mixing_text``, its per-pair map.
    """
    import pandas as pd

    from residual_trace.tracer.decompose_batches import iter_decompose_encoded

    here = {item.text_id: len(item.ids) for item in encoded}
    every = options.context.get("pair_maps")  # over all texts, from run_decompose
    if every is None:
        every = pair_maps(traced, here, options) if options.mixing_text in here else {}
    maps = {text_id: blocks for text_id, blocks in every.items() if text_id in here}
    local, pooled, mixes, pair_frames, head_frames, weights = [], [], [], [], [], []
    for rows in iter_decompose_encoded(
        traced,
        encoded,
        batch_size=options.batch_size,
        per_head=options.per_head,
        pair_text=maps,
        vz_max_tokens=options.vz_max_tokens,
        progress=options.progress,
    ):
        local.append(rows.local)
        pooled.append(rows.cumulative)
        mixes.append(rows.mixing)
        if rows.heads is not None:
            head_frames.append(rows.heads)
        if rows.pairs is not None:
            pair_frames.append(rows.pairs)
        if rows.attention_heads is not None:
            weights.append(rows.attention_heads)
    tables = {
        "decompose": pd.concat(local, ignore_index=True),
        "mixing": pd.concat(mixes, ignore_index=True),
        "pooled": pd.concat(pooled, ignore_index=True),
    }
    if pair_frames:
        tables["mixing_pairs"] = pd.concat(pair_frames, ignore_index=True)
    if head_frames:
        tables["heads"] = pd.concat(head_frames, ignore_index=True)
    if weights:
        tables["attention_heads"] = pd.concat(weights, ignore_index=True)
    return ShardPart(tables)


def _ratio(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _signed(value: float, low: float, high: float) -> str:
    """A signed mean with its interval, e.g. ``+0.469 [+0.23, +0.76]`` (``n/a`` if missing)."""
    from residual_trace.stats import format_interval

    if value != value:
        return "n/a"
    return f"{value:+.3f} {format_interval(low, high, '+.2f')}"


def _note_sizes(
    traced: TracedModel, encoded: Sequence[EncodedText], options: DecomposeOptions, note: Warn
) -> dict[int, tuple[int, ...]]:
    """Warn, before the run, where the texts' lengths will cut a result short; the pair maps.

    The results that lengths can cut short are the per-pair maps and Value Zeroing. Returns
    :func:`pair_maps` over all the texts.
    """
    n_pair = len(encoded[options.mixing_text].ids)
    maps = pair_maps(traced, {item.text_id: len(item.ids) for item in encoded}, options)
    kept = maps[options.mixing_text]
    if len(kept) < traced.n_blocks:
        note(
            f"warning: mixing_pairs: text {options.mixing_text} has {n_pair} tokens, so its map "
            f"at every block would take {n_pair * n_pair * traced.n_blocks:,} rows; kept at "
            f"block {kept[0]} only (--mixing-block)"
        )
    wanted = min(options.viewer_texts, len(encoded))
    left_out = [t for t in range(wanted) if t not in maps]
    if left_out:
        note(
            f"warning: viewer: text(s) {', '.join(map(str, left_out))} left out of "
            f"mixing_pairs and viewer.html: the kept maps would exceed {MAX_PAIR_ROWS:,} rows"
        )
    too_long = sum(len(item.ids) > options.vz_max_tokens for item in encoded)
    if too_long and options.vz_max_tokens > 0:
        note(
            f"warning: value zeroing: {too_long} of {len(encoded)} texts have more than "
            f"{options.vz_max_tokens} tokens (--vz-max-tokens); their mix_vz columns are NaN"
        )
    return maps


def run_decompose(
    model: ModelArg,
    texts: Texts = None,
    options: DecomposeOptions | None = None,
    warn: Warn = python_warning,
) -> DecomposeResult:
    """The exact attention / MLP / residual / bias split of every block, and context mixing.

    Exact also for post-LN BERT (where TransformerLens's ``decompose_resid`` misses): each
    part is carried through the LayerNorms linearly, and the parts are checked, as it runs,
    to add up to the model's own block output (``ReconstructionError`` otherwise).

    Args:
        model: a loaded model, or a name for :func:`residual_trace.load_model`.
        texts: a list of texts, one text, a file (``Path``), or ``None`` (bundled sentences).
        options: :class:`DecomposeOptions` (defaults when ``None``).
        warn: receives one-line warnings.
    """
    from residual_trace.experiments.engine import run_shards
    from residual_trace.tracer.decompose import pool_cumulative
    from residual_trace.tracer.decompose_summary import decompose_summary, head_summary

    options = options or DecomposeOptions()

    def check_model(traced: TracedModel) -> None:
        if options.mixing_block is not None and options.mixing_block >= traced.n_blocks:
            raise options.fail(
                "mixing_block",
                f"{options.mixing_block}: {traced.name} has blocks 0..{traced.n_blocks - 1}",
            )

    texts_list, source, traced, encoded, notes, note = open_run(
        model, texts, options, warn, check_model
    )
    maps = _note_sizes(traced, encoded, options, note)
    rows = run_shards(EXPERIMENT, traced, encoded, options.with_context(pair_maps=maps))
    table, mixing_table = rows.tables["decompose"], rows.tables["mixing"]
    seed, special = options.seed, options.include_special
    tables = {
        "decompose": table,
        "mixing": mixing_table,
        "summary": decompose_summary(table, special, seed, mixing_table),
        "cumulative": pool_cumulative([rows.tables["pooled"]], traced.name),
        "mixing_pairs": rows.tables["mixing_pairs"],
    }
    tables.update({k: rows.tables[k] for k in ("attention_heads",) if k in rows.tables})
    if "heads" in rows.tables:
        tables["heads"] = rows.tables["heads"]
        tables["head_summary"] = head_summary(rows.tables["heads"], special, seed)
    return DecomposeResult(
        model=traced,
        options=options,
        tables=tables,
        texts=texts_list,
        source=source,
        notes=notes,
        record={"max_recon_error": float(table["recon_error"].max()), "engine": rows.engine},
        mixing_block=_mixing_block(traced, options),
    )


EXPERIMENT = Experiment(
    name="decompose",
    options=DecomposeOptions,
    run=run_decompose,
    result=DecomposeResult,
    help="""Split every block exactly into attention, MLP, carried-residual and norm-bias parts.

    Exact also for post-LN BERT (where TransformerLens's decompose_resid misses): each
    part is carried through the LayerNorms linearly and the parts are checked, at run time,
    to add up to the model's own block output. Also measures context mixing (raw attention,
    attention rollout, norm-based with residual and LayerNorm). Writes decompose.csv and
    mixing.csv (one row per text x position x block), summary.csv, cumulative.csv,
    mixing_pairs.csv, run.json and four figures.
    """,
    epilog="""\b
Examples:
  trace decompose --model minilm --text "The dog chased the cat." --out runs/dec
  trace decompose --model smollm2 --file sentences.txt
  trace decompose --model minilm --per-head --mixing-text 3 --mixing-block 2
""",
    doc="""The exact attention / MLP / residual / bias split of every block, and context mixing
    (``trace decompose``).

    ``decompose(model, texts=None, **options)`` with the options of
    :class:`DecomposeOptions`. Returns a :class:`DecomposeResult` (tables ``decompose``,
    ``mixing``, ``summary``, ``cumulative``, ``mixing_pairs``; ``heads`` and
    ``head_summary`` with ``per_head=True``).
    """,
    shard_rows=shard_rows,
    report_tables=("summary",),
)


#: ``residual_trace.decompose``: the Python function of this verb.
decompose = on_texts(EXPERIMENT)
