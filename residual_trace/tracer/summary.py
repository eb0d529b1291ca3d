"""Per-layer summary of a drift table: what the CLI prints and ``summary.csv`` holds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from residual_trace.defaults import DEFAULT_SEED
from residual_trace.stats import bootstrap_ci, format_interval

#: The measures summarised per layer, each as mean with ``_lo``/``_hi`` (95% bootstrap
#: interval of the mean); ``identifiable`` is the share of tokens with ``vocab_rank == 1``.
_WITH_INTERVAL = (
    "cos_input",
    "baseline",
    "identifiable",
    "cos_input_normed",
    "baseline_normed",
    "identifiable_normed",
)

SUMMARY_COLUMNS = (
    "model",
    "layer",
    "n_tokens",
    "n_unk",
    *(f"{name}{suffix}" for name in _WITH_INTERVAL for suffix in ("", "_lo", "_hi")),
    "norm_ratio",
    "top_dim_share",
)


def layer_summary(
    table: pd.DataFrame, include_special: bool = False, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """One row per layer: means over tokens, a 95% bootstrap interval, the null beside it.

    Columns: ``n_tokens`` measured, ``n_unk`` of them [UNK] (the tokenizer's stand-in for
    text it has no piece for: measured like any token, flagged ``is_unk``); ``cos_input``
    (mean); ``baseline`` (mean similarity to the text's other tokens: the anisotropy null);
    ``identifiable`` (share of tokens with ``vocab_rank == 1``); the same three for the
    normalised variant, each with ``_lo`` and ``_hi``, the 95% bootstrap interval of the
    mean; mean ``norm_ratio`` and ``top_dim_share``.
    Special tokens are left out unless ``include_special``.

    Examples:
        >>> t = pd.DataFrame({"layer": [0, 0, 1, 1], "is_special": [False] * 4,
        ...     "cos_input": [1.0, 1.0, 0.5, 0.3], "baseline": [0.1] * 4,
        ...     "vocab_rank": [1, 1, 1, 9], "cos_input_normed": [1.0, 1.0, 0.5, 0.3],
        ...     "baseline_normed": [0.1] * 4, "vocab_rank_normed": [1, 1, 2, 9],
        ...     "norm_ratio": [1.0] * 4, "top_dim_share": [0.1] * 4})
        >>> layer_summary(t)[["layer", "cos_input", "identifiable"]].to_dict("list")
        {'layer': [0, 1], 'cos_input': [1.0, 0.4], 'identifiable': [1.0, 0.5]}
    """
    rows = table if include_special else table[~table["is_special"]]
    model = ", ".join(map(str, table["model"].unique())) if "model" in table else ""
    out = []
    for layer, group in rows.groupby("layer", sort=True):
        record: dict[str, object] = {
            "model": model,
            "layer": int(layer),
            "n_tokens": len(group),
            "n_unk": int(group["is_unk"].sum()) if "is_unk" in group else 0,
        }
        values = {
            "cos_input": group["cos_input"],
            "baseline": group["baseline"],
            "identifiable": (group["vocab_rank"] == 1).astype(float),
            "cos_input_normed": group["cos_input_normed"],
            "baseline_normed": group["baseline_normed"],
            "identifiable_normed": (group["vocab_rank_normed"] == 1).astype(float),
        }
        for name, column in values.items():
            data = column.to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(data, seed=seed)
            mean = float(np.nanmean(data)) if np.isfinite(data).any() else float("nan")
            record.update({name: mean, f"{name}_lo": lo, f"{name}_hi": hi})
        record["norm_ratio"] = float(group["norm_ratio"].mean())
        record["top_dim_share"] = float(group["top_dim_share"].mean())
        out.append(record)
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS)).astype(
        {"n_tokens": np.int64, "n_unk": np.int64}
    )


def format_summary(summary: pd.DataFrame, show_normed: bool) -> str:
    """A fixed-width text table of :func:`layer_summary` for the terminal."""
    head = f"{'layer':>5}  {'cos_input [95% CI]':>22}  {'baseline':>8}  {'identifiable':>12}"
    if show_normed:
        head += f"  {'normed cos':>10}  {'normed base':>11}  {'normed ident.':>13}"
    lines = [head]
    for row in summary.itertuples(index=False):
        interval = format_interval(row.cos_input_lo, row.cos_input_hi)
        line = (
            f"{row.layer:>5}  {row.cos_input:>7.3f} {interval}"
            f"  {row.baseline:>8.3f}  {row.identifiable:>11.1%}"
        )
        if show_normed:
            line += (
                f"  {row.cos_input_normed:>10.3f}  {row.baseline_normed:>11.3f}"
                f"  {row.identifiable_normed:>12.1%}"
            )
        lines.append(line)
    return "\n".join(lines)
