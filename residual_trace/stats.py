"""Small, seeded statistics shared by the tracer and the figures.

Examples:
    >>> low, high = bootstrap_ci([1.0, 1.0, 1.0], seed=0)
    >>> float(low), float(high)
    (1.0, 1.0)
    >>> format_interval(*bootstrap_ci([0.5], seed=0))  # one unit: no interval
    '[n/a]'
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped).

    Fewer than two values give ``(nan, nan)``: one value has no spread to resample, and
    ``[x, x]`` would claim certainty.
    """
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if data.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    # resample in chunks: memory stays ~ chunk * n values, not n_boot * n
    chunk = max(1, min(n_boot, (1 << 21) // data.size))
    means = np.concatenate(
        [
            data[rng.integers(0, data.size, size=(min(chunk, n_boot - start), data.size))].mean(
                axis=1
            )
            for start in range(0, n_boot, chunk)
        ]
    )
    tail = (1.0 - level) / 2.0
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))


def format_interval(low: float, high: float, spec: str = ".3f") -> str:
    """``[low, high]`` formatted with ``spec``, or ``[n/a]`` when either end is undefined.

    Examples:
        >>> format_interval(0.1234, 0.5, ".2f"), format_interval(float("nan"), 1.0)
        ('[0.12, 0.50]', '[n/a]')
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return "[n/a]"
    return f"[{low:{spec}}, {high:{spec}}]"


def cluster_bootstrap_ci(
    sums: np.ndarray,
    counts: np.ndarray,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of pooled means, resampling whole clusters.

    ``sums[c, k]`` and ``counts[c, k]`` are cluster c's total and number of observations in
    column k (e.g. a text's summed index over its perturbations, per head); column k's mean
    is ``sums[:, k].sum() / counts[:, k].sum()``. Resampling clusters (texts), not the
    observations inside them, keeps correlated observations from narrowing the interval.
    Columns with fewer than two clusters holding observations get ``nan``.

    Examples:
        >>> sums = np.array([[2.0, 1.0], [4.0, 1.0], [6.0, 0.0]])
        >>> counts = np.array([[1, 1], [1, 1], [1, 0]])
        >>> low, high = cluster_bootstrap_ci(sums, counts, seed=0)
        >>> bool(2.0 <= low[0] <= 4.0 <= high[0] <= 6.0), (float(low[1]), float(high[1]))
        (True, (1.0, 1.0))
    """
    sums = np.nan_to_num(np.asarray(sums, dtype=np.float64))
    counts = np.asarray(counts, dtype=np.float64)
    clusters, columns = sums.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, (1 << 22) // max(1, clusters)))
    means = []
    for start in range(0, n_boot, chunk):
        draws = rng.multinomial(
            clusters, np.full(clusters, 1.0 / clusters), size=min(chunk, n_boot - start)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append((draws @ sums) / (draws @ counts))
    stacked = np.concatenate(means)
    tail = (1.0 - level) / 2.0
    with warnings.catch_warnings():  # all-NaN columns (no observations) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanquantile(stacked, tail, axis=0) if stacked.size else np.full(columns, np.nan)
        high = np.nanquantile(stacked, 1.0 - tail, axis=0) if stacked.size else low
    enough = (counts > 0).sum(axis=0) >= 2
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


def mean_with_ci(
    values: Sequence[float] | np.ndarray, name: str, seed: int = 0
) -> dict[str, float]:
    """``{name: mean, name_lo: low, name_hi: high}``, as summary-table columns.

    The mean (NaNs dropped) and its 95% percentile bootstrap interval.

    Examples:
        >>> mean_with_ci([2.0, 2.0], "x")
        {'x': 2.0, 'x_lo': 2.0, 'x_hi': 2.0}
    """
    data = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(data, seed=seed)
    mean = float(np.nanmean(data)) if np.isfinite(data).any() else float("nan")
    return {name: mean, f"{name}_lo": low, f"{name}_hi": high}
