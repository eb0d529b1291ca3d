"""``layers``: capture every layer's residual stream and measure token drift.

``residual_trace.layers(model, texts)`` returns a :class:`LayersResult` whose tables are
``drift`` (one row per text x position x layer), ``summary`` (one row per layer) and
``texts``; ``trace layers`` is that call followed by :meth:`LayersResult.save`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.experiments.contract import Experiment, open_run
from residual_trace.experiments.engine import ShardPart, run_shards
from residual_trace.experiments.options import (
    LayersOptions,
    ModelArg,
    Texts,
    Warn,
    python_warning,
)
from residual_trace.experiments.result import Result
from residual_trace.figures import (
    drift_heatmap_figure,
    identifiable_share_figure,
    token_drift_figure,
)
from residual_trace.models import TracedModel
from residual_trace.tracer import DriftConfig, format_summary, layer_summary
from residual_trace.tracer.batching import EncodedText
from residual_trace.tracer.drift import iter_drift_encoded

__all__ = [
    "EXPERIMENT",
    "LayersOptions",
    "LayersResult",
    "merge_extras",
    "run_layers",
    "shard_rows",
]


@dataclass(repr=False)
class LayersResult(Result):
    """Tables ``drift``, ``summary``, ``texts``; figures token_drift, drift_heatmap and
    identifiable_share; ``attention`` holds the patterns when ``save_attention``."""

    command = "layers"
    attention: dict[int, tuple[list[str], np.ndarray]] = field(default_factory=dict)

    @property
    def drift(self) -> pd.DataFrame:
        return self.tables["drift"]

    @property
    def summary(self) -> pd.DataFrame:
        return self.tables["summary"]

    @property
    def _variants(self) -> tuple[str, ...]:
        return ("", "_normed") if self.model.spec.reads_normalised else ("",)

    def figures(self) -> dict[str, Figure]:
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
    drift_options = DriftConfig(
        batch_size=options.batch_size,
        max_length=options.max_length,
        normed=options.normed,
        progress=options.progress,
    )
    attention: dict[int, tuple[list[str], np.ndarray]] = {}

    def keep_pattern(text_id: int, tokens: list[str], pattern: np.ndarray) -> None:
        attention[text_id] = (tokens, pattern.astype(np.float16))

    frames = iter_drift_encoded(
        traced, encoded, drift_options, patterns=keep_pattern if options.save_attention else None
    )
    return ShardPart({"drift": pd.concat(list(frames), ignore_index=True)}, attention)


def merge_extras(extras: list[dict[int, tuple[list[str], np.ndarray]]]) -> dict:
    """The shards' attention patterns, in text order."""
    return {k: v for extra in extras for k, v in extra.items()}


#: ``trace layers`` as the engines run it.
EXPERIMENT = Experiment("layers", shard_rows, merge_extras)


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
