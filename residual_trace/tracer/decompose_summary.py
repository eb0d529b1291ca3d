"""Per-block summaries of the decomposition tables.

They are what ``summary.csv`` and ``head_summary.csv`` of ``decompose`` hold, and what its
figures draw.
"""

from __future__ import annotations

import pandas as pd

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.naming import head_name
from residual_trace.stats import mean_with_ci
from residual_trace.tracer.mixing_measures import MIXING

#: Per-block measures of the local split, each with ``_lo``/``_hi`` (95% bootstrap interval).
SPLIT_MEASURES = (
    "attn_norm_rel",
    "mlp_norm_rel",
    "proj_attn",
    "proj_mlp",
    "proj_carried_change",
)

#: Per-block context-mixing measures, each with ``_lo``/``_hi``.
MIXING_MEASURES = tuple(m.column for m in MIXING)


def _tokens(table: pd.DataFrame, include_special: bool) -> pd.DataFrame:
    return table if include_special else table[~table["is_special"]]


def _model(table: pd.DataFrame) -> str:
    return ", ".join(map(str, table["model"].unique())) if "model" in table else ""


def decompose_summary(
    table: pd.DataFrame,
    include_special: bool = False,
    seed: int = DEFAULT_SEED,
    mixing: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per block: mean update sizes and signed effects on the input-token projection.

    Columns: ``block`` (its output is residual layer ``block + 1``), ``n_tokens``;
    ``attn_norm_rel``, ``mlp_norm_rel`` (mean update norm over the residual it is added to);
    ``proj_attn``, ``proj_mlp`` (mean signed contribution to the projection on the unit
    input-token direction); ``proj_carried_change`` (carried input minus input: the norms'
    rescaling); each with ``_lo``/``_hi``, its 95% bootstrap interval; ``proj_bias``,
    ``proj_change`` (``proj_post - proj_pre``), ``max_recon_error``; with ``mixing``, also
    the mean ``mix_raw``, ``mix_attn_n``, ``mix_attnres_n``, ``mix_attnresln_n``,
    ``mix_rollout``, ``mix_globenc``, ``mix_alti``, ``mix_vz``, ``mix_vz_rollout`` with
    intervals (NaNs, such as Value Zeroing beyond its length limit, dropped)
    (see :mod:`residual_trace.tracer.mixing`).
    """
    rows = _tokens(table, include_special)
    rows = rows.assign(proj_carried_change=rows["proj_resid"] - rows["proj_pre"])
    out = []
    for block, group in rows.groupby("block", sort=True):
        record: dict[str, object] = {
            "model": _model(table),
            "block": int(block),
            "n_tokens": len(group),
        }
        for column in SPLIT_MEASURES:
            record.update(mean_with_ci(group[column].to_numpy(), column, seed))
        record["proj_bias"] = float(group["proj_bias"].mean())
        record["proj_change"] = float((group["proj_post"] - group["proj_pre"]).mean())
        record["max_recon_error"] = float(group["recon_error"].max())
        out.append(record)
    summary = pd.DataFrame(out)
    if mixing is None:
        return summary
    extra = []
    for block, group in _tokens(mixing, include_special).groupby("block", sort=True):
        record = {"block": int(block)}
        for column in MIXING_MEASURES:
            record.update(mean_with_ci(group[column].to_numpy(), column, seed))
        extra.append(record)
    return summary.merge(pd.DataFrame(extra), on="block", how="left")


def head_summary(
    heads: pd.DataFrame, include_special: bool = False, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """One row per block x head of the per-head table.

    The columns: ``head_name`` (``L{block}H{head}``, ``L{block}b_O`` for the output bias),
    ``n_tokens``, mean ``head_norm_rel`` and ``proj_head`` (the head's signed effect on the
    input-token projection) with its 95% bootstrap interval.
    """
    rows = _tokens(heads, include_special)
    out = []
    for (block, head), group in rows.groupby(["block", "head"], sort=True):
        record: dict[str, object] = {
            "model": _model(heads),
            "block": int(block),
            "head": int(head),
            "head_name": head_name(int(block), int(head)),
            "n_tokens": len(group),
            "head_norm_rel": float(group["head_norm_rel"].mean()),
        }
        record.update(mean_with_ci(group["proj_head"].to_numpy(), "proj_head", seed))
        out.append(record)
    return pd.DataFrame(out)
