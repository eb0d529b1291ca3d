"""Statistics of ``trace perturb``: per-head means with intervals, noise floor and verdict
(``heads.csv``), and the per-layer summary (``summary.csv``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from residual_trace.stats import bootstrap_ci, cluster_bootstrap_ci
from residual_trace.tracer.structure import STRUCTURE_COLUMNS

#: Perturbation kinds that move tokens (and so get a token-following index).
MOVING = ("swap", "shuffle")


def head_table(per_perturbation: pd.DataFrame, model_name: str, seed: int = 0) -> pd.DataFrame:
    """One row per perturbation kind x layer x head: means, intervals, noise floor, verdict.

    Each (text, perturbation) with evidence is one observation; intervals are 95% bootstrap
    intervals that resample whole texts (a text's perturbations are not independent), or
    the perturbations themselves when there is a single text. ``noise_floor`` is the mean
    of ``noise``: how far the head's measure moves when the re-run of the unperturbed text
    stands in for the original (NaN for the ``identity`` rows, which describe the re-run
    itself). ``verdict`` is ``token`` when the whole interval lies above the floor,
    ``position`` when it lies below minus the floor, ``undecided`` otherwise (and without an
    interval); ``n/a`` for perturbations that do not move tokens.
    """
    data = per_perturbation
    ident = data[data["perturbation"] == "identity"]
    keys = ["layer", "head"]
    original = ident.groupby(keys)[list(STRUCTURE_COLUMNS)].mean()
    rows = []
    for kind, group in data.groupby("perturbation", sort=False):
        perturbed = group.groupby(keys)[list(STRUCTURE_COLUMNS)].mean()
        perturbed.columns = [f"{c}_perturbed" for c in perturbed.columns]
        stats = group.groupby(keys).agg(
            n=("index", "count") if kind in MOVING else ("sim_position", "count"),
            n_texts=("text_id", "nunique"),
            sim_token=("sim_token", "mean"),
            sim_position=("sim_position", "mean"),
            index=("index", "mean"),
            noise_floor=("noise", "mean"),
        )
        clusters = "text_id" if group["text_id"].nunique() > 1 else "sample"
        for column in ("index", "sim_position"):
            low, high = _intervals(group, column, clusters, stats.index, seed)
            stats[f"{column}_lo"], stats[f"{column}_hi"] = low, high
        table = stats.join(original).join(perturbed).reset_index()
        table.insert(0, "perturbation", kind)
        rows.append(table)
    heads = pd.concat(rows, ignore_index=True)
    heads.insert(0, "model", model_name)
    heads["verdict"] = _verdicts(heads)
    return heads[list(HEAD_COLUMNS)]


#: The columns of ``heads.csv``.
HEAD_COLUMNS = (
    "model",
    "perturbation",
    "layer",
    "head",
    "n",
    "n_texts",
    "sim_token",
    "sim_position",
    "index",
    "index_lo",
    "index_hi",
    "sim_position_lo",
    "sim_position_hi",
    "noise_floor",
    "verdict",
    *STRUCTURE_COLUMNS,
    *(f"{c}_perturbed" for c in STRUCTURE_COLUMNS),
)


def _intervals(
    group: pd.DataFrame, column: str, clusters: str, index: pd.Index, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    valid = group[np.isfinite(group[column])]
    if valid.empty:
        nan = np.full(len(index), np.nan)
        return nan, nan
    sums = valid.pivot_table(
        index=clusters, columns=["layer", "head"], values=column, aggfunc="sum"
    ).reindex(columns=index)
    counts = valid.pivot_table(
        index=clusters, columns=["layer", "head"], values=column, aggfunc="count"
    ).reindex(columns=index)
    return cluster_bootstrap_ci(sums.fillna(0).to_numpy(), counts.fillna(0).to_numpy(), seed=seed)


def _verdicts(heads: pd.DataFrame) -> list[str]:
    out = []
    for row in heads.itertuples(index=False):
        if row.perturbation not in MOVING:
            out.append("n/a")
        elif not np.isfinite(row.index_lo):
            out.append("undecided")
        elif row.index_lo > row.noise_floor:
            out.append("token")
        elif row.index_hi < -row.noise_floor:
            out.append("position")
        else:
            out.append("undecided")
    return out


def layer_summary(
    heads: pd.DataFrame, per_perturbation: pd.DataFrame, resid: pd.DataFrame, seed: int = 0
) -> pd.DataFrame:
    """One row per perturbation kind x residual layer (0..L).

    Attention columns (NaN at layer 0, which no head writes): ``index`` (mean over heads and
    observations) with ``index_lo``/``index_hi`` (95% bootstrap over texts of each text's
    layer mean; over perturbations when there is one text), ``sim_position`` (likewise),
    ``n_token``/``n_position``/``n_undecided`` (heads by verdict), ``noise_floor`` (largest
    over the layer's heads), and the structure means original vs perturbed (``entropy``,
    ``entropy_perturbed``, ...). Residual columns: ``cos_token`` and ``cos_position`` with
    intervals.
    """
    out = []
    for kind in heads["perturbation"].unique():
        group = per_perturbation[per_perturbation["perturbation"] == kind]
        head_rows = heads[heads["perturbation"] == kind]
        states = resid[resid["perturbation"] == kind]
        clusters = "text_id" if group["text_id"].nunique() > 1 else "sample"
        for layer in range(int(resid["layer"].max()) + 1):
            record: dict[str, Any] = {"perturbation": kind, "layer": layer}
            in_heads = group[group["layer"] == layer]
            in_resid = states[states["layer"] == layer]
            for frame, column in (
                (in_heads, "index"),
                (in_heads, "sim_position"),
                (in_resid, "cos_token"),
                (in_resid, "cos_position"),
            ):
                record.update(_mean_interval(frame, column, clusters, seed))
            rows = head_rows[head_rows["layer"] == layer]
            for name in ("token", "position", "undecided"):
                record[f"n_{name}"] = int((rows["verdict"] == name).sum())
            record["noise_floor"] = float(rows["noise_floor"].max()) if len(rows) else np.nan
            for column in STRUCTURE_COLUMNS:
                for name in (column, f"{column}_perturbed"):
                    record[name] = float(rows[name].mean()) if len(rows) else np.nan
            out.append(record)
    return pd.DataFrame(out)


def _mean_interval(frame: pd.DataFrame, column: str, clusters: str, seed: int) -> dict[str, float]:
    """Mean of ``column`` and the 95% bootstrap interval over ``clusters`` of their means
    (NaN with fewer than two clusters)."""
    values = frame[[clusters, column]].dropna()
    per_cluster = values.groupby(clusters)[column].mean().to_numpy()
    mean = float(values[column].mean()) if len(values) else float("nan")
    lo, hi = bootstrap_ci(per_cluster, seed=seed) if len(per_cluster) > 1 else (np.nan, np.nan)
    return {column: mean, f"{column}_lo": lo, f"{column}_hi": hi}
