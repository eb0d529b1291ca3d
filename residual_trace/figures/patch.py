"""Patching figures: pure functions from the patching tables to a matplotlib figure.

``patch_grid_figure`` draws the causal-tracing picture of Meng et al. (2022) for one pair and
site: the clean tokens down the side (the differing ones starred), layers or blocks across,
each cell the normalised effect of restoring that state; for heads, blocks x heads.
``patch_summary_figure`` draws the mean over pairs by position role, with intervals where
there are several pairs. ``format_patch_summary`` is the console table.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from residual_trace.figures.tokens import clean_token
from residual_trace.tracer.patch_summary import POSITION_KINDS

_TITLES = {
    "resid": "residual stream (input of block = layer)",
    "attn": "attention output",
    "mlp": "MLP output",
    "head": "attention heads",
}
_KIND_LABELS = {
    "before": "before subject",
    "subject_first": "first subject token",
    "subject_middle": "middle subject tokens",
    "subject_last": "last subject token",
    "after_first": "first subsequent token",
    "after": "further tokens",
    "last": "last token",
    "all": "every position",
}
#: The most positions a per-pair grid draws (the last ones are kept: where answers form).
MAX_GRID_POSITIONS = 48


def _norm(values: np.ndarray) -> TwoSlopeNorm:
    """Centred at 0 (nothing restored); 1 at the top unless an effect overshoots."""
    finite = values[np.isfinite(values)]
    low = min(-0.25, float(finite.min())) if finite.size else -0.25
    high = max(1.0, float(finite.max())) if finite.size else 1.0
    return TwoSlopeNorm(vmin=low, vcenter=0.0, vmax=high)


def _index_column(site: str) -> str:
    return "layer" if site == "resid" else "block"


def patch_grid_figure(table: pd.DataFrame, site: str, pair_id: int = 0) -> Figure:
    """One pair's effects at one site (see the module docstring)."""
    rows = table[
        (table["pair_id"] == pair_id) & (table["site"] == site) & (table["condition"] == "patch")
    ]
    if site == "head":
        return _head_grid(rows, pair_id)
    index = _index_column(site)
    grid = rows.pivot_table(index="position", columns=index, values="effect", aggfunc="first")
    grid = grid.sort_index()
    n_positions = len(grid)
    grid = grid.iloc[-MAX_GRID_POSITIONS:]
    labels = rows.drop_duplicates("position").set_index("position")
    tokens = [
        clean_token(str(labels.loc[p, "token"]))
        + (" *" if str(labels.loc[p, "position_kind"]).startswith("subject") else "")
        for p in grid.index
    ]
    values = grid.to_numpy(dtype=float)
    height = 1.2 + 0.28 * len(grid)
    width = min(14.0, max(4.4, 2.6 + 0.22 * grid.shape[1]))
    figure = Figure(figsize=(width, height), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=_norm(values),
                      interpolation="nearest")  # fmt: skip
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    step = max(1, grid.shape[1] // 15)
    ax.set_xticks(range(0, grid.shape[1], step), [str(c) for c in grid.columns[::step]])
    window = int(rows["window"].max()) if len(rows) else 1
    what = f"{index} (window of {window} blocks)" if window > 1 else index
    ax.set_xlabel(what)
    ax.set_ylabel("clean token (* differs in the corrupt text)")
    shown = (
        f", last {MAX_GRID_POSITIONS} of {n_positions} positions" if n_positions > len(grid) else ""
    )
    title = f"pair {pair_id}: restoring the {_TITLES[site]}{shown}"
    ax.set_title(textwrap.fill(title, max(28, int(width * 7))), fontsize=9.5)
    bar = figure.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("effect: (patched − corrupt) / (clean − corrupt)", fontsize=8)
    return figure


def _head_grid(rows: pd.DataFrame, pair_id: int) -> Figure:
    every = rows[rows["position"].isna()]
    if every.empty:  # per position: the metric's own position, the last one
        every = rows[rows["position"] == rows["position"].max()]
        where = f"at position {int(rows['position'].max())} (the last)"
    else:
        where = "at every position at once"
    grid = every.pivot_table(index="block", columns="head", values="effect", aggfunc="first")
    values = grid.to_numpy(dtype=float)
    figure = Figure(figsize=(min(14.0, 2.8 + 0.3 * grid.shape[1]), 1.4 + 0.22 * len(grid)),
                    layout="constrained")  # fmt: skip
    ax = figure.subplots()
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=_norm(values),
                      interpolation="nearest", origin="lower")  # fmt: skip
    ax.set_xticks(range(grid.shape[1]), [str(h) for h in grid.columns], fontsize=7)
    step = max(1, len(grid) // 15)
    ax.set_yticks(range(0, len(grid), step), [str(b) for b in grid.index[::step]])
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    title = f"pair {pair_id}: restoring each head's output {where}"
    ax.set_title(textwrap.fill(title, max(28, int(figure.get_figwidth() * 7))), fontsize=9.5)
    bar = figure.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("effect", fontsize=8)
    return figure


def patch_summary_figure(
    summary: pd.DataFrame,
    n_pairs: int,
    sites: list[str] | None = None,
    window: int = 1,
    reading: str = "",
    over: str = "",
) -> Figure:
    """Mean effect over pairs per position role and layer/block, one column per site.

    Top: the roles x layers map of the mean; bottom (with several pairs): the last subject
    token and the last token with their 95% bootstrap intervals over pairs. ``window`` (of
    attn and mlp) and ``reading`` (the metric and where it is read) label the axes and title;
    ``over`` says what the mean is over (default: ``n_pairs`` pairs). The lines are drawn
    wherever the summary has intervals (several pairs, or one text's noise samples).
    """
    patched = summary[(summary["condition"] == "patch") & (summary["position_kind"] != "")]
    sites = sites or list(dict.fromkeys(patched["site"]))
    sites = [s for s in sites if s != "head"] or sites
    lines = bool(patched["effect_lo"].notna().any())
    over = over or f"{n_pairs} pair(s)"
    width = max(6.0, 4.4 * len(sites))
    figure = Figure(figsize=(width, 3.2 + (2.6 if lines else 0)), layout="constrained")
    axes = figure.subplots(2 if lines else 1, len(sites), squeeze=False)
    for k, site in enumerate(sites):
        rows = patched[patched["site"] == site]
        index = _index_column(site)
        kinds = [kind for kind in POSITION_KINDS if kind in set(rows["position_kind"])]
        grid = rows.pivot_table(index="position_kind", columns=index, values="effect",
                                aggfunc="first").reindex(kinds)  # fmt: skip
        values = grid.to_numpy(dtype=float)
        ax = axes[0, k]
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=_norm(values),
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(len(kinds)), [_KIND_LABELS[kind] for kind in kinds], fontsize=8)
        step = max(1, grid.shape[1] // 10)
        ax.set_xticks(range(0, grid.shape[1], step), [str(c) for c in grid.columns[::step]])
        label = (
            f"{index} (centre of a {window}-block window)"
            if window > 1 and site in ("attn", "mlp")
            else index
        )
        ax.set_xlabel(label)
        ax.set_title(f"{_TITLES[site]}: mean over {over}", fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.9).set_label("mean effect", fontsize=8)
        if lines:
            _role_lines(axes[1, k], rows, index, label)
    if reading:
        figure.suptitle(textwrap.fill(reading, width=int(width * 11)), fontsize=10)
    return figure


def _role_lines(ax: Any, rows: pd.DataFrame, index: str, label: str) -> None:
    """The last subject token's and the last token's mean effect, with their intervals."""
    for kind, colour in (("subject_last", "C3"), ("last", "C0")):
        line = rows[rows["position_kind"] == kind].sort_values(index)
        if line.empty:
            continue
        x = line[index].astype(float)
        ax.plot(x, line["effect"], color=colour, marker=".", label=_KIND_LABELS[kind])
        ax.fill_between(x, line["effect_lo"].astype(float), line["effect_hi"].astype(float),
                        color=colour, alpha=0.2, lw=0)  # fmt: skip
    ax.axhline(0.0, color="0.5", lw=0.7)
    ax.set_xlabel(label)
    ax.set_ylabel("effect (95% interval)")
    ax.legend(fontsize=7, frameon=False)


def format_patch_summary(
    summary: pd.DataFrame, floor: str = "the target run patched with its own states"
) -> str:
    """The console table: per site and position role, the layer/block restoring most."""
    patched = summary[(summary["condition"] == "patch") & (summary["position_kind"] != "")]
    floored = summary[summary["condition"] == "floor"]
    lines = [f"{'site':<6} {'position':<24} {'best at':<10} {'effect [95% interval]':<24} pairs"]
    for site, rows in patched.groupby("site", sort=False):
        index = _index_column(str(site))
        for kind in POSITION_KINDS:
            part = rows[rows["position_kind"] == kind]
            if part.empty or not part["effect"].notna().any():
                continue
            best = part.loc[part["effect"].abs().idxmax()]
            where = f"{index} {best[index]}"
            if site == "head":
                where = str(best["head_name"])
            interval = f"{best['effect']:.3f} " + (
                f"[{best['effect_lo']:.3f}, {best['effect_hi']:.3f}]"
                if np.isfinite(best["effect_lo"])
                else "[n/a: one pair]"
            )
            lines.append(f"{site:<6} {_KIND_LABELS[kind]:<24} {where:<10} {interval:<24} "
                         f"{int(best['n_pairs'])}")  # fmt: skip
    if len(floored) and floored["effect"].notna().any():
        lines.append(f"noise floor ({floor}): largest |effect| "
                     f"{floored['effect'].abs().max():.1e}")  # fmt: skip
    return "\n".join(lines)
