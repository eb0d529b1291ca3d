"""The ``trace decompose`` job: split every layer into attention, MLP, residual and bias parts."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from residual_trace.errors import UserError
from residual_trace.experiments.common import (
    RunOptions,
    inputs_record,
    load_inputs,
    model_record,
)
from residual_trace.figures.decompose import (
    cumulative_figure,
    heads_figure,
    mixing_figure,
    mixing_heatmap_figure,
    sublayer_figure,
)
from residual_trace.models import TracedModel
from residual_trace.runs import RunDir, TableStream, save_figures, write_run_json, write_table
from residual_trace.stats import bootstrap_ci
from residual_trace.tracer import iter_batches, prepare_texts
from residual_trace.tracer.batching import TOKEN_KEYS
from residual_trace.tracer.decompose import (
    DECOMPOSE_COLUMNS,
    decompose_batch,
    decompose_hooks,
    pool_cumulative,
)
from residual_trace.tracer.mixing import mixing_batch, mixing_hooks

__all__ = ["DecomposeConfig", "DecomposeResult", "decompose_summary", "describe", "run_decompose"]

_HEAD_KEPT = ["layer", "head", "is_special", "proj_head"]
_MIX_KEPT = ["layer", "is_special", "mix_raw", "mix_norm_attn", "mix_norm", "mix_rollout"]
_KEPT = ["layer", "is_special", *DECOMPOSE_COLUMNS[len(TOKEN_KEYS) :]]


@dataclass
class DecomposeConfig(RunOptions):
    """Everything ``trace decompose`` needs: the shared options plus its own."""

    mixing_text: int = 0
    mixing_layer: int | None = None
    per_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixing_text < 0:
            raise UserError("--mixing-text must be a text id >= 0")
        if self.mixing_layer is not None and self.mixing_layer < 1:
            raise UserError("--mixing-layer must be a layer >= 1 (the output of block 0)")


@dataclass
class DecomposeResult:
    out: Path
    summary: pd.DataFrame
    n_texts: int
    model: TracedModel
    files: list[Path] = field(default_factory=list)


def decompose_summary(
    table: pd.DataFrame,
    include_special: bool = False,
    seed: int = 0,
    mixing: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per layer: mean update sizes and signed effects on the input-token projection.

    Columns: ``layer``, ``n_tokens``, ``attn_norm_rel``, ``mlp_norm_rel`` (mean update norm
    over the residual it is added to), ``proj_attn``, ``proj_attn_lo``, ``proj_attn_hi``,
    ``proj_mlp``, ``proj_mlp_lo``, ``proj_mlp_hi`` (mean signed contribution to the projection
    on the unit input-token direction, with 95% bootstrap intervals), ``proj_carried_change``
    (carried input minus input: the norms' rescaling), ``proj_bias``, ``proj_change``
    (``proj_post - proj_pre``), ``max_recon_error``; with ``mixing``, also the mean
    ``mix_raw``, ``mix_norm_attn``, ``mix_norm`` (with ``mix_norm_lo``/``mix_norm_hi``) and
    ``mix_rollout`` (see :mod:`residual_trace.tracer.mixing`).
    """
    rows = table if include_special else table[~table["is_special"]]
    out = []
    for layer, group in rows.groupby("layer", sort=True):
        record: dict[str, float | int] = {"layer": int(layer), "n_tokens": len(group)}
        for column in ("attn_norm_rel", "mlp_norm_rel"):
            record[column] = float(group[column].mean())
        for column in ("proj_attn", "proj_mlp"):
            lo, hi = bootstrap_ci(group[column].to_numpy(), seed=seed)
            record.update(
                {column: float(group[column].mean()), f"{column}_lo": lo, f"{column}_hi": hi}
            )
        record["proj_carried_change"] = float((group["proj_resid"] - group["proj_pre"]).mean())
        record["proj_bias"] = float(group["proj_bias"].mean())
        record["proj_change"] = float((group["proj_post"] - group["proj_pre"]).mean())
        record["max_recon_error"] = float(group["recon_error"].max())
        out.append(record)
    summary = pd.DataFrame(out)
    if mixing is None:
        return summary
    mixes = mixing if include_special else mixing[~mixing["is_special"]]
    extra = []
    for layer, group in mixes.groupby("layer", sort=True):
        lo, hi = bootstrap_ci(group["mix_norm"].to_numpy(), seed=seed)
        extra.append(
            {
                "layer": int(layer),
                "mix_raw": float(group["mix_raw"].mean()),
                "mix_norm_attn": float(group["mix_norm_attn"].mean()),
                "mix_norm": float(group["mix_norm"].mean()),
                "mix_norm_lo": lo,
                "mix_norm_hi": hi,
                "mix_rollout": float(group["mix_rollout"].mean()),
            }
        )
    return summary.merge(pd.DataFrame(extra), on="layer", how="left")


def run_decompose(
    config: DecomposeConfig,
    echo: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    model: TracedModel | None = None,
) -> DecomposeResult:
    """Run ``trace decompose``: tables, figures and run.json into ``config.out``."""
    texts, source = load_inputs(config.texts, config.file)
    if config.mixing_text >= len(texts):
        raise UserError(f"--mixing-text {config.mixing_text}: only {len(texts)} text(s) given")
    out = config.output_dir()
    with RunDir(out) as run:  # checks --out is writable before the model loads
        model = config.model_for(model, echo)
        if config.mixing_layer is not None and config.mixing_layer > model.n_layers:
            raise UserError(
                f"--mixing-layer {config.mixing_layer}: {model.name} has {model.n_layers} blocks"
            )
        encoded = prepare_texts(
            model, texts, config.max_length, warn=lambda m: echo(f"warning: {m}")
        )
        stream = TableStream(run.tmp / "decompose.csv")
        mixing_stream = TableStream(run.tmp / "mixing.csv")
        heads_stream = TableStream(run.tmp / "heads.csv") if config.per_head else None
        names = list(
            dict.fromkeys([*decompose_hooks(model, config.per_head), *mixing_hooks(model)])
        )
        kept, pooled, mixes, pair_frames, head_frames = [], [], [], [], []
        batches = iter_batches(encoded, config.batch_size, model.pad_id)
        n_batches = -(-len(encoded) // config.batch_size)
        with torch.inference_mode():
            for batch in tqdm(
                batches,
                total=n_batches,
                desc=f"decomposing {model.name}",
                unit="batch",
                disable=not config.progress,
                leave=False,
            ):
                store = model.run_hooks(batch.ids, batch.mask, names)
                result = decompose_batch(model, batch, store, per_head=config.per_head)
                stream.write(result.local)
                if heads_stream is not None and result.heads is not None:
                    heads_stream.write(result.heads)
                    head_frames.append(result.heads[_HEAD_KEPT])
                kept.append(result.local[_KEPT])
                pooled.append(result.cumulative)
                mixing, pairs = mixing_batch(model, batch, store, config.mixing_text)
                mixing_stream.write(mixing)
                mixes.append(mixing[_MIX_KEPT])
                if pairs is not None:
                    pair_frames.append(pairs)
        stream.close()
        mixing_stream.close()
        if heads_stream is not None:
            heads_stream.close()
        mixing_table = pd.concat(mixes, ignore_index=True)
        mixing_table["model"] = model.name
        pair_table = pd.concat(pair_frames, ignore_index=True)
        mixing_layer = config.mixing_layer or max(1, (model.n_layers + 1) // 2)
        table = pd.concat(kept, ignore_index=True)
        table["model"] = model.name
        summary = decompose_summary(table, config.include_special, config.seed, mixing_table)
        cumulative = pool_cumulative(pooled, model.name)
        files = [run.out / name for name in [*stream.files, *mixing_stream.files]]
        if heads_stream is not None:
            files += [run.out / name for name in heads_stream.files]
        tables = (
            (summary, "summary.csv"),
            (cumulative, "cumulative.csv"),
            (pair_table, "mixing_pairs.csv"),
        )
        for frame, name in tables:
            files += [run.out / p.name for p in write_table(frame, run.tmp / name)]
        figures = {
            "sublayers": sublayer_figure(table, config.include_special, config.seed),
            "cumulative": cumulative_figure(cumulative),
            "mixing": mixing_figure(mixing_table, config.include_special, config.seed),
            "mixing_heatmap": mixing_heatmap_figure(pair_table, mixing_layer),
        }
        if head_frames:
            head_table = pd.concat(head_frames, ignore_index=True)
            head_table["model"] = model.name
            figures["heads"] = heads_figure(head_table, config.include_special)
        files += save_figures(figures, run.tmp, run.out, config.figure_format)
        write_run_json(
            run.tmp / "run.json",
            {
                "command": "decompose",
                "model": model_record(model),
                "device": str(model.device),
                "inputs": inputs_record(texts, source),
                "options": config.to_dict(),
                "seed": config.seed,
                "rows": stream.rows,
                "max_recon_error": float(table["recon_error"].max()),
                "files": [p.name for p in files],
            },
        )
        files.append(run.out / "run.json")
    return DecomposeResult(out=out, summary=summary, n_texts=len(texts), model=model, files=files)


def describe(result: DecomposeResult) -> str:
    """The per-layer summary for the terminal."""
    model = result.model
    lines = [
        f"{model.name}: {model.model_type} {model.spec.family} ({model.spec.norm_placement}-LN), "
        f"{model.n_layers} blocks, {result.n_texts} texts; parts reconstruct every layer "
        f"(max relative error {result.summary['max_recon_error'].max():.1e})",
        f"{'layer':>5}  {'|attn|/|x|':>10}  {'|mlp|/|x|':>10}  {'attn → token':>19}  "
        f"{'mlp → token':>19}  {'carried':>8}  {'net change':>10}  "
        f"{'mix raw':>7}  {'rollout':>7}  {'mix norm':>8}",
    ]
    for row in result.summary.itertuples(index=False):
        lines.append(
            f"{row.layer:>5}  {row.attn_norm_rel:>10.3f}  {row.mlp_norm_rel:>10.3f}  "
            f"{row.proj_attn:>+7.3f} [{row.proj_attn_lo:+.2f},{row.proj_attn_hi:+.2f}]  "
            f"{row.proj_mlp:>+7.3f} [{row.proj_mlp_lo:+.2f},{row.proj_mlp_hi:+.2f}]  "
            f"{row.proj_carried_change:>+8.3f}  {row.proj_change:>+10.3f}  "
            f"{row.mix_raw:>7.3f}  {row.mix_rollout:>7.3f}  {row.mix_norm:>8.3f}"
        )
    lines += [
        "x → token: signed change of the state's projection on the unit input-token direction "
        "(+ restores identity, − erodes it), mean with 95% CI; carried: the norms' rescaling of "
        "the block input (0 for pre-LN); net change = attn + mlp + carried + norm biases.",
        "mix: share of each token's attention-block output from other tokens: raw attention "
        "weight, attention rollout, and norm-based with residual and LN (Kobayashi et al.).",
        f"wrote {result.out}/: " + ", ".join(p.name for p in result.files),
    ]
    return "\n".join(lines)
