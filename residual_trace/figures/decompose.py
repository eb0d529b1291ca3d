"""Attention-vs-MLP figures: pure functions from the decomposition tables to a Figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.tracer.mixing_measures import DISPLAYED

_PAIRS = {
    "norms": (
        ("attn_norm_rel", "attention: |Δ_attn| / |resid_pre|", "C0"),
        ("mlp_norm_rel", "MLP: |Δ_mlp| / |residual it is added to|", "C1"),
    ),
    "projection": (
        ("proj_attn", "attention part", "C0"),
        ("proj_mlp", "MLP part", "C1"),
        ("proj_carried_change", "carried input − input (norm rescaling)", "0.5"),
    ),
}

BLOCK_LABEL = "block b (its output is layer b+1)"


def _name(table: pd.DataFrame) -> str:
    return ", ".join(map(str, table["model"].unique())) if "model" in table else "model"


def _bars(ax, summary: pd.DataFrame, columns) -> None:
    blocks = summary["block"].to_numpy()
    width = 0.8 / len(columns)
    for index, (column, label, colour) in enumerate(columns):
        means = summary[column].to_numpy(dtype=np.float64)
        errors = np.stack(
            [means - summary[f"{column}_lo"].to_numpy(), summary[f"{column}_hi"].to_numpy() - means]
        )
        offsets = blocks + (index - (len(columns) - 1) / 2) * width
        ax.bar(
            offsets,
            means,
            width=width,
            color=colour,
            label=label,
            yerr=np.clip(errors, 0.0, None),
            capsize=2,
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(blocks)
    ax.set_xlabel(BLOCK_LABEL)
    ax.legend(fontsize=8, frameon=False)


def sublayer_figure(summary: pd.DataFrame) -> Figure:
    """Two panels of bars per block: each sublayer's update size and its input-token effect.

    The top panel is the relative size of each sublayer's update; the bottom one is its signed
    effect on the state's projection onto the unit input-token direction. Both show the
    summary's 95% bootstrap intervals (:func:`residual_trace.tracer.decompose_summary`).
    """
    if summary.empty:
        raise ValueError("no tokens to plot (only special tokens? try include_special=True)")
    fig = Figure(figsize=(7.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _bars(top, summary, _PAIRS["norms"])
    top.set_ylabel("update norm / residual norm")
    top.set_title(f"{_name(summary)}: how large is each sublayer's update?", fontsize=9)
    _bars(bottom, summary, _PAIRS["projection"])
    bottom.axhline(0.0, color="0.3", lw=0.6)
    bottom.set_ylabel("Δ projection on W_E[token] / |W_E[token]|")
    bottom.set_title(
        "does it push the state toward (+) or away from (−) its input token?", fontsize=9
    )
    return fig


def cumulative_figure(cumulative: pd.DataFrame) -> Figure:
    """Share of the last layer's squared norm from each source (embed, L{b}_attn, L{b}_mlp)."""
    last = cumulative[cumulative["layer"] == cumulative["layer"].max()]
    fig = Figure(figsize=(max(5.0, 0.28 * len(last) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    colours = [
        "C2"
        if s == "embed"
        else "C0"
        if s.endswith("_attn")
        else "C1"
        if s.endswith("_mlp")
        else "0.5"
        for s in last["source"]
    ]
    ax.bar(range(len(last)), last["share"], color=colours)
    ax.set_xticks(range(len(last)), last["source"], rotation=90, fontsize=7)
    ax.axhline(0.0, color="0.3", lw=0.6)
    ax.set_ylabel("share of |h|² (part · h / |h|²)")
    name = _name(last)
    ax.set_title(f"{name}: where the last layer's state comes from", fontsize=9)
    return fig


#: How each mixing measure is drawn (colour, line style); names and order from the table
#: of measures (:data:`residual_trace.tracer.mixing_measures.DISPLAYED`).
_STYLES = {
    "mix_raw": ("0.5", "--"),
    "mix_rollout": ("C2", "-."),
    "mix_attn_n": ("C0", ":"),
    "mix_attnres_n": ("C1", "-"),
    "mix_attnresln_n": ("C3", "-"),
    "mix_globenc": ("C4", "-."),
    "mix_alti": ("C5", "--"),
    "mix_vz": ("C6", "-"),
    "mix_vz_rollout": ("C6", ":"),
}
_MEASURES = tuple((m.column, m.legend, *_STYLES[m.column]) for m in DISPLAYED)


def mixing_figure(summary: pd.DataFrame) -> Figure:
    """Share of each position's attention-block output from *other* tokens, per block.

    The measures are side by side: means with the summary's 95% bootstrap bands.
    """
    fig = Figure(figsize=(9.6, 4.2), layout="constrained")
    ax = fig.subplots()
    blocks = summary["block"].to_numpy()
    for column, label, colour, style in _MEASURES:
        if not np.isfinite(summary[column]).any():
            continue  # AttnResLn-N without a norm after the sum; Value Zeroing when skipped
        ax.fill_between(
            blocks, summary[f"{column}_lo"], summary[f"{column}_hi"], color=colour, alpha=0.2, lw=0
        )
        ax.plot(blocks, summary[column], color=colour, ls=style, marker="o", ms=3, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(BLOCK_LABEL)
    ax.set_ylabel("mixing ratio (share from other tokens)")
    ax.set_title(
        f"{_name(summary)}: how much of each token's update comes from other tokens?", fontsize=9
    )
    ax.legend(fontsize=7.5, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


#: The mixing map labels at most this many tokens per axis (every k-th on long texts) ...
MAX_LABELLED_TOKENS = 64
#: ... on a canvas at most this wide: the figure's memory stays bounded at any length.
MAX_MAP_INCHES = 20.0


def mixing_heatmap_figure(pairs: pd.DataFrame, block: int) -> Figure:
    """Target (rows) x source (columns) norm-based contribution shares of one text and block."""
    data = pairs[pairs["block"] == block]
    if data.empty:
        raise ValueError(f"block {block} is not in the pair table")
    grid = data.pivot_table(index="target", columns="source", values="share", sort=True)
    tokens = data.drop_duplicates("target").set_index("target")["target_token"]
    labels = [f"{i}: {tokens[i]}" for i in grid.index]
    # bounded canvas at any length: every k-th token labelled, at most MAX_MAP_INCHES wide
    step = max(1, math.ceil(len(labels) / MAX_LABELLED_TOKENS))
    size = min(MAX_MAP_INCHES, 1.5 + 0.32 * len(labels))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    shown = list(range(0, len(labels), step))
    ax.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=7)
    ax.set_yticks(shown, [labels[i] for i in shown], fontsize=7)
    ax.set_xlabel("source token j")
    ax.set_ylabel("target token i")
    fig.colorbar(image, ax=ax, label="share of |F_i(x_j)| in row i (diagonal: + residual)")
    name = ", ".join(map(str, data["model"].unique()))
    text_id = int(data["text_id"].iloc[0])
    ax.set_title(f"{name}: norm-based mixing, text {text_id}, block {block}", fontsize=9)
    return fig


def heads_figure(head_summary: pd.DataFrame) -> Figure:
    """Block x head map of each head's mean signed effect on the input-token projection.

    Red pushes toward the input token, blue away; the values come from
    :func:`residual_trace.tracer.head_summary`. The output bias (head -1) is left out.
    """
    data = head_summary[head_summary["head"] >= 0]
    grid = data.pivot_table(index="block", columns="head", values="proj_head", aggfunc="mean")
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = Figure(
        figsize=(1.5 + 0.45 * grid.shape[1], 1.2 + 0.3 * grid.shape[0]), layout="constrained"
    )
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"L{b}" for b in grid.index])
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="mean Δ proj. on input token")
    ax.set_title(
        f"{_name(head_summary)}: which heads (L<block>H<head>) restore (+) or erode (−) "
        "token identity?",
        fontsize=9,
    )
    return fig
