"""``layers``: capture every layer's residual stream and measure token drift.

``residual_trace.layers(model, texts)`` returns a :class:`LayersResult` whose tables are
``drift`` (one row per text x position x layer), ``summary`` (one row per layer) and
``texts``; ``trace layers`` is that call followed by :meth:`LayersResult.save`. The
measures are :mod:`residual_trace.tracer.drift`'s; this module is glue, and imports
nothing heavy until a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = [
    "EXPERIMENT",
    "LayersOptions",
    "LayersResult",
    "merge_extras",
    "run_layers",
    "shard_rows",
]


@no_type_check
@dataclass(kw_only=True)
class LayersOptions(CorpusOptions):
    """Options of ``layers`` (and ``trace layers``)."""

    save_attention: bool = option(
        False,
        "Also keep every attention pattern (in memory, float16) and write one compressed "
        ".npz per text.",
    )
    heatmap_text: int = option(0, "text_id drawn in the drift_heatmap figure.")
    include_special: bool = include_special_option()
    normed: bool = option(
        True, "Also measure after the model's own norm (the *_normed columns).", cli=False
    )

    def validate(self) -> None:
        """Refuse a negative ``heatmap_text``."""
        super().validate()
        if self.heatmap_text < 0:
            raise self.fail("heatmap_text", f"must be a text id >= 0, got {self.heatmap_text}")

    def check_texts(self, texts: list[str]) -> None:
        """Options that refer to the texts (before any model loads)."""
        check_text_id("heatmap_text", self.heatmap_text, texts)

    def run(
        self, model: ModelArg, texts: Texts = None, warn: Warn = python_warning
    ) -> LayersResult:
        """Run on ``model`` and ``texts``; see :func:`residual_trace.layers`."""
        return run_layers(model, texts_argument(texts), self, warn)


@dataclass(repr=False)
class LayersResult(Result):
    """The tables and figures of ``layers``.

    Tables ``drift``, ``summary``, ``texts``; figures token_drift, drift_heatmap and
    identifiable_share; ``attention`` holds the patterns when ``save_attention``.
    """

    command = "layers"
    attention: dict[int, tuple[list[str], np.ndarray]] = field(default_factory=dict)

    @property
    def drift(self) -> pd.DataFrame:
        """``tables["drift"]``: one row per text x position x layer."""
        return self.tables["drift"]

    @property
    def summary(self) -> pd.DataFrame:
        """``tables["summary"]``: one row per layer."""
        return self.tables["summary"]

    @property
    def _variants(self) -> tuple[str, ...]:
        return ("", "_normed") if self.model.spec.reads_normalised else ("",)

    def figures(self) -> dict[str, Figure]:
        """token_drift, drift_heatmap and identifiable_share."""
        from residual_trace.figures import (
            drift_heatmap_figure,
            identifiable_share_figure,
            token_drift_figure,
        )

        options = self.options
        assert isinstance(options, LayersOptions)
        table, summary = self.drift, self.summary
        return {
            "token_drift": token_drift_figure(
                table, summary, options.include_special, self._variants, options.seed
            ),
            "drift_heatmap": drift_heatmap_figure(table, text_id=options.heatmap_text),
            "identifiable_share": identifiable_share_figure(summary, self._variants),
        }

    def headline(self) -> str:
        """``cos_input`` and the identifiable share at layer 0 and at the top, on one line."""
        s = self.summary
        if s.empty:
            return "no tokens"
        first, last = s.iloc[0], s.iloc[-1]
        return (
            f"cos_input {first['cos_input']:.3f} (layer 0) -> {last['cos_input']:.3f} "
            f"(layer {int(last['layer'])}), identifiable {first['identifiable']:.0%} -> "
            f"{last['identifiable']:.0%}"
        )

    def describe(self) -> str:
        """The per-layer summary ``trace layers`` prints, with what its columns mean."""
        from residual_trace.tracer import format_summary

        model = self.model
        tokens = int(self.summary["n_tokens"].iloc[0]) if len(self.summary) else 0
        unknown = int(self.summary["n_unk"].iloc[0]) if len(self.summary) else 0
        return "\n".join(
            [
                f"{model.name}: {model.model_type} {model.spec.family}, {model.n_blocks} blocks "
                f"({model.n_blocks + 1} layers), {len(self.texts)} texts, {tokens} tokens "
                f"measured per layer ({unknown} of them [UNK])",
                format_summary(self.summary, show_normed=model.spec.reads_normalised),
                "cos_input: cosine to the input token's embedding; baseline: the same to the "
                "text's other tokens (the null); identifiable: own token is the nearest "
                "vocabulary row.",
            ]
        )

    def _save_extra(self, folder: Path) -> list[str]:
        if not self.attention:
            return []
        import numpy as np

        target = folder / "attention"
        target.mkdir()
        for text_id, (tokens, pattern) in self.attention.items():
            np.savez_compressed(
                target / f"text_{text_id:05d}.npz",
                pattern=pattern,
                tokens=np.array(tokens, dtype=str),
            )
        return ["attention"]


def shard_rows(
    traced: TracedModel, encoded: Sequence[EncodedText], options: LayersOptions
) -> ShardPart:
    """The drift rows of some texts (and their patterns with ``save_attention``)."""
    import numpy as np
    import pandas as pd

    from residual_trace.tracer.drift import iter_drift_encoded

    attention: dict[int, tuple[list[str], np.ndarray]] = {}

    def keep_pattern(text_id: int, tokens: list[str], pattern: np.ndarray) -> None:
        attention[text_id] = (tokens, pattern.astype(np.float16))

    frames = iter_drift_encoded(
        traced,
        encoded,
        batch_size=options.batch_size,
        normed=options.normed,
        progress=options.progress,
        patterns=keep_pattern if options.save_attention else None,
    )
    return ShardPart({"drift": pd.concat(list(frames), ignore_index=True)}, attention)


def merge_extras(extras: list[dict[int, tuple[list[str], np.ndarray]]]) -> dict:
    """The shards' attention patterns, in text order."""
    return {k: v for extra in extras for k, v in extra.items()}


def run_layers(
    model: ModelArg,
    texts: Texts = None,
    options: LayersOptions | None = None,
    warn: Warn = python_warning,
) -> LayersResult:
    """Token drift of every token at every layer, and its per-layer summary.

    Args:
        model: a loaded model, or a name for :func:`residual_trace.load_model`.
        texts: a list of texts, one text, a file (``Path``) with one text per line, or
            ``None`` for the bundled sentences.
        options: :class:`LayersOptions` (defaults when ``None``).
        warn: receives one-line warnings (truncated texts, model conversion notes).
    """
    import numpy as np
    import pandas as pd

    from residual_trace.experiments.engine import run_shards
    from residual_trace.tracer import layer_summary

    options = options or LayersOptions()
    texts_list, source, traced, encoded, notes, _ = open_run(model, texts, options, warn)
    rows = run_shards(EXPERIMENT, traced, encoded, options)
    drift = rows.tables["drift"]
    attention: dict[int, tuple[list[str], np.ndarray]] = rows.extra
    summary = layer_summary(drift, include_special=options.include_special, seed=options.seed)
    layer0 = drift[drift["layer"] == 0]
    text_rows = pd.DataFrame(
        {
            "text_id": np.arange(len(texts_list)),
            "n_tokens": layer0.groupby("text_id")
            .size()
            .reindex(range(len(texts_list)), fill_value=0)
            .to_numpy(),
            "text": texts_list,
        }
    )
    return LayersResult(
        model=traced,
        options=options,
        tables={"drift": drift, "summary": summary, "texts": text_rows},
        texts=texts_list,
        source=source,
        notes=notes,
        record={"engine": rows.engine},
        attention=attention,
    )


EXPERIMENT = Experiment(
    name="layers",
    options=LayersOptions,
    run=run_layers,
    result=LayersResult,
    help="""Capture every layer's residual stream and measure token drift.

    Prints a per-layer summary and writes drift.csv (one row per text x position x
    layer), summary.csv, texts.csv, run.json and three figures into --out.
    """,
    epilog="""\b
Examples:
  trace layers                                   # minilm, bundled sentences
  trace layers --model bert-base-uncased --text "The dog chased the cat." --out runs/bert
  trace layers --model smollm2 --file my_sentences.txt --out runs/smol
  trace layers --model ./path/to/local/hf/checkpoint --format svg --save-attention
""",
    doc="""Token drift of every token at every layer (``trace layers``).

    ``layers(model, texts=None, **options)`` with the options of :class:`LayersOptions`.
    Returns a :class:`LayersResult`: ``tables["drift"]`` (one row per text x position x
    layer: ``cos_input``, ``baseline``, ``vocab_rank``, ...), ``tables["summary"]`` (one row
    per layer, with 95% intervals), ``tables["texts"]``; ``figures()``; ``save(out)``.
    """,
    shard_rows=shard_rows,
    merge_extras=merge_extras,
    report_tables=("summary",),
)


#: ``residual_trace.layers``: the Python function of this verb.
layers = on_texts(EXPERIMENT)
