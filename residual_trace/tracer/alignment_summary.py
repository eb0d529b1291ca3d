"""Statistics of the perturbation tests.

Per-head means with intervals, noise floor and verdict (``heads``), and per-block and per-layer
summaries (``summary``, ``resid_summary``).

Intervals resample whole texts (a text's perturbations are not independent), or the
perturbations themselves when there is a single text; an interval from fewer than two
units is NaN (``n/a``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from residual_trace.defaults import DEFAULT_SEED, MOVING_MODES
from residual_trace.naming import head_name
from residual_trace.stats import bootstrap_ci, cluster_bootstrap_ci
from residual_trace.tracer.structure import STRUCTURE_COLUMNS

#: Perturbation kinds that move tokens (and so get a token-following index).
MOVING = MOVING_MODES

#: Verdicts a head can get.
VERDICTS = ("token", "position", "undecided", "n/a")

#: The columns of the ``heads`` table.
HEAD_COLUMNS = (
    "model",
    "perturbation",
    "block",
    "head",
    "head_name",
    "n_obs",
    "n_texts",
    "sim_token",
    "sim_position",
    "follow_index",
    "follow_index_lo",
    "follow_index_hi",
    "sim_position_lo",
    "sim_position_hi",
    "noise_floor",
    "verdict",
    *STRUCTURE_COLUMNS,
    *(f"{c}_perturbed" for c in STRUCTURE_COLUMNS),
)

_KEYS = ["block", "head"]


def _clusters(group: pd.DataFrame) -> str:
    return "text_id" if group["text_id"].nunique() > 1 else "sample"


def head_table(
    per_perturbation: pd.DataFrame, model_name: str, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """One row per perturbation kind x block x head: means, intervals, noise floor, verdict.

    Each (text, perturbation) with evidence is one observation (``n_obs``). ``noise_floor``
    is the mean of ``noise``: how far the head's measure moves when the re-run of the
    unperturbed text stands in for the original (NaN for the ``identity`` rows, which
    describe the re-run itself). ``verdict`` is ``token`` when the whole interval of
    ``follow_index`` lies above the floor, ``position`` when it lies below minus the floor,
    ``undecided`` otherwise (and without an interval); ``n/a`` for perturbations that do not
    move tokens.
    """
    data = per_perturbation
    ident = data[data["perturbation"] == "identity"]
    original = ident.groupby(_KEYS)[list(STRUCTURE_COLUMNS)].mean()
    rows = []
    for kind, group in data.groupby("perturbation", sort=False):
        perturbed = group.groupby(_KEYS)[list(STRUCTURE_COLUMNS)].mean()
        perturbed.columns = [f"{c}_perturbed" for c in perturbed.columns]
        counted = "follow_index" if kind in MOVING else "sim_position"
        stats = group.groupby(_KEYS).agg(
            n_obs=(counted, "count"),
            n_texts=("text_id", "nunique"),
            sim_token=("sim_token", "mean"),
            sim_position=("sim_position", "mean"),
            follow_index=("follow_index", "mean"),
            noise_floor=("noise", "mean"),
        )
        for column in ("follow_index", "sim_position"):
            low, high = _intervals(group, column, _clusters(group), stats.index, seed)
            stats[f"{column}_lo"], stats[f"{column}_hi"] = low, high
        table = stats.join(original).join(perturbed).reset_index()
        table.insert(0, "perturbation", kind)
        rows.append(table)
    heads = pd.concat(rows, ignore_index=True)
    heads.insert(0, "model", model_name)
    heads["head_name"] = [
        head_name(int(b), int(h)) for b, h in zip(heads["block"], heads["head"], strict=True)
    ]
    heads["verdict"] = _verdicts(heads)
    return heads[list(HEAD_COLUMNS)]


def _intervals(
    group: pd.DataFrame, column: str, clusters: str, index: pd.Index, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    valid = group[np.isfinite(group[column])]
    if valid.empty:
        nan = np.full(len(index), np.nan)
        return nan, nan
    sums = valid.pivot_table(index=clusters, columns=_KEYS, values=column, aggfunc="sum")
    counts = valid.pivot_table(index=clusters, columns=_KEYS, values=column, aggfunc="count")
    sums, counts = sums.reindex(columns=index), counts.reindex(columns=index)
    return cluster_bootstrap_ci(sums.fillna(0).to_numpy(), counts.fillna(0).to_numpy(), seed=seed)


def _verdicts(heads: pd.DataFrame) -> list[str]:
    out = []
    for row in heads.itertuples(index=False):
        if row.perturbation not in MOVING:
            out.append("n/a")
        elif not np.isfinite(row.follow_index_lo):
            out.append("undecided")
        elif row.follow_index_lo > row.noise_floor:
            out.append("token")
        elif row.follow_index_hi < -row.noise_floor:
            out.append("position")
        else:
            out.append("undecided")
    return out


def block_summary(
    heads: pd.DataFrame, per_perturbation: pd.DataFrame, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """One row per perturbation kind x block: the attention side.

    Columns: ``follow_index`` (mean over heads and observations) with ``follow_index_lo`` /
    ``_hi`` (95% bootstrap over texts of each text's block mean; over perturbations when
    there is one text), ``sim_position`` (likewise), ``n_heads_token`` /
    ``n_heads_position`` / ``n_heads_undecided`` (heads by verdict), ``noise_floor``
    (largest over the block's heads), and the structure means original vs perturbed
    (``entropy``, ``entropy_perturbed``, ...).
    """
    out = []
    for kind in heads["perturbation"].unique():
        group = per_perturbation[per_perturbation["perturbation"] == kind]
        head_rows = heads[heads["perturbation"] == kind]
        clusters = _clusters(group)
        for block in sorted(head_rows["block"].unique()):
            record: dict[str, Any] = {"perturbation": kind, "block": int(block)}
            in_block = group[group["block"] == block]
            for column in ("follow_index", "sim_position"):
                record.update(_mean_interval(in_block, column, clusters, seed))
            rows = head_rows[head_rows["block"] == block]
            for name in ("token", "position", "undecided"):
                record[f"n_heads_{name}"] = int((rows["verdict"] == name).sum())
            record["noise_floor"] = float(rows["noise_floor"].max())
            for column in STRUCTURE_COLUMNS:
                for name in (column, f"{column}_perturbed"):
                    record[name] = float(rows[name].mean())
            out.append(record)
    return pd.DataFrame(out)


def resid_summary(resid: pd.DataFrame, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """One row per perturbation kind x residual layer (0..L), with token and position cosines.

    ``cos_token`` and ``cos_position`` are the mean cosine of the perturbed states to the original
    ones, aligned by token and by position, each with its 95% interval over texts.
    """
    out = []
    for kind in resid["perturbation"].unique():
        states = resid[resid["perturbation"] == kind]
        clusters = _clusters(states)
        for layer in sorted(states["layer"].unique()):
            record: dict[str, Any] = {"perturbation": kind, "layer": int(layer)}
            in_layer = states[states["layer"] == layer]
            for column in ("cos_token", "cos_position"):
                record.update(_mean_interval(in_layer, column, clusters, seed))
            out.append(record)
    return pd.DataFrame(out)


def _mean_interval(frame: pd.DataFrame, column: str, clusters: str, seed: int) -> dict[str, float]:
    """Mean of ``column`` and the 95% bootstrap interval over ``clusters`` of their means.

    The interval is NaN with fewer than two clusters.
    """
    values = frame[[clusters, column]].dropna()
    per_cluster = values.groupby(clusters)[column].mean().to_numpy()
    mean = float(values[column].mean()) if len(values) else float("nan")
    lo, hi = bootstrap_ci(per_cluster, seed=seed) if len(per_cluster) > 1 else (np.nan, np.nan)
    return {column: mean, f"{column}_lo": lo, f"{column}_hi": hi}
