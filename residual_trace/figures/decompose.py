"""Attention-vs-MLP figures: pure functions from the decomposition tables to a Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.stats import bootstrap_ci

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


def _bars(ax, table: pd.DataFrame, columns, seed: int) -> None:
    layers = np.array(sorted(table["layer"].unique()))
    width = 0.8 / len(columns)
    for index, (column, label, colour) in enumerate(columns):
        means, errors = [], []
        for layer in layers:
            values = table.loc[table["layer"] == layer, column].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(values, seed=seed)
            mean = float(np.mean(values))
            means.append(mean)
            errors.append((mean - lo, hi - mean))
        offsets = layers + (index - (len(columns) - 1) / 2) * width
        ax.bar(
            offsets,
            means,
            width=width,
            color=colour,
            label=label,
            yerr=np.array(errors).T,
            capsize=2,
            error_kw={"lw": 0.8},
        )
    ax.set_xticks(layers)
    ax.set_xlabel("layer k (output of block k-1)")
    ax.legend(fontsize=8, frameon=False)


def sublayer_figure(table: pd.DataFrame, include_special: bool = False, seed: int = 0) -> Figure:
    """Two panels per layer: relative size of each sublayer's update, and its signed effect
    on the state's projection onto the unit input-token direction (95% bootstrap bars)."""
    data = table if include_special else table[~table["is_special"]]
    if data.empty:
        raise ValueError("no tokens to plot (only special tokens? try include_special=True)")
    data = data.assign(proj_carried_change=data["proj_resid"] - data["proj_pre"])
    name = ", ".join(map(str, data["model"].unique()))
    fig = Figure(figsize=(7.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _bars(top, data, _PAIRS["norms"], seed)
    top.set_ylabel("update norm / residual norm")
    top.set_title(f"{name}: how large is each sublayer's update?", fontsize=9)
    _bars(bottom, data, _PAIRS["projection"], seed)
    bottom.axhline(0.0, color="0.3", lw=0.6)
    bottom.set_ylabel("Δ projection on W_E[token] / |W_E[token]|")
    bottom.set_title(
        "does it push the state toward (+) or away from (−) its input token?", fontsize=9
    )
    return fig


def cumulative_figure(cumulative: pd.DataFrame) -> Figure:
    """Share of the last layer's squared norm from each source (embedding, attn.b, mlp.b)."""
    last = cumulative[cumulative["layer"] == cumulative["layer"].max()]
    fig = Figure(figsize=(max(5.0, 0.28 * len(last) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    colours = [
        "C2"
        if s == "embedding"
        else "C0"
        if s.startswith("attn")
        else "C1"
        if s.startswith("mlp")
        else "0.5"
        for s in last["source"]
    ]
    ax.bar(range(len(last)), last["share"], color=colours)
    ax.set_xticks(range(len(last)), last["source"], rotation=90, fontsize=7)
    ax.axhline(0.0, color="0.3", lw=0.6)
    ax.set_ylabel("share of |h|² (part · h / |h|²)")
    name = ", ".join(map(str, last["model"].unique()))
    ax.set_title(f"{name}: where the last layer's state comes from", fontsize=9)
    return fig


_MEASURES = (
    ("mix_raw", "raw attention on other tokens", "0.5", "--"),
    ("mix_rollout", "attention rollout (Abnar & Zuidema)", "C2", "-."),
    ("mix_norm_attn", "norm-based, attention only (Kobayashi 2020)", "C0", ":"),
    ("mix_norm", "norm-based + residual + LN (Kobayashi 2021)", "C3", "-"),
)


def mixing_figure(mixing: pd.DataFrame, include_special: bool = False, seed: int = 0) -> Figure:
    """Share of each position's attention-block output that comes from *other* tokens, per
    layer, by three measures side by side (means with 95% bootstrap bands)."""
    data = mixing if include_special else mixing[~mixing["is_special"]]
    fig = Figure(figsize=(6.6, 4.2), layout="constrained")
    ax = fig.subplots()
    for column, label, colour, style in _MEASURES:
        layers, means, lows, highs = [], [], [], []
        for layer, group in data.groupby("layer", sort=True):
            values = group[column].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(values, seed=seed)
            layers.append(layer)
            means.append(float(np.mean(values)))
            lows.append(lo)
            highs.append(hi)
        ax.fill_between(layers, lows, highs, color=colour, alpha=0.2, lw=0)
        ax.plot(layers, means, color=colour, ls=style, marker="o", ms=3, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer k (output of block k-1)")
    ax.set_ylabel("mixing ratio (share from other tokens)")
    name = ", ".join(map(str, data["model"].unique()))
    ax.set_title(f"{name}: how much of each token's update comes from other tokens?", fontsize=9)
    ax.legend(fontsize=7.5, frameon=False)
    return fig


def mixing_heatmap_figure(pairs: pd.DataFrame, layer: int) -> Figure:
    """Target (rows) x source (columns) norm-based contribution shares of one text and layer."""
    data = pairs[pairs["layer"] == layer]
    if data.empty:
        raise ValueError(f"layer {layer} is not in the pair table")
    grid = data.pivot_table(index="target", columns="source", values="share", sort=True)
    tokens = data.drop_duplicates("target").set_index("target")["target_token"]
    labels = [f"{i}: {tokens[i]}" for i in grid.index]
    size = 1.5 + 0.32 * len(labels)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("source token j")
    ax.set_ylabel("target token i")
    fig.colorbar(image, ax=ax, label="share of |F_i(x_j)| in row i (diagonal: + residual)")
    name = ", ".join(map(str, data["model"].unique()))
    text_id = int(data["text_id"].iloc[0])
    ax.set_title(f"{name}: norm-based mixing, text {text_id}, layer {layer}", fontsize=9)
    return fig


def heads_figure(heads: pd.DataFrame, include_special: bool = False) -> Figure:
    """Layer x head map of each head's mean signed effect on the input-token projection
    (red: pushes toward the input token, blue: away). The output bias (head -1) is left out."""
    data = heads if include_special else heads[~heads["is_special"]]
    data = data[data["head"] >= 0]
    grid = data.pivot_table(index="layer", columns="head", values="proj_head", aggfunc="mean")
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig = Figure(
        figsize=(1.5 + 0.45 * grid.shape[1], 1.2 + 0.3 * grid.shape[0]), layout="constrained"
    )
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("head")
    ax.set_ylabel("layer k (output of block k-1)")
    fig.colorbar(image, ax=ax, label="mean Δ proj. on input token")
    name = ", ".join(map(str, data["model"].unique()))
    ax.set_title(f"{name}: which heads restore (+) or erode (−) token identity?", fontsize=9)
    return fig
