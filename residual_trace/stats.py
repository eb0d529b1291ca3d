"""Small, seeded statistics shared by the tracer and the figures.

Examples:
    >>> low, high = bootstrap_ci([1.0, 1.0, 1.0], seed=0)
    >>> float(low), float(high)
    (1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped; ``(nan, nan)`` if empty)."""
    data = np.asarray(values, dtype=np.float64)
    data = data[~np.isnan(data)]
    if data.size == 0:
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
