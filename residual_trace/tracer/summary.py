"""Per-layer summary of a drift table: what the CLI prints and ``summary.csv`` holds."""

from __future__ import annotations

import numpy as np
import pandas as pd

from residual_trace.stats import bootstrap_ci

SUMMARY_COLUMNS = (
    "layer",
    "n_tokens",
    "cos_input",
    "cos_input_lo",
    "cos_input_hi",
    "baseline",
    "identifiable",
    "cos_input_normed",
    "baseline_normed",
    "identifiable_normed",
    "norm_ratio",
    "top_dim_share",
)


def layer_summary(
    table: pd.DataFrame, include_special: bool = False, seed: int = 0
) -> pd.DataFrame:
    """One row per layer: means over tokens, a 95% bootstrap interval, the null beside it.

    Columns: ``n_tokens`` measured; ``cos_input`` mean with ``cos_input_lo``/``_hi`` (95%
    bootstrap interval of the mean); ``baseline`` mean similarity to the text's other
    tokens (the anisotropy null); ``identifiable`` share of tokens with ``vocab_rank == 1``;
    the same three for the normalised variant; mean ``norm_ratio`` and ``top_dim_share``.
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
    out = []
    for layer, group in rows.groupby("layer", sort=True):
        lo, hi = bootstrap_ci(group["cos_input"].to_numpy(), seed=seed)
        out.append(
            {
                "layer": int(layer),
                "n_tokens": len(group),
                "cos_input": float(group["cos_input"].mean()),
                "cos_input_lo": lo,
                "cos_input_hi": hi,
                "baseline": float(group["baseline"].mean()),
                "identifiable": float((group["vocab_rank"] == 1).mean()),
                "cos_input_normed": float(group["cos_input_normed"].mean()),
                "baseline_normed": float(group["baseline_normed"].mean()),
                "identifiable_normed": float((group["vocab_rank_normed"] == 1).mean()),
                "norm_ratio": float(group["norm_ratio"].mean()),
                "top_dim_share": float(group["top_dim_share"].mean()),
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS)).astype({"n_tokens": np.int64})


def format_summary(summary: pd.DataFrame, show_normed: bool) -> str:
    """A fixed-width text table of :func:`layer_summary` for the terminal."""
    head = f"{'layer':>5}  {'cos_input [95% CI]':>22}  {'baseline':>8}  {'identifiable':>12}"
    if show_normed:
        head += f"  {'normed cos':>10}  {'normed base':>11}  {'normed ident.':>13}"
    lines = [head]
    for row in summary.itertuples(index=False):
        interval = f"[{row.cos_input_lo:.3f}, {row.cos_input_hi:.3f}]"
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
