"""Token-drift figures: pure functions from a drift table to a matplotlib figure.

For the drift table see :mod:`residual_trace.tracer`; each figure is a
:class:`~matplotlib.figure.Figure`. No model, no pyplot state, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.figures.tokens import clean_token

LAYER_LABEL = "layer (0 = embeddings, input of block 0; k = output of block k-1)"

#: At most this many faint per-token lines are drawn (a seeded sample), to stay legible.
MAX_TOKEN_LINES = 400

#: The drift heatmap labels at most this many positions (every k-th on long texts) ...
MAX_LABELLED_ROWS = 64
#: ... on a canvas at most this tall: the figure's memory stays bounded at any length.
MAX_HEATMAP_INCHES = 20.0


def _tokens(table: pd.DataFrame, include_special: bool) -> pd.DataFrame:
    return table if include_special else table[~table["is_special"]]


def _band(summary: pd.DataFrame, column: str) -> tuple[np.ndarray, ...]:
    """Layers, mean, and the summary's 95% interval of ``column``."""
    return tuple(
        summary[name].to_numpy(dtype=np.float64)
        for name in ("layer", column, f"{column}_lo", f"{column}_hi")
    )


def _model_name(table: pd.DataFrame) -> str:
    names = table["model"].unique() if "model" in table else []
    return ", ".join(map(str, names)) or "model"


def token_drift_figure(
    table: pd.DataFrame,
    summary: pd.DataFrame,
    include_special: bool = False,
    variants: tuple[str, ...] = ("",),
    seed: int = DEFAULT_SEED,
) -> Figure:
    """Layer on x, cosine to the input token's embedding on y.

    A faint line per token of ``table`` (the drift table; a seeded sample of at most
    :data:`MAX_TOKEN_LINES`), and from ``summary`` (:func:`residual_trace.tracer.layer_summary`)
    the mean over tokens with its 95% bootstrap band and the ``baseline`` (mean similarity to
    the text's *other* tokens) as a dashed band: the level a state reaches without being its
    token. ``variants`` picks panels: ``""`` (raw) and/or ``"_normed"``.
    """
    data = _tokens(table, include_special)
    if data.empty:
        raise ValueError("no tokens to plot (only special tokens? try include_special=True)")
    fig = Figure(figsize=(6.4 * len(variants), 4.4), layout="constrained")
    axes = fig.subplots(1, len(variants), squeeze=False)[0]
    keys = data[["text_id", "position"]].drop_duplicates()
    if len(keys) > MAX_TOKEN_LINES:
        keys = keys.sample(MAX_TOKEN_LINES, random_state=seed)
    sample = data.merge(keys, on=["text_id", "position"])
    for ax, suffix in zip(axes, variants, strict=True):
        for n, (_, token) in enumerate(sample.groupby(["text_id", "position"], sort=False)):
            ax.plot(token["layer"], token[f"cos_input{suffix}"], color="0.55", lw=0.4, alpha=0.25,
                    label="one token" if n == 0 else None)  # fmt: skip
        layers, mean, lo, hi = _band(summary, f"cos_input{suffix}")
        ax.fill_between(layers, lo, hi, color="C0", alpha=0.35, lw=0)
        ax.plot(layers, mean, color="C0", lw=2.2, marker="o", ms=3.5, label="mean cos_input")
        layers, base, blo, bhi = _band(summary, f"baseline{suffix}")
        ax.fill_between(layers, blo, bhi, color="C3", alpha=0.25, lw=0)
        ax.plot(layers, base, color="C3", lw=1.6, ls="--", label="baseline (other tokens)")
        ax.axhline(0.0, color="0.3", lw=0.6)
        ax.set_xlabel(LAYER_LABEL)
        label = "cosine(h, W_E[token])" + (" after the model's norm" if suffix else "")
        ax.set_ylabel(label)
        lowest = float(np.nanmin(sample[f"cos_input{suffix}"].to_numpy(dtype=np.float64)))
        ax.set_ylim(max(-1.05, min(-0.35, lowest - 0.05)), 1.05)
        ax.set_xlim(layers.min(), layers.max())
        ax.set_title(
            f"{_model_name(table)}: token drift{' (normalised)' if suffix else ''}\n"
            f"{len(keys)} of {data[['text_id', 'position']].drop_duplicates().shape[0]} "
            "tokens drawn; band = 95% bootstrap CI of the mean",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    return fig


def drift_heatmap_figure(
    table: pd.DataFrame, text_id: int = 0, column: str = "cos_input"
) -> Figure:
    """One text's tokens (rows) x layers (columns), coloured by ``column``."""
    data = table[table["text_id"] == text_id]
    if data.empty:
        raise ValueError(f"text_id {text_id} is not in the table")
    grid = data.pivot_table(index="position", columns="layer", values=column, sort=True)
    tokens = data.drop_duplicates("position").set_index("position")["token"]
    labels = [f"{p}: {clean_token(str(tokens[p]))}" for p in grid.index]
    # a long text keeps a readable, bounded canvas: at most MAX_LABELLED_ROWS labels (every
    # k-th position) on a figure no taller than MAX_HEATMAP_INCHES
    step = max(1, math.ceil(len(labels) / MAX_LABELLED_ROWS))
    height = min(MAX_HEATMAP_INCHES, 1.4 + 0.28 * grid.shape[0])
    fig = Figure(figsize=(2.4 + 0.3 * grid.shape[1], height), layout="constrained")
    ax = fig.subplots()
    values = grid.to_numpy(dtype=float)
    # the colour scale fits the layers after the embedding (layer 0 is 1 by construction)
    later = np.abs(values[:, 1:]) if values.shape[1] > 1 else np.abs(values)
    bound = float(np.nanmax(later)) if np.isfinite(later).any() else 1.0
    bound = min(1.0, max(0.05, bound))
    sns.heatmap(
        grid,
        ax=ax,
        vmin=-bound,
        vmax=bound,
        cmap="vlag",
        center=0.0,
        yticklabels=False,
        cbar_kws={"label": f"{column} (cosine; clipped at ±{bound:.2f})", "extend": "both"},
    )
    for row, col in zip(*np.nonzero(np.abs(np.nan_to_num(values)) > bound), strict=True):
        ax.text(col + 0.5, row + 0.5, f"{values[row, col]:.2f}", ha="center", va="center",
                fontsize=6, color="white")  # fmt: skip
    shown = list(range(0, len(labels), step))
    ax.set_yticks([i + 0.5 for i in shown], [labels[i] for i in shown], rotation=0)
    layer_step = max(1, math.ceil(grid.shape[1] / 16))
    ax.set_xticks([i + 0.5 for i in range(0, grid.shape[1], layer_step)],
                  [str(c) for c in grid.columns[::layer_step]], rotation=0)  # fmt: skip
    ax.set_xlabel("layer (clipped cells show their value)")
    ax.set_ylabel("position: token")
    ax.set_title(f"{_model_name(table)}: {column}, text {text_id}", fontsize=9)
    return fig


def identifiable_share_figure(summary: pd.DataFrame, variants: tuple[str, ...] = ("",)) -> Figure:
    """Share of tokens whose own embedding is the nearest vocabulary row, per layer.

    One line per variant (``""`` raw, ``"_normed"`` after the model's norm), each with the
    95% bootstrap band of the share, from ``summary``
    (:func:`residual_trace.tracer.layer_summary`). The axis is fixed at 0 to 1.
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    styles = {"": ("raw", "C0"), "_normed": ("after the model's norm", "C2")}
    for suffix in variants:
        label, colour = styles[suffix]
        layers, mean, lo, hi = _band(summary, f"identifiable{suffix}")
        ax.fill_between(layers, lo, hi, color=colour, alpha=0.25, lw=0)
        ax.plot(layers, mean, color=colour, marker="o", ms=3.5, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(LAYER_LABEL)
    ax.set_ylabel("share of tokens with vocab_rank = 1")
    ax.set_title(f"{_model_name(summary)}: tokens identifiable by nearest neighbour", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    return fig
