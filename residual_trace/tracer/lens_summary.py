"""Per lens x site x layer summary of a lens table, every number beside its null.

Columns: ``n_tokens`` read; ``identifiable`` (share of positions whose own input token is
the lens's top token, ``input_rank == 1``); ``next_top1`` (decoders: share of positions whose
next token is the lens's top token, ``next_rank == 1``, over positions that have a next
token); mean ``kl_final`` (nats) and ``entropy`` (nats); each with ``_lo``/``_hi``, the 95%
percentile bootstrap interval of the mean over positions. The nulls, over the same
positions: ``kl_unigram`` (the KL of the model's output to the texts' smoothed unigram
distribution: a lens that reads nothing) and ``next_top1_null`` (the accuracy of always
predicting the texts' most frequent next token). With the geometry table, ``nn_identifiable``
(with its interval): the share whose nearest input-embedding row by cosine is their own token,
the geometric answer of ``trace layers`` to the question ``identifiable`` answers by decoding.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.stats import mean_with_ci

_MEASURES = ("identifiable", "next_top1", "kl_final", "entropy")

LENS_SUMMARY_COLUMNS = (
    "model",
    "lens",
    "site",
    "layer",
    "n_tokens",
    *(f"{m}{s}" for m in _MEASURES for s in ("", "_lo", "_hi")),
    "kl_unigram",
    "next_top1_null",
    "nn_identifiable",
    "nn_identifiable_lo",
    "nn_identifiable_hi",
)


def lens_summary(
    table: pd.DataFrame,
    nulls: pd.DataFrame,
    include_special: bool = False,
    seed: int = DEFAULT_SEED,
    geometry: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per lens x site x layer (see the module docstring).

    Args:
        table: the lens table.
        nulls: one row per text x position: ``next_token_id`` (-1 where none) and
            ``kl_unigram``.
        include_special: also count special tokens ([CLS], BOS, ...).
        seed: the bootstrap's seed.
        geometry: ``vocab_rank`` per text x position x layer (``post`` states); gives
            ``nn_identifiable``, the share of the same positions whose nearest embedding row
            is their token (``trace layers``' ``identifiable``), NaN for ``mid``.
    """
    rows = table if include_special else table[~table["is_special"]]
    keys = ["text_id", "position"]
    rows = rows.merge(nulls, on=keys, how="left", validate="many_to_one")
    if geometry is not None:
        rows = rows.merge(geometry, on=[*keys, "layer"], how="left", validate="many_to_one")
        rows.loc[rows["site"] != "post", "vocab_rank"] = np.nan
    has_next = nulls[nulls["next_token_id"] >= 0]["next_token_id"]
    mode = int(has_next.value_counts().idxmax()) if len(has_next) else -1
    model = ", ".join(map(str, table["model"].unique())) if len(table) else ""
    order = {"post": 0, "mid": 1}
    out = []
    for (lens, site, layer), group in rows.groupby(["lens", "site", "layer"], sort=False):
        record: dict[str, object] = {
            "model": model,
            "lens": lens,
            "site": site,
            "layer": int(layer),
            "n_tokens": len(group),
        }
        record.update(_measures(group, site, mode, seed))
        out.append(record)
    summary = pd.DataFrame(out, columns=list(LENS_SUMMARY_COLUMNS))
    summary["_site"] = summary["site"].map(order)
    summary = summary.sort_values(["lens", "layer", "_site"], kind="stable").drop(columns="_site")
    return summary.reset_index(drop=True).astype({"n_tokens": np.int64})


def _measures(group: pd.DataFrame, site: str, mode: int, seed: int) -> dict[str, float]:
    """The measures of one lens x site x layer, with intervals and nulls."""
    record: dict[str, float] = {}
    with_next = group[group["next_token_id"] >= 0]
    values = {
        "identifiable": (group["input_rank"] == 1).to_numpy(dtype=float),
        "next_top1": (with_next["next_rank"] == 1).to_numpy(dtype=float),
        "kl_final": group["kl_final"].to_numpy(dtype=float),
        "entropy": group["entropy"].to_numpy(dtype=float),
    }
    for name, data in values.items():
        record.update(mean_with_ci(data, name, seed=seed))
    record["kl_unigram"] = float(group["kl_unigram"].mean())
    record["next_top1_null"] = (
        float((with_next["next_token_id"] == mode).mean()) if len(with_next) else np.nan
    )
    nn = (
        (group["vocab_rank"] == 1).to_numpy(dtype=float)
        if "vocab_rank" in group and site == "post"
        else np.array([])
    )
    record.update(mean_with_ci(nn, "nn_identifiable", seed=seed))
    return record


def _cell(value: float, spec: str) -> str:
    return "n/a" if not np.isfinite(value) else format(value, spec)


def format_lens_summary(summary: pd.DataFrame, decoder: bool) -> str:
    """A fixed-width text table of :func:`lens_summary` for the terminal (under 100 columns)."""
    head = f"{'lens':>6} {'site':>4} {'layer':>5}  {'KL [95% CI]':>22}  {'null KL':>7}"
    head += f"  {'input top':>9}"
    if decoder:
        head += f"  {'next top1':>9}  {'null':>5}"
    lines = [head]
    for row in summary.itertuples(index=False):
        interval = f"[{_cell(row.kl_final_lo, '.2f')}, {_cell(row.kl_final_hi, '.2f')}]"
        line = (
            f"{row.lens:>6} {row.site:>4} {row.layer:>5}  {_cell(row.kl_final, '.3f'):>7} "
            f"{interval:>14}  {_cell(row.kl_unigram, '.2f'):>7}  "
            f"{_cell(row.identifiable, '.1%'):>9}"
        )
        if decoder:
            line += f"  {_cell(row.next_top1, '.1%'):>9}  {_cell(row.next_top1_null, '.1%'):>5}"
        lines.append(line)
    return "\n".join(lines)
