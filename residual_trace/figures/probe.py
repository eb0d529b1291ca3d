"""Figures of ``trace probe``: pure functions of its summary table.

The table has one row per model x norms x embedding x layer x mapper x metric x condition,
with ``mean``, ``lo``, ``hi``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from residual_trace.probes import CONDITIONS

_COLOURS = {
    "system": "#1f77b4",
    "upper": "#2ca02c",
    "shuffled": "#d62728",
    "shuffled-upper": "#ff9896",
    "random": "#7f7f7f",
    "taxonomic": "#9467bd",
    "nonsense": "#8c564b",
    "random-init": "#e377c2",
}
_METRIC = {
    "f1_at_10": "F1@10",
    "spearman": "Spearman ρ per concept",
    "spearman_feature": "Spearman ρ per feature",
    "na_at_10": "Neighbourhood Acc.@10",
}


def conditions_figure(summary: pd.DataFrame) -> Figure:
    """The paper's table as a picture, at the deepest layer probed.

    Per norm set and metric, a bar per condition and mapper with its 95% interval.
    """
    layer = int(summary["layer"].max())
    data = summary[summary["layer"] == layer]
    panels = list(data.groupby(["norms", "metric"], sort=False))
    mappers = list(dict.fromkeys(data["mapper"]))
    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    width = 0.8 / len(mappers)
    for ax, ((norms, metric), part) in zip(axes, panels, strict=True):
        conditions = [c for c in CONDITIONS if c in set(part["condition"])]
        for k, mapper in enumerate(mappers):
            rows = part[part["mapper"] == mapper].set_index("condition").reindex(conditions)
            x = np.arange(len(conditions)) + (k - (len(mappers) - 1) / 2) * width
            errors = np.vstack([rows["score"] - rows["score_lo"], rows["score_hi"] - rows["score"]])
            ax.bar(
                x,
                rows["score"],
                width,
                yerr=np.nan_to_num(errors),
                color=[_COLOURS[c] for c in conditions],
                alpha=1.0 if k == 0 else 0.55,
                edgecolor="black",
                linewidth=0.4,
                capsize=2,
                label=mapper,
            )
        ax.set_xticks(range(len(conditions)), conditions, rotation=45, ha="right", fontsize=7.5)
        ax.set_ylabel(_METRIC.get(metric, metric))
        ax.set_title(f"{norms}: {_METRIC.get(metric, metric)}", fontsize=9)
        ax.axhline(0.0, color="0.3", lw=0.6)
    axes[0].legend(title="mapper (dark, light)", fontsize=7, title_fontsize=7, frameon=False)
    name = ", ".join(map(str, data["model"].unique()))
    fig.suptitle(
        f"{name}, layer {layer}: the probe next to its controls (95% intervals)", fontsize=9.5
    )
    return fig


def layers_figure(summary: pd.DataFrame) -> Figure:
    """Probe score per layer over the control conditions drawn as bands.

    The system is drawn as a line with its interval; one panel per norm set and metric, the
    first mapper.
    """
    mapper = str(summary["mapper"].iloc[0])
    data = summary[summary["mapper"] == mapper]
    panels = list(data.groupby(["norms", "metric"], sort=False))
    fig = Figure(figsize=(4.4 * len(panels), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, ((norms, metric), part) in zip(axes, panels, strict=True):
        for condition in CONDITIONS:
            rows = part[part["condition"] == condition].sort_values("layer")
            if rows.empty:
                continue
            colour = _COLOURS[condition]
            if condition == "system":
                ax.plot(
                    rows["layer"],
                    rows["score"],
                    color=colour,
                    marker="o",
                    ms=3,
                    lw=2,
                    label=condition,
                )
                ax.fill_between(
                    rows["layer"],
                    rows["score_lo"],
                    rows["score_hi"],
                    color=colour,
                    alpha=0.25,
                    lw=0,
                )
            else:
                ax.fill_between(
                    rows["layer"],
                    rows["score_lo"],
                    rows["score_hi"],
                    color=colour,
                    alpha=0.18,
                    lw=0,
                )
                ax.plot(
                    rows["layer"], rows["score"], color=colour, lw=0.8, ls="--", label=condition
                )
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(_METRIC.get(metric, metric))
        ax.set_title(f"{norms}: {_METRIC.get(metric, metric)} ({mapper})", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False)
    name = ", ".join(map(str, data["model"].unique()))
    fig.suptitle(f"{name}: probe score per layer, controls as bands", fontsize=9.5)
    return fig
