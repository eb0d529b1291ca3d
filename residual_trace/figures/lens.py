"""Lens figures: pure functions from the lens tables to a matplotlib figure.

``lens_curves_figure`` draws the per-layer summary (KL to the model's output, next-token
top-1, input-token top-1) with 95% bands and the nulls; ``lens_grid_figure`` the classic
logit-lens picture of one text (positions x layers, each cell the top token, coloured by its
probability). No model, no pyplot state, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.figures.drift import LAYER_LABEL
from residual_trace.figures.tokens import clean_token

#: The grid draws at most this many positions (the first ones) ...
MAX_GRID_POSITIONS = 32
#: ... and at most this many layers (evenly spaced, the last always kept).
MAX_GRID_LAYERS = 40
#: Longest cell text, in characters (longer tokens end in an ellipsis).
MAX_CELL_CHARS = 7

_COLOURS = {"logit": "#1f77b4", "tuned": "#d62728", "mlm": "#2ca02c"}


def _short(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def lens_curves_figure(summary: pd.DataFrame, decoder: bool) -> Figure:
    """Per layer: KL(model output || lens), and top-1 accuracies, one line per lens.

    Solid lines read the residual states (site ``post``); dotted lines the state between
    attention and MLP (``mid``), where read. Bands are the 95% bootstrap intervals of the
    mean over positions; the grey dashed lines are the nulls (the texts' unigram
    distribution for KL, always the most frequent next token for next-token top-1).
    """
    panels: list[tuple[str, str, str | None, str | None]] = [
        ("kl_final", "KL(output || lens), nats", "kl_unigram", "unigram (reads nothing)")
    ]
    if decoder:
        panels.append(
            ("next_top1", "next token is the top-1", "next_top1_null", "most frequent next")
        )
    panels.append(("identifiable", "input token is the top-1", None, None))
    figure = Figure(figsize=(4.6 * len(panels), 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, label, null, null_label) in zip(axes, panels, strict=True):
        for (lens, site), group in summary.groupby(["lens", "site"], sort=False):
            group = group.sort_values("layer")
            x = group["layer"].to_numpy(dtype=float) + (0.5 if site == "mid" else 0.0)
            y = group[column].to_numpy(dtype=float)
            if not np.isfinite(y).any():
                continue
            colour = _COLOURS.get(str(lens), "#555555")
            style = "-" if site == "post" else ":"
            name = f"{lens}" if site == "post" else f"{lens} (mid)"
            ax.plot(x, y, style, color=colour, marker=".", label=name)
            ax.fill_between(
                x, group[f"{column}_lo"], group[f"{column}_hi"], color=colour, alpha=0.18, lw=0
            )
        if column == "identifiable":
            _draw_geometry(ax, summary)
        if null is not None:
            post = summary[summary["site"] == "post"].sort_values("layer")
            first = post[post["lens"] == post["lens"].iloc[0]] if len(post) else post
            values = first[null].to_numpy(dtype=float)
            if np.isfinite(values).any():
                ax.plot(first["layer"], values, "--", color="grey", label=f"null: {null_label}")
        has_mid = bool((summary["site"] == "mid").any())
        ax.set_xlabel(
            "layer (mid: between block k's attention and MLP, at k + 0.5)" if has_mid else "layer"
        )
        if column == "kl_final":
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel(label)
        if column != "kl_final":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    model = ", ".join(map(str, summary["model"].unique())) or "model"
    figure.suptitle(f"{model}: lenses per layer (bands: 95% bootstrap intervals)", fontsize=11)
    return figure


def _draw_geometry(ax: Any, summary: pd.DataFrame) -> None:
    """The geometric answer beside the lens's: ``trace layers``' nearest-row identifiability."""
    if "nn_identifiable" not in summary:
        return
    post = summary[summary["site"] == "post"].sort_values("layer")
    first = post[post["lens"] == post["lens"].iloc[0]] if len(post) else post
    if not np.isfinite(first["nn_identifiable"].to_numpy(dtype=float)).any():
        return
    label = "nearest embedding row (trace layers)"
    ax.plot(first["layer"], first["nn_identifiable"], "-", color="black", lw=1.2, marker="x",
            ms=4, label=label)  # fmt: skip
    low, high = first["nn_identifiable_lo"], first["nn_identifiable_hi"]
    ax.fill_between(first["layer"], low, high, color="black", alpha=0.1, lw=0)


def _grid_layers(layers: np.ndarray) -> np.ndarray:
    if len(layers) <= MAX_GRID_LAYERS:
        return layers
    picks = np.unique(np.linspace(0, len(layers) - 1, MAX_GRID_LAYERS).round().astype(int))
    return layers[picks]


def lens_grid_figure(table: pd.DataFrame, text_id: int = 0, lens: str | None = None) -> Figure:
    """The logit-lens grid of one text: positions across, layers up, the top token in each cell.

    Colour is the top token's probability under the lens (0 to 1); the x labels are the
    input tokens (tokenizer markers removed), the first :data:`MAX_GRID_POSITIONS` positions
    of a longer text. Only ``post`` states of one lens (the first in the table by default).
    """
    rows = table[(table["text_id"] == text_id) & (table["site"] == "post")]
    lens = lens or (str(rows["lens"].iloc[0]) if len(rows) else "")
    rows = rows[rows["lens"] == lens]
    n_positions = int(rows["position"].max()) + 1 if len(rows) else 0
    rows = rows[rows["position"] < MAX_GRID_POSITIONS]
    layers = _grid_layers(np.sort(rows["layer"].unique()))
    rows = rows[rows["layer"].isin(layers)]
    positions = np.sort(rows["position"].unique())
    prob = rows.pivot(index="layer", columns="position", values="top_prob").reindex(
        index=layers, columns=positions
    )
    top = rows.pivot(index="layer", columns="position", values="top_token").reindex(
        index=layers, columns=positions
    )
    inputs = rows.drop_duplicates("position").set_index("position")["token"].reindex(positions)
    width = min(22.0, 1.6 + 0.62 * max(1, len(positions)))
    height = min(16.0, 1.6 + 0.3 * max(1, len(layers)))
    figure = Figure(figsize=(width, height), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(
        prob.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1
    )
    for i in range(len(layers)):
        for j in range(len(positions)):
            value = prob.iat[i, j]
            if not np.isfinite(value):
                continue
            text = _short(clean_token(str(top.iat[i, j])))
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                    color="black" if value > 0.6 else "white")  # fmt: skip
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([_short(clean_token(str(t))) for t in inputs], rotation=60, fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(int(k)) for k in layers], fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel(LAYER_LABEL.split(" (")[0])
    figure.colorbar(image, ax=ax, label=f"probability of the top token ({lens} lens)", shrink=0.8)
    shown = (
        f"first {len(positions)} of {n_positions} positions"
        if n_positions > len(positions)
        else f"{n_positions} positions"
    )
    model = ", ".join(map(str, table["model"].unique())) or "model"
    ax.set_title(f"{model}: {lens} lens, text {text_id} ({shown}); cell = top token", fontsize=10)
    return figure


def training_figure(training: pd.DataFrame, model: str) -> Figure:
    """KL(output || tuned lens) per training step, for five layers spread over the depth."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    layers = np.sort(training["layer"].unique())
    picks = layers[
        np.unique(np.linspace(0, len(layers) - 1, min(5, len(layers))).round().astype(int))
    ]
    colours = ["#440154", "#3b528b", "#21918c", "#5ec962", "#c8a000"]
    for colour, layer in zip(colours, picks, strict=False):
        rows = training[training["layer"] == layer]
        ax.plot(rows["step"], rows["kl"], color=colour, marker=".", label=f"layer {int(layer)}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("KL(output || tuned lens), nats (training batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="translator", title_fontsize=8)
    ax.set_title(f"{model}: tuned-lens training (step 1 = the logit lens)", fontsize=10)
    return figure


def heldout_figure(summary: pd.DataFrame, model: str) -> Figure:
    """Held-out KL(output || lens) per layer: the logit lens against the tuned lens."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = figure.subplots()
    for lens, group in summary.groupby("lens", sort=True):
        group = group.sort_values("layer")
        colour = _COLOURS.get(str(lens), "#555555")
        ax.plot(group["layer"], group["kl"], color=colour, marker=".", label=f"{lens} lens")
        ax.fill_between(group["layer"], group["kl_lo"], group["kl_hi"], color=colour,
                        alpha=0.2, lw=0)  # fmt: skip
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(output || lens), nats")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{model}: held-out texts (bands: 95% bootstrap intervals)", fontsize=10)
    return figure
