"""Attention-vs-MLP figures: pure functions from the decomposition tables to a Figure."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.figures.tokens import clean_token
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


def _drawn(summary: pd.DataFrame, columns) -> list:
    """The series worth a bar: a part that is 0 at every block (carried, pre-norm) is left out."""
    return [c for c in columns if np.nanmax(np.abs(summary[c[0]].to_numpy(float))) > 1e-6]


def block_ticks(ax, blocks: np.ndarray, most: int = 16) -> None:
    """Every block a tick, a label on every k-th so that at most ``most`` labels show."""
    step = max(1, math.ceil(len(blocks) / most))
    ax.set_xticks(blocks)
    ax.set_xticklabels([str(b) if i % step == 0 else "" for i, b in enumerate(blocks)])


def clipped_limits(low: np.ndarray, high: np.ndarray) -> tuple[float, float] | None:
    """Y limits that keep outliers from flattening the rest, or ``None`` when all fit.

    An axis is clipped when its largest extent is more than 4x the next-largest one after
    the two largest blocks (so one or two spikes, e.g. block 0 of a decoder, do not hide the
    other blocks); the clipped bars are annotated with their value.
    """
    extent = np.nan_to_num(np.maximum(np.abs(low), np.abs(high)))
    if extent.size < 6:
        return None
    order = np.sort(extent)[::-1]
    rest = order[2]
    if rest <= 0 or order[0] <= 4 * rest:
        return None
    bound = 1.35 * rest
    return (-bound if np.nanmin(low) < 0 else 0.0), bound


def _bars(ax, summary: pd.DataFrame, columns) -> None:
    blocks = summary["block"].to_numpy()
    columns = _drawn(summary, columns)
    width = 0.8 / len(columns)
    lows = np.concatenate([summary[f"{c}_lo"].to_numpy(float) for c, _, _ in columns])
    highs = np.concatenate([summary[f"{c}_hi"].to_numpy(float) for c, _, _ in columns])
    limits = clipped_limits(np.minimum(lows, 0), highs)
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
        if limits is not None:
            _annotate_clipped(ax, offsets, means, limits)
    if limits is not None:
        ax.set_ylim(*limits)
    block_ticks(ax, blocks)
    ax.set_xlabel(BLOCK_LABEL)
    note = "axis clipped: the value\nof a longer bar is on it" if limits else None
    ax.legend(fontsize=8, frameon=False, title=note, title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), alignment="left")  # fmt: skip


def _annotate_clipped(ax, x: np.ndarray, values: np.ndarray, limits: tuple[float, float]) -> None:
    """Write the value of every bar that leaves the axis, at the edge it leaves by."""
    low, high = limits
    for position, value in zip(x, values, strict=True):
        if value > high or value < low:
            edge = high if value > high else low
            ax.annotate(
                f"{value:.1f}",
                (position, edge),
                xytext=(0, -3 if value > high else 3),
                textcoords="offset points",
                ha="center",
                va="top" if value > high else "bottom",
                fontsize=7,
                rotation=90,
                color="0.1",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
            )


def sublayer_figure(summary: pd.DataFrame) -> Figure:
    """Two panels of bars per block: each sublayer's update size and its input-token effect.

    The top panel is the relative size of each sublayer's update; the bottom one is its signed
    effect on the state's projection onto the unit input-token direction. Both show the
    summary's 95% bootstrap intervals (:func:`residual_trace.tracer.decompose_summary`).
    """
    if summary.empty:
        raise ValueError("no tokens to plot (only special tokens? try include_special=True)")
    fig = Figure(figsize=(9.0, 7.0), layout="constrained")
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
    """Share of the last layer's squared norm from each source.

    The embedding, then per block its attention and MLP parts side by side, then the biases
    (``share`` of ``cumulative.csv``).
    """
    last = cumulative[cumulative["layer"] == cumulative["layer"].max()]
    parts = last[last["source"] != "embed"]
    blocks = np.sort(parts["source_block"].dropna().astype(int).unique())
    fig = Figure(figsize=(min(11.0, max(5.5, 0.3 * len(blocks) + 3)), 3.8), layout="constrained")
    ax = fig.subplots()
    embed = last.loc[last["source"] == "embed", "share"]
    if len(embed):
        ax.bar([-1.2], embed.to_numpy(), width=0.8, color="C2", label="embedding")
        ax.annotate(f"{embed.sum():.3f}", (-1.2, embed.sum()), xytext=(0, 2),
                    textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
    for offset, suffix, colour, label in (
        (-0.2, "_attn", "C0", "attention"),
        (0.2, "_mlp", "C1", "MLP"),
    ):
        rows = parts[parts["source"].str.endswith(suffix)]
        ax.bar(rows["source_block"].astype(int) + offset, rows["share"], width=0.4, color=colour,
               label=f"block's {label} output")  # fmt: skip
    bias = parts.loc[~parts["source"].str.endswith(("_attn", "_mlp")), "share"]
    end = (blocks.max() if len(blocks) else 0) + 1.2
    if len(bias):
        ax.bar([end], [bias.sum()], width=0.8, color="0.5", label="biases (no source block)")
        ax.annotate(f"{bias.sum():.3f}", (end, bias.sum()), xytext=(0, 2),
                    textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
    step = max(1, math.ceil(len(blocks) / 16))
    ticks = [-1.2, *blocks, *([end] if len(bias) else [])]
    names = ["emb", *(str(b) if i % step == 0 else "" for i, b in enumerate(blocks))]
    ax.set_xticks(ticks, names + (["bias"] if len(bias) else []))
    ax.axhline(0.0, color="0.3", lw=0.6)
    ax.set_xlabel("source: the embedding, block b's parts, the biases")
    ax.set_ylabel("share of |h|²  (part · h / |h|²)")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    layer = int(last["layer"].max()) if len(last) else 0
    ax.set_title(
        f"{_name(last)}: where the state at layer {layer} (the last) comes from", fontsize=9
    )
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


#: The panels of the mixing figure: measures of one kind each (at most four lines a panel).
MIXING_PANELS = (
    ("this block, from attention weights", ("mix_raw", "mix_attn_n", "mix_attnres_n",
                                            "mix_attnresln_n")),
    ("this block, from the block's output", ("mix_vz",)),
    ("rolled out over blocks 0..b", ("mix_rollout", "mix_globenc", "mix_alti", "mix_vz_rollout")),
)  # fmt: skip
_PANEL_COLOURS = ("C0", "C1", "C2", "C3")


def mixing_figure(summary: pd.DataFrame) -> Figure:
    """Share of each position's attention-block output from *other* tokens, per block.

    One panel per kind of measure (:data:`MIXING_PANELS`): means with the summary's 95%
    bootstrap bands. A measure with no value (AttnResLn-N without a norm after the sum,
    Value Zeroing beyond its length limit) is named in its panel as not drawn.
    """
    fig = Figure(figsize=(13.0, 3.9), layout="constrained")
    axes = fig.subplots(1, len(MIXING_PANELS), sharey=True)
    blocks = summary["block"].to_numpy()
    legends = {m.column: m.legend for m in DISPLAYED}
    for ax, (title, columns) in zip(axes, MIXING_PANELS, strict=True):
        missing = []
        for column, colour in zip(columns, _PANEL_COLOURS, strict=False):
            if not np.isfinite(summary[column].to_numpy(float)).any():
                missing.append(legends[column])
                continue
            ax.fill_between(blocks, summary[f"{column}_lo"], summary[f"{column}_hi"],
                            color=colour, alpha=0.2, lw=0)  # fmt: skip
            ax.plot(blocks, summary[column], color=colour, marker="o", ms=3,
                    label=legends[column])  # fmt: skip
        ax.set_ylim(-0.02, 1.02)
        block_ticks(ax, blocks, most=10)
        ax.set_xlabel(BLOCK_LABEL)
        ax.set_title(title, fontsize=9)
        if missing:
            ax.text(0.02, 0.02, "not drawn (no value): " + ", ".join(missing),
                    transform=ax.transAxes, fontsize=7, color="0.35")  # fmt: skip
        ax.legend(fontsize=7.5, frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.08),
                  ncol=1, borderaxespad=0.0)  # fmt: skip
    axes[0].set_ylabel("mixing ratio (share from other tokens)")
    fig.suptitle(
        f"{_name(summary)}: how much of each token's update comes from other tokens? "
        "(mean over tokens, 95% bootstrap band)",
        fontsize=9,
    )
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
    labels = [f"{i}: {clean_token(str(tokens[i]))}" for i in grid.index]
    # bounded canvas at any length: every k-th token labelled, at most MAX_MAP_INCHES wide
    step = max(1, math.ceil(len(labels) / MAX_LABELLED_TOKENS))
    size = min(MAX_MAP_INCHES, max(4.5, 1.5 + 0.32 * len(labels)))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    shown = list(range(0, len(labels), step))
    ax.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=7)
    ax.set_yticks(shown, [labels[i] for i in shown], fontsize=7)
    ax.set_xlabel("source token j")
    ax.set_ylabel("target token i")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("share of row i from source j\n(diagonal: with the residual)", fontsize=8)
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
        figsize=(max(5.0, 1.8 + 0.45 * grid.shape[1]), 1.4 + 0.3 * grid.shape[0]),
        layout="constrained",
    )
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    step = max(1, math.ceil(grid.shape[0] / 32))
    ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in grid.columns])
    ax.set_yticks(range(0, grid.shape[0], step), [f"L{b}" for b in grid.index[::step]])
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="mean Δ projection on the input token")
    title = (
        f"{_name(head_summary)}: which heads restore (+) or erode (−) token identity? "
        "(mean over tokens)"
    )
    ax.set_title(textwrap.fill(title, int(fig.get_figwidth() * 10)), fontsize=9)
    return fig
