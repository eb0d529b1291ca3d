"""The ``trace layers`` job: capture every layer, measure token drift, write tables and figures.

One config in, one :class:`LayersResult` out; the CLI is a thin shell around
:func:`run_layers`. Memory stays bounded: each batch is reduced to its rows of the drift
table and appended to ``drift.csv`` before the next batch runs; only the few numeric columns
the summary and figures need are kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from residual_trace.errors import UserError
from residual_trace.experiments.common import (
    FIGURE_FORMATS,
    RunOptions,
    bundled_sentences,
    inputs_record,
    load_inputs,
    model_record,
    read_texts,
)
from residual_trace.figures import (
    drift_heatmap_figure,
    identifiable_share_figure,
    token_drift_figure,
)
from residual_trace.models import TracedModel
from residual_trace.runs import RunDir, TableStream, save_figures, write_run_json, write_table
from residual_trace.tracer import DriftConfig, format_summary, iter_drift, layer_summary

__all__ = [
    "FIGURE_FORMATS",
    "LayersConfig",
    "LayersResult",
    "bundled_sentences",
    "describe",
    "read_texts",
    "run_layers",
]

#: Columns kept in memory for the summary and figures, in compact dtypes (the full table
#: streams to disk); token strings are kept only for the heatmap's text.
_KEPT = {
    "text_id": np.int32,
    "position": np.int32,
    "layer": np.int16,
    "is_special": bool,
    "cos_input": np.float32,
    "baseline": np.float32,
    "vocab_rank": np.int32,
    "cos_input_normed": np.float32,
    "baseline_normed": np.float32,
    "vocab_rank_normed": np.int32,
    "norm_ratio": np.float32,
    "top_dim_share": np.float32,
}


@dataclass
class LayersConfig(RunOptions):
    """Everything ``trace layers`` needs: the shared options plus its own."""

    save_attention: bool = False
    heatmap_text: int = 0
    normed: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heatmap_text < 0:
            raise UserError("--heatmap-text must be a text id >= 0")


@dataclass
class LayersResult:
    out: Path
    summary: pd.DataFrame
    n_texts: int
    files: list[Path] = field(default_factory=list)
    model: TracedModel | None = None


def _attention_writer(folder: Path) -> Callable[[int, list[str], np.ndarray], None]:
    folder.mkdir()

    def save(text_id: int, tokens: list[str], pattern: np.ndarray) -> None:
        np.savez_compressed(
            folder / f"text_{text_id:05d}.npz",
            pattern=pattern.astype(np.float16),
            tokens=np.array(tokens, dtype=str),
        )

    return save


def run_layers(
    config: LayersConfig,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    model: TracedModel | None = None,
) -> LayersResult:
    """Run ``trace layers``: see the module docstring and the README for the outputs.

    Args:
        config: the options.
        echo: receives warnings and notes (one line each) for stderr.
        model: an already loaded model to reuse (``config.model`` is then only a label).
    """
    texts, source = load_inputs(config.texts, config.file)
    if config.heatmap_text >= len(texts):
        raise UserError(f"--heatmap-text {config.heatmap_text}: only {len(texts)} text(s) given")
    out = config.output_dir()
    with RunDir(out) as run:  # checks --out is writable before the model loads
        model = config.model_for(model, echo)
        drift = DriftConfig(
            batch_size=config.batch_size,
            max_length=config.max_length,
            normed=config.normed,
            progress=config.progress,
        )
        patterns = _attention_writer(run.tmp / "attention") if config.save_attention else None
        stream = TableStream(run.tmp / "drift.csv")
        kept: list[pd.DataFrame] = []
        heatmap_tokens: dict[int, str] = {}  # position -> token of the heatmap's text
        warn = lambda m: echo(f"warning: {m}")  # noqa: E731
        for frame in iter_drift(model, texts, drift, patterns=patterns, warn=warn):
            stream.write(frame)
            kept.append(frame[list(_KEPT)].astype(_KEPT))
            shown = frame[frame["text_id"] == config.heatmap_text]
            heatmap_tokens.update(shown.set_index("position")["token"].to_dict())
        stream.close()
        table = pd.concat(kept, ignore_index=True)
        table["model"] = model.name
        table["token"] = (
            table["position"].map(heatmap_tokens).where(table["text_id"] == config.heatmap_text, "")
        )
        summary = layer_summary(table, include_special=config.include_special, seed=config.seed)
        files = [run.out / name for name in stream.files]
        files += [run.out / p.name for p in write_table(summary, run.tmp / "summary.csv")]
        text_rows = pd.DataFrame(
            {
                "text_id": np.arange(len(texts)),
                "n_tokens": table[table["layer"] == 0].groupby("text_id").size().to_numpy(),
                "text": texts,
            }
        )
        text_rows.to_csv(run.tmp / "texts.csv", index=False)
        files.append(run.out / "texts.csv")
        files += _write_figures(config, model, table, run.tmp, run.out)
        if config.save_attention:
            files.append(run.out / "attention")
        write_run_json(
            run.tmp / "run.json",
            {
                "command": "layers",
                "model": model_record(model),
                "device": str(model.device),
                "inputs": inputs_record(texts, source),
                "options": config.to_dict(),
                "seed": config.seed,
                "rows": stream.rows,
                "files": [p.name for p in files],
            },
        )
        files.append(run.out / "run.json")
    return LayersResult(out=out, summary=summary, n_texts=len(texts), files=files, model=model)


def _write_figures(
    config: LayersConfig,
    model: TracedModel,
    table: pd.DataFrame,
    tmp: Path,
    out: Path,
) -> list[Path]:
    variants = ("", "_normed") if model.spec.norm_placement == "pre" else ("",)
    figures = {
        "token_drift": token_drift_figure(
            table, include_special=config.include_special, variants=variants, seed=config.seed
        ),
        "drift_heatmap": drift_heatmap_figure(table, text_id=config.heatmap_text),
        "identifiable_share": identifiable_share_figure(
            table, include_special=config.include_special, variants=variants, seed=config.seed
        ),
    }
    return save_figures(figures, tmp, out, config.figure_format)


def describe(result: LayersResult) -> str:
    """Summary text for the terminal: title, per-layer table, what was written."""
    model = result.model
    assert model is not None
    tokens = int(result.summary["n_tokens"].iloc[0]) if len(result.summary) else 0
    parts = [
        f"{model.name}: {model.model_type} {model.spec.family}, {model.n_layers} blocks "
        f"({model.n_layers + 1} layers), {result.n_texts} texts, {tokens} tokens measured "
        "per layer",
        format_summary(result.summary, show_normed=model.spec.norm_placement == "pre"),
        "cos_input: cosine to the input token's embedding; baseline: the same to the text's "
        "other tokens (the null); identifiable: own token is the nearest vocabulary row.",
        f"wrote {result.out}/: " + ", ".join(p.name for p in result.files),
    ]
    return "\n".join(parts)
