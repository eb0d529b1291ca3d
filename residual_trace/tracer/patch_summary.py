"""Per-cell summary of a patching table, over pairs, with 95% bootstrap intervals.

One row per condition x site x layer/block x head x position, where ``position`` is an
absolute position (rows with ``position_kind`` empty; only when every pair has the same
length, so that position ``i`` means the same slot in each) or a role (``position`` empty,
``position_kind`` one of Meng et al.'s groups: ``before``, ``subject_first``,
``subject_middle``, ``subject_last``, ``after_first``, ``after``, ``last``; ``all`` for a head
patched at every position). ``effect`` is the mean normalised effect over the pairs that have
one (pairs whose clean and corrupt metrics agree have none; a noise-corrupted text's samples
are averaged first), ``effect_lo``/``effect_hi`` its 95% percentile bootstrap interval over
pairs (empty with one pair; with one noise-corrupted text, over its noise samples),
``n_pairs`` how many pairs (or samples) it averages. ``condition`` is ``patch`` or ``floor``
(the target run patched with its own states, what the batched patching itself moves the
metric; with noise corruption, with the states of a second noise draw: a noise floor).
"""

from __future__ import annotations

import pandas as pd

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.stats import mean_with_ci

#: The roles of positions, in the order the figures draw them.
POSITION_KINDS = (
    "before",
    "subject_first",
    "subject_middle",
    "subject_last",
    "after_first",
    "after",
    "last",
    "all",
)

PATCH_SUMMARY_COLUMNS = (
    "model",
    "condition",
    "site",
    "layer",
    "block",
    "head",
    "head_name",
    "position",
    "position_kind",
    "n_pairs",
    "effect",
    "effect_lo",
    "effect_hi",
)

_CELL = ["condition", "site", "layer", "block", "head", "head_name"]


def _rows(
    groups: pd.core.groupby.DataFrameGroupBy, seed: int, by_kind: bool, unit: list[str]
) -> list[dict]:
    rows = []
    for key, group in groups:
        values = dict(zip([*_CELL, "position_kind" if by_kind else "position"], key, strict=True))
        # several positions of one kind (or noise samples) of one pair count once: their mean
        per_pair = group.groupby(unit)["effect"].mean()
        rows.append(
            {
                **values,
                "n_pairs": int(per_pair.notna().sum()),
                **mean_with_ci(per_pair.to_numpy(), "effect", seed=seed),
            }
        )
    return rows


def patch_summary(table: pd.DataFrame, seed: int = DEFAULT_SEED) -> pd.DataFrame:
    """The summary of :func:`~residual_trace.experiments.patch.run_patch`'s table (see above)."""
    if table.empty:
        return pd.DataFrame(columns=list(PATCH_SUMMARY_COLUMNS))
    model = str(table["model"].iloc[0])
    keyed = table.assign(
        layer=table["layer"].astype("Int64").fillna(-1),
        block=table["block"].astype("Int64").fillna(-1),
        position=table["position"].astype("Int64").fillna(-1),
    )
    rows = []
    # the unit of the interval: the pair (its noise samples averaged first), or with one
    # noise-corrupted text, each noise sample
    samples = table["sample"].nunique() if "sample" in table else 1
    unit = ["pair_id", "sample"] if table["pair_id"].nunique() == 1 and samples > 1 else ["pair_id"]
    lengths = table.groupby("pair_id")["n_tokens"].first()
    if lengths.nunique() == 1:
        by_position = keyed[keyed["position"] >= 0].groupby([*_CELL, "position"], sort=True)
        rows += _rows(by_position, seed, by_kind=False, unit=unit)
    rows += _rows(keyed.groupby([*_CELL, "position_kind"], sort=True), seed, True, unit)
    out = pd.DataFrame(rows)
    for column in ("layer", "block", "position"):
        if column not in out:
            out[column] = -1
        values = out[column].astype("Int64")
        out[column] = values.where(values >= 0, pd.NA)
    if "position_kind" not in out:
        out["position_kind"] = ""
    out["position_kind"] = out["position_kind"].fillna("")
    out.insert(0, "model", model)
    order = {kind: k for k, kind in enumerate(POSITION_KINDS)}
    out["_kind"] = out["position_kind"].map(order).fillna(-1)
    out = out.sort_values(
        ["condition", "site", "layer", "block", "head", "_kind", "position"],
        kind="stable",
        na_position="first",
    )
    return out[list(PATCH_SUMMARY_COLUMNS)].reset_index(drop=True)
