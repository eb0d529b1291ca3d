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
    name = ", ".join(map(str, data["model"].unique()))
    shades = ["dark", "light"]
    which = (
        f"mapper {mappers[0]}"
        if len(mappers) == 1
        else "mappers " + ", ".join(f"{m} ({shades[k]})" for k, m in enumerate(mappers[:2]))
    )
    fig.suptitle(
        f"{name}, layer {layer}: the probe (system) next to its controls, {which}; "
        "bars: mean over folds with 95% intervals",
        fontsize=9.5,
    )
    return fig


def layers_figure(summary: pd.DataFrame) -> Figure:
    """Probe score per layer against each control, one small panel per control.

    Rows: norm set and metric; columns: the control conditions. Each panel draws the system
    (solid, with its 95% interval) and that control (dashed, with its interval), for the
    first mapper.
    """
    mapper = str(summary["mapper"].iloc[0])
    data = summary[summary["mapper"] == mapper]
    panels = list(data.groupby(["norms", "metric"], sort=False))
    controls = [c for c in CONDITIONS if c != "system" and c in set(data["condition"])]
    fig = Figure(figsize=(2.3 * max(1, len(controls)) + 0.8, 2.3 * len(panels) + 0.7),
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(len(panels), max(1, len(controls)), squeeze=False, sharex=True,
                        sharey="row")  # fmt: skip
    layers = sorted({int(layer) for layer in data["layer"]})
    for row, ((norms, metric), part) in enumerate(panels):
        system = part[part["condition"] == "system"].sort_values("layer")
        for col, condition in enumerate(controls or ["system"]):
            ax = axes[row, col]
            _line(ax, system, _COLOURS["system"], "-", "system (the probe)")
            if condition != "system":
                rows = part[part["condition"] == condition].sort_values("layer")
                _line(ax, rows, _COLOURS[condition], "--", "the control named above the panel")
            ax.set_xticks(layers)
            if row == 0:
                ax.set_title(condition, fontsize=8.5, color=_COLOURS[condition])
            if col == 0:
                ax.set_ylabel(f"{norms}\n{_METRIC.get(metric, metric)}", fontsize=8)
            if row == len(panels) - 1:
                ax.set_xlabel("layer")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    name = ", ".join(map(str, data["model"].unique()))
    fig.suptitle(f"{name}: probe score per layer ({mapper}) against each control; "
                 "bands: 95% intervals", fontsize=9.5)  # fmt: skip
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _line(ax, rows: pd.DataFrame, colour: str, style: str, label: str) -> None:
    if rows.empty:
        return
    ax.fill_between(rows["layer"], rows["score_lo"], rows["score_hi"], color=colour, alpha=0.2,
                    lw=0)  # fmt: skip
    ax.plot(rows["layer"], rows["score"], color=colour, ls=style, marker="o", ms=2.5, lw=1.4,
            label=label)  # fmt: skip
