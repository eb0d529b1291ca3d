"""Figures of ``trace perturb``: pure functions from its tables to matplotlib figures.

Some also take one text's patterns. No model, no pyplot state, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.defaults import MOVING_MODES
from residual_trace.figures.tokens import clean_token

#: Perturbations that move tokens: their heads have a token-following index.
_MOVING = MOVING_MODES


@dataclass
class AttentionExample:
    """One text's patterns before and after one perturbation, for side-by-side heatmaps.

    ``original`` and ``perturbed`` map ``(block, head)`` to that head's ``[n, n]`` pattern
    (only the heads drawn are kept); ``permutation[i]`` is the new position of the token at
    position i.
    """

    tokens: list[str]
    perturbed_tokens: list[str]
    permutation: tuple[int, ...]
    label: str
    original: dict[tuple[int, int], np.ndarray]
    perturbed: dict[tuple[int, int], np.ndarray]


def index_heatmap_figure(heads: pd.DataFrame, kind: str) -> Figure:
    """Block x head map of the token-following index (red: tokens, blue: positions).

    For perturbations that do not move tokens, the map is of how much of each pattern survives.
    """
    data = heads[heads["perturbation"] == kind]
    moving = kind in _MOVING
    column = "follow_index" if moving else "sim_position"
    grid = data.pivot_table(
        index="block", columns="head", values=column, aggfunc="mean", dropna=False
    ).reindex(index=sorted(data["block"].unique()), columns=sorted(data["head"].unique()))
    fig = Figure(
        figsize=(2.2 + 0.45 * grid.shape[1], 1.4 + 0.32 * grid.shape[0]), layout="constrained"
    )
    ax = fig.subplots()
    if moving:
        image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
        label = "index (+1 tokens, −1 positions)"
        verdicts = data.set_index(["block", "head"])["verdict"]
        values = grid.to_numpy()
        for y, block in enumerate(grid.index):
            for x, head in enumerate(grid.columns):
                mark = {"token": "T", "position": "P"}.get(verdicts.get((block, head), ""), "")
                colour = "white" if abs(values[y, x]) > 0.6 else "0.15"
                ax.text(x, y, mark, ha="center", va="center", fontsize=6, color=colour)
        marked = data["verdict"].isin(["token", "position"]).any()
        several = int(data["n_texts"].max()) > 1 if "n_texts" in data else True
        title = f"{kind}: does each head follow tokens or positions?" + (
            " (T/P: 95% CI clear of 0)" if marked else "" if several else " (one text: no verdicts)"
        )
    else:
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        label = "pattern kept (1 − JS distance)"
        title = f"{kind}: how much of each head's pattern survives without its tokens?"
    ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"L{b}" for b in grid.index])
    ax.set_xlabel("head (L<block>H<head>)")
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label=label)
    name = ", ".join(map(str, data["model"].unique()))
    ax.set_title(f"{name}, {title}", fontsize=8.5)
    return fig


def layers_figure(summary: pd.DataFrame, resid_summary: pd.DataFrame, kind: str) -> Figure:
    """Attention per block (left) and residual-stream cosines per layer (right).

    Left, per block: the attention measure with its 95% interval and the noise floor. Right, per
    residual layer: the residual stream's cosine to the same token vs the same position.
    """
    heads = summary[summary["perturbation"] == kind].sort_values("block")
    data = resid_summary[resid_summary["perturbation"] == kind].sort_values("layer")
    moving = kind in _MOVING
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    column = "follow_index" if moving else "sim_position"
    left.fill_between(
        heads["block"], heads[f"{column}_lo"], heads[f"{column}_hi"], alpha=0.25, lw=0
    )
    left.plot(heads["block"], heads[column], marker="o", ms=3, label=f"mean over heads ({kind})")
    if moving:
        floor = heads["noise_floor"].to_numpy(dtype=float)
        largest = float(np.nanmax(floor)) if np.isfinite(floor).any() else float("nan")
        if largest >= 0.01:
            left.fill_between(heads["block"], -floor, floor, color="0.5", alpha=0.3, lw=0,
                              label="noise floor")  # fmt: skip
        elif largest == largest:
            left.text(0.02, 0.02, f"noise floor: at most {largest:.1g} (too small to draw)",
                      transform=left.transAxes, fontsize=7, color="0.3")  # fmt: skip
        left.axhline(0.0, color="0.4", lw=0.8)
        left.set_ylim(-1.02, 1.02)
        left.set_ylabel("token-following index (+1 tokens, −1 positions)")
    else:
        left.set_ylim(-0.02, 1.02)
        left.set_ylabel("pattern kept (1 − JS distance)")
    left.set_xlabel("block")
    left.legend(fontsize=7.5, frameon=False)
    left.set_title("attention", fontsize=9)
    for variant, style in (("cos_token", "-"), ("cos_position", "--")):
        values = data[variant]
        if not np.isfinite(values).any():
            continue
        right.fill_between(
            data["layer"], data[f"{variant}_lo"], data[f"{variant}_hi"], alpha=0.2, lw=0
        )
        what = "same token (moved with it)" if variant == "cos_token" else "same position"
        right.plot(data["layer"], values, ls=style, marker="o", ms=3, label=what)
    right.set_xlabel("layer (0 = embeddings)")
    right.set_ylabel("cosine of perturbed state to original state")
    right.set_title("residual stream", fontsize=9)
    right.legend(fontsize=7.5, frameon=False)
    name = ", ".join(map(str, heads["model"].unique()))
    spread = (heads[f"{column}_hi"] - heads[f"{column}_lo"]).abs().max()
    what = "mean with 95% bootstrap interval over texts" if spread > 0 else "one text: no interval"
    fig.suptitle(f"{name}: {kind}, {what}", fontsize=9.5)
    return fig


def structure_figure(summary: pd.DataFrame, kind: str) -> Figure:
    """Per block, the structure measures of the original and of the perturbed patterns.

    The measures are means over heads; they show how structured attention still looks with
    meaningless tokens.
    """
    data = summary[summary["perturbation"] == kind]
    measures = [
        ("entropy", "entropy (bits)"),
        ("diag_mass", "attention to itself"),
        ("prev_mass", "attention to previous token"),
        ("special_mass", "attention to special tokens"),
    ]
    fig = Figure(figsize=(12.0, 3.2), layout="constrained")
    axes = fig.subplots(1, len(measures))
    for ax, (column, label) in zip(axes, measures, strict=True):
        ax.plot(data["block"], data[column], marker="o", ms=3, label="original")
        ax.plot(data["block"], data[f"{column}_perturbed"], ls="--", marker="o", ms=3, label=kind)
        ax.set_xlabel("block")
        ax.set_title(label, fontsize=8.5)
        if column != "entropy":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7.5, frameon=False)
    name = ", ".join(map(str, data["model"].unique()))
    fig.suptitle(f"{name}: attention structure, original vs {kind} (mean over heads)", fontsize=9.5)
    return fig


#: Attention panels label at most this many tokens per axis (every k-th on long texts) ...
MAX_LABELLED_TOKENS = 48
#: ... and are at most this many inches square: memory stays bounded at any length.
MAX_PANEL_INCHES = 8.0


def attention_pairs_figure(
    example: AttentionExample, heads: Sequence[tuple[int, int]], model: str, text_id: int
) -> Figure:
    """For each chosen head (block, head): the original pattern and the perturbed one.

    When tokens moved, also the perturbed one re-ordered back into the original token order (a head
    that follows tokens looks like the original there; one that follows positions looks like the
    original in the middle panel).
    """
    moved = list(example.permutation) != list(range(len(example.permutation)))
    columns = 3 if moved else 2
    n = len(example.tokens)
    # bounded canvas at any length: panels at most MAX_PANEL_INCHES, every k-th token labelled
    size = min(MAX_PANEL_INCHES, 1.6 + 0.22 * n)
    shown = list(range(0, n, max(1, math.ceil(n / MAX_LABELLED_TOKENS))))
    fig = Figure(figsize=(columns * size + 1.0, len(heads) * size + 0.6), layout="constrained")
    axes = fig.subplots(len(heads), columns, squeeze=False)
    order = np.asarray(example.permutation)
    label = re.sub(r" seed \d+", "", example.label)  # the seed is in run.json, not the title
    tokens = [clean_token(t) for t in example.tokens]
    moved_tokens = [clean_token(t) for t in example.perturbed_tokens]
    for row, (block, head) in enumerate(heads):
        original = example.original[(block, head)]
        perturbed = example.perturbed[(block, head)]
        panels = [(original, tokens, "original"), (perturbed, moved_tokens, label)]
        if moved:
            panels.append((perturbed[order][:, order], tokens, "perturbed, token order"))
        for ax, (grid, labels, title) in zip(axes[row], panels, strict=True):
            image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=6.5)
            ax.set_yticks(shown, [labels[i] for i in shown], fontsize=6.5)
            ax.set_title(f"L{block}H{head}: {title}", fontsize=8)
        fig.colorbar(image, ax=axes[row, -1], label="attention", shrink=0.8)
    fig.suptitle(f"{model}, text {text_id}: rows attend (queries) to columns (keys)", fontsize=9)
    return fig
