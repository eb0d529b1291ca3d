"""Figures of ``trace report``: several models on one relative-depth axis (layer / blocks).

They are drawn from the report's per-layer table (one row per model x layer).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.figures.decompose import clipped_limits
from residual_trace.probes import CONDITIONS
from residual_trace.tracer.mixing_measures import measure

DEPTH_LABEL = "relative depth (layer / number of blocks)"
_STYLES = ("-", "--", "-.", ":")


def _models(depth: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str]]:
    out = []
    for k, (model, rows) in enumerate(depth.groupby("model", sort=False)):
        out.append((str(model), rows.sort_values("layer"), _STYLES[k % len(_STYLES)]))
    return out


def depth_figure(depth: pd.DataFrame, column: str) -> Figure:
    """``cos_input`` (with its interval and the baseline) or ``identifiable`` per model."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for k, (model, rows, style) in enumerate(_models(depth)):
        colour = f"C{k}"
        family = rows["family"].iloc[0]
        ax.plot(
            rows["depth"],
            rows[column],
            color=colour,
            ls=style,
            marker="o",
            ms=2.5,
            label=f"{model} ({family})",
        )
        if f"{column}_lo" in rows:
            ax.fill_between(
                rows["depth"],
                rows[f"{column}_lo"],
                rows[f"{column}_hi"],
                color=colour,
                alpha=0.2,
                lw=0,
            )
        if column == "cos_input" and "baseline" in rows:
            ax.plot(
                rows["depth"],
                rows["baseline"],
                color=colour,
                ls=":",
                lw=1,
                label=f"{model} baseline",
            )
    ax.set_xlabel(DEPTH_LABEL)
    ax.set_ylabel(
        {
            "cos_input": "cosine to the input token's embedding",
            "identifiable": "share identifiable (own token nearest)",
        }.get(column, column)
    )
    ax.set_xlim(-0.02, 1.02)
    if column == "identifiable":  # a share: a 5-point drop must not fill the axis
        ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7.5, frameon=False)
    return fig


def sublayer_figure(depth: pd.DataFrame) -> Figure:
    """Mean signed effect of the attention and the MLP sublayer on the input-token projection."""
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, part in zip(axes, ("proj_attn", "proj_mlp"), strict=True):
        for k, (model, rows, style) in enumerate(_models(depth)):
            rows = rows[rows["layer"] > 0]
            ax.plot(
                rows["depth"], rows[part], color=f"C{k}", ls=style, marker="o", ms=2.5, label=model
            )
            ax.fill_between(
                rows["depth"],
                rows[f"{part}_lo"],
                rows[f"{part}_hi"],
                color=f"C{k}",
                alpha=0.2,
                lw=0,
            )
        ax.axhline(0.0, color="0.4", lw=0.7)
        ax.set_title("attention" if part == "proj_attn" else "MLP", fontsize=9)
        ax.set_xlabel(DEPTH_LABEL)
    later = depth[depth["layer"] > 0]
    low = np.concatenate([later[f"{p}_lo"].to_numpy(float) for p in ("proj_attn", "proj_mlp")])
    high = np.concatenate([later[f"{p}_hi"].to_numpy(float) for p in ("proj_attn", "proj_mlp")])
    label = "Δ projection on the input token\n(+ restores, − erodes)"
    if clipped_limits(np.minimum(low, 0), high) is not None:
        # one model's spike would flatten the others: linear within ±1, logarithmic beyond
        axes[0].set_yscale("symlog", linthresh=1.0)
        label += "; symlog axis,\nlinear within ±1"
    axes[0].set_ylabel(label)
    axes[0].legend(fontsize=7.5, frameon=False)
    return fig


def mixing_figure(depth: pd.DataFrame) -> Figure:
    """Context mixing per model, one panel per measure.

    The measures are raw attention, norm-based (AttnRes-N: residual included, defined for
    every family), attention rollout, GlobEnc, ALTI and Value Zeroing.
    """
    fig = Figure(figsize=(11, 6.6), layout="constrained")
    axes = fig.subplots(2, 3, sharey=True, sharex=True).ravel()
    # one measure of each kind, defined for every family; names from the table of measures
    shown = ("mix_raw", "mix_attnres_n", "mix_rollout", "mix_globenc", "mix_alti", "mix_vz")
    titles = {column: measure(column).legend for column in shown}
    for ax, (column, title) in zip(axes, titles.items(), strict=True):
        for k, (model, rows, style) in enumerate(_models(depth)):
            rows = rows[rows["layer"] > 0]
            ax.plot(
                rows["depth"],
                rows[column],
                color=f"C{k}",
                ls=style,
                marker="o",
                ms=2.5,
                label=model,
            )
            if column == "mix_attnres_n":
                ax.fill_between(
                    rows["depth"],
                    rows["mix_attnres_n_lo"],
                    rows["mix_attnres_n_hi"],
                    color=f"C{k}",
                    alpha=0.2,
                    lw=0,
                )
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    for ax in axes[3:]:
        ax.set_xlabel(DEPTH_LABEL)
    for ax in axes[::3]:
        ax.set_ylabel("share from other tokens")
    axes[0].legend(fontsize=7.5, frameon=False)
    fig.suptitle("context mixing per block (band: 95% interval, AttnRes-N)", fontsize=9.5)
    return fig


def index_figure(depth: pd.DataFrame, mode: str) -> Figure:
    """Mean token-following index of the heads per block, with its interval.

    Each block is placed at the depth of the layer it writes.
    """
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for k, (model, rows, style) in enumerate(_models(depth)):
        rows = rows[rows["layer"] > 0]
        ax.plot(
            rows["depth"],
            rows["follow_index"],
            color=f"C{k}",
            ls=style,
            marker="o",
            ms=2.5,
            label=model,
        )
        ax.fill_between(
            rows["depth"],
            rows["follow_index_lo"],
            rows["follow_index_hi"],
            color=f"C{k}",
            alpha=0.2,
            lw=0,
        )
    ax.axhline(0.0, color="0.4", lw=0.7)
    ax.set_ylim(-1.02, 1.02)
    ax.set_xlabel(DEPTH_LABEL)
    ax.set_ylabel("token-following index")
    ax.set_title(f"{mode}: +1 heads follow tokens, −1 positions (mean over heads)", fontsize=9)
    ax.legend(fontsize=7.5, frameon=False)
    return fig


def probe_figure(summary: pd.DataFrame) -> Figure:
    """Per model, the probe and its controls at the deepest layer probed.

    The first mapper is shown, with NA@10 where it applies, else the first metric.
    """
    metric = "na_at_10" if "na_at_10" in set(summary["metric"]) else str(summary["metric"].iloc[0])
    mapper = str(summary["mapper"].iloc[0])
    data = summary[(summary["metric"] == metric) & (summary["mapper"] == mapper)]
    models = list(dict.fromkeys(data["model"]))
    conditions = [c for c in CONDITIONS if c in set(data["condition"])]
    fig = Figure(
        figsize=(1.5 + 1.1 * len(conditions) * max(1, len(models)) / 1.6, 4.0), layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        rows = data[data["model"] == model]
        rows = rows[rows["layer"] == rows["layer"].max()].set_index("condition").reindex(conditions)
        x = np.arange(len(conditions)) + (k - (len(models) - 1) / 2) * width
        errors = np.vstack([rows["score"] - rows["score_lo"], rows["score_hi"] - rows["score"]])
        ax.bar(
            x,
            rows["score"],
            width,
            yerr=np.nan_to_num(errors),
            color=f"C{k}",
            capsize=2,
            label=f"{model} (layer {int(data[data['model'] == model]['layer'].max())})",
        )
    ax.set_xticks(range(len(conditions)), conditions, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} ({mapper})")
    ax.axhline(0.0, color="0.4", lw=0.6)
    ax.legend(fontsize=7.5, frameon=False)
    return fig


def lens_figure(lens: pd.DataFrame) -> Figure:
    """Each model's lenses on one relative-depth axis, with the nulls.

    Left: KL(model output || lens) in nats (symlog; dotted: the unigram null of each model);
    middle: the share of positions whose input token is the lens's top token, beside the
    nearest-embedding-row answer of ``trace layers`` (thin, x marks); right (when a decoder is
    in the report): the share whose next token is the top token, with the most-frequent-next
    null (dotted). Colour is the model, line style the lens; bands are 95% intervals.
    """
    decoders = lens[lens["family"] != "encoder"]
    panels = ["kl_final", "identifiable"] + (["next_top1"] if len(decoders) else [])
    fig = Figure(figsize=(3.9 * len(panels), 3.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    lens_styles = {"logit": "-", "mlm": "-", "tuned": "--"}
    nulls = {"kl_final": "kl_unigram", "next_top1": "next_top1_null"}
    for ax, column in zip(axes, panels, strict=True):
        for k, (model, rows, _) in enumerate(_models(lens)):
            colour = f"C{k}"
            for name, group in rows.groupby("lens", sort=False):
                group = group.sort_values("layer")
                if not group[column].notna().any():
                    continue
                style = lens_styles.get(str(name), "-.")
                ax.plot(group["depth"], group[column], color=colour, ls=style, marker="o", ms=2.5,
                        label=f"{model}: {name} lens")  # fmt: skip
                ax.fill_between(group["depth"], group[f"{column}_lo"], group[f"{column}_hi"],
                                color=colour, alpha=0.18, lw=0)  # fmt: skip
            first = rows[rows["lens"] == rows["lens"].iloc[0]].sort_values("layer")
            if column in nulls and first[nulls[column]].notna().any():
                ax.plot(first["depth"], first[nulls[column]], color=colour, ls=":", lw=1.2,
                        label=f"{model}: null")  # fmt: skip
            if column == "identifiable" and first["nn_identifiable"].notna().any():
                ax.plot(first["depth"], first["nn_identifiable"], color=colour, lw=0.8,
                        marker="x", ms=3.5, label=f"{model}: nearest embedding row")  # fmt: skip
        ax.set_xlabel(DEPTH_LABEL)
        ax.set_xlim(-0.02, 1.02)
        if column == "kl_final":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(
            {
                "kl_final": "KL(model output || lens), nats",
                "identifiable": "input token is the lens's top-1",
                "next_top1": "next token is the lens's top-1",
            }[column]
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    return fig
